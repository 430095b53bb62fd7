"""Layer freeze: the decoder stack is found by introspection on several architectures, plain and PEFT."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from gere_plugin.freeze import LayerFreezeCallback, find_decoder_layers, freeze_bottom, layer_index_of

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=12, num_attention_heads=4, vocab_size=128)
ARCHS = {
    "llama": dict(SMALL, num_key_value_heads=2),
    "mistral": dict(SMALL, num_key_value_heads=2),
    "qwen2": dict(SMALL, num_key_value_heads=2),
    "gemma": dict(SMALL, num_key_value_heads=2, head_dim=8),
    "gpt_neox": dict(SMALL),
    "gpt2": dict(n_embd=32, n_layer=12, n_head=4, vocab_size=128),
}


def make(arch):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **ARCHS[arch]))


def test_layer_regex_does_not_confuse_1_and_10():
    assert layer_index_of("model.layers.1.mlp.weight", "model.layers") == 1
    assert layer_index_of("model.layers.10.mlp.weight", "model.layers") == 10
    assert layer_index_of("model.norm.weight", "model.layers") is None


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("use_lora", [False, True])
def test_freeze_bottom_layers_and_embeddings(arch, use_lora):
    model = make(arch)
    name, layers = find_decoder_layers(model)
    assert len(layers) == 12
    if use_lora:
        from peft import LoraConfig, get_peft_model

        targets = {"gpt_neox": ["query_key_value"], "gpt2": ["c_attn"]}.get(arch, ["q_proj", "v_proj"])
        model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
        name, _ = find_decoder_layers(model)
    frozen = freeze_bottom(model, num_layers=2, embeddings=True)
    frozen_layers = {layer_index_of(n, name) for n in frozen} - {None}
    assert frozen_layers == {0, 1}, f"{arch}: froze layers {frozen_layers}"
    trainable_idx = {layer_index_of(n, name) for n, p in model.named_parameters() if p.requires_grad} - {None}
    assert trainable_idx == set(range(2, 12))
    for p in model.get_input_embeddings().parameters():
        assert not p.requires_grad
    # 1 must not match 10/11: layers 10 and 11 keep trainable parameters
    assert {10, 11} <= trainable_idx


def test_too_many_layers_is_an_error():
    with pytest.raises(ValueError, match="gere_freeze_layers=13"):
        freeze_bottom(make("llama"), num_layers=13)


def test_callback_freezes_before_the_optimizer_exists(tmp_path):
    model = make("llama")
    cb = LayerFreezeCallback(num_layers=3, embeddings=True)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=model, args=args, callbacks=[cb])
    assert trainer.optimizer is None and cb.frozen
    trainer.create_optimizer()
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert not any(id(params[n]) in in_opt for n in cb.frozen)
