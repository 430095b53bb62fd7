"""Chunked replay CE / KL (gere_plugin.logits) against the full-logit reference implementations.

Liger-Kernel style: every chunked op against the naive op it replaces (``losses.token_ce`` and
``losses.kl_loss`` on full logits), values AND gradients (hidden states and head weight), odd shapes,
padding on either side, fp32 (tight) and bf16 (looser), chunk sizes from 1 token to more than the
whole batch. Then the head itself: ``LogitHead(hidden_states[-1])`` equals the model's own logits on
several architectures (tied, softcapped, scaled, LoRA-wrapped), and a head it cannot reproduce is
detected.
"""

from __future__ import annotations

import logging

import pytest
import torch

from gere_plugin.logits import (
    CHUNK_ENV,
    LogitHead,
    chunk_tokens,
    chunked_kl,
    chunked_target_ce,
    chunked_token_ce,
    head_mismatch,
    kl_chunk_tokens,
    logit_head,
    replay_logit_head,
)
from gere_plugin.losses import kl_loss, target_ce, token_ce

SHAPES = [(3, 47, 31, 123), (1, 5, 16, 7), (2, 31, 8, 300), (4, 3, 12, 47)]  # (B, T, H, V)
CHUNKS = [1, 7, 64, 10_000]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _mask(b: int, t: int, seed: int) -> torch.Tensor:
    """Real-token masks with right padding on even rows and left padding on odd rows (lengths >= 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t  # one full row
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        if i % 2:
            mask[i, t - n :] = 1
        else:
            mask[i, :n] = 1
    return mask


def _setup(shape, dtype, seed=0):
    b, t, h, v = shape
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(b, t, h, generator=g) * 2).to(dtype).requires_grad_(True)
    lin = torch.nn.Linear(h, v, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(v, h, generator=g).to(dtype))
    ids = torch.randint(0, v, (b, t), generator=g)
    return hidden, lin, ids, _mask(b, t, seed)


def _grads(loss, hidden, lin):
    gh, gw = torch.autograd.grad(loss, [hidden, lin.weight])
    return gh.float(), gw.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_ce_equals_full_logit_ce(shape, chunk, dtype):
    hidden, lin, ids, mask = _setup(shape, dtype)
    ref_sum, ref_n = token_ce(lin(hidden), ids, mask)
    ref = ref_sum / ref_n.clamp_min(1)
    got_sum, got_n = chunked_token_ce(LogitHead(lin), hidden, ids, mask, chunk)
    got = got_sum / got_n.clamp_min(1)
    assert int(got_n) == int(ref_n)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, **TOL[dtype])
    for a, b in zip(_grads(got, hidden, lin), _grads(ref, hidden, lin)):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_target_ce_equals_full_logit_target_ce(shape, chunk, dtype):
    """Earlier-task rows (gere_task_replay): CE on the marked completion tokens only."""
    hidden, lin, ids, mask = _setup(shape, dtype)
    g = torch.Generator().manual_seed(1)
    target = mask * (torch.rand(mask.shape, generator=g) < 0.6).long()  # a completion-only loss mask
    ref_sum, ref_n = target_ce(lin(hidden), ids, target)
    ref = ref_sum / ref_n.clamp_min(1)
    got_sum, got_n = chunked_target_ce(LogitHead(lin), hidden, ids, target, chunk)
    got = got_sum / got_n.clamp_min(1)
    assert int(got_n) == int(ref_n)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    if int(ref_n):
        for a, b in zip(_grads(got, hidden, lin), _grads(ref, hidden, lin)):
            torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_kl_equals_full_logit_kl(shape, chunk, dtype):
    hidden, lin, ids, mask = _setup(shape, dtype)
    base_hidden = (hidden.detach().float() + 0.3 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5))).to(dtype)
    base_lin = torch.nn.Linear(lin.in_features, lin.out_features, bias=False).to(dtype)
    with torch.no_grad():
        base_lin.weight.copy_(lin.weight * 0.9)
    with torch.no_grad():
        base_logits = base_lin(base_hidden)
    ref = kl_loss(lin(hidden), base_logits, mask).loss
    got = chunked_kl(LogitHead(lin), LogitHead(base_lin), hidden, base_hidden, mask, chunk).loss
    assert float(ref.detach()) > 1e-3
    torch.testing.assert_close(got, ref, **TOL[dtype])
    for a, b in zip(_grads(got, hidden, lin), _grads(ref, hidden, lin)):
        torch.testing.assert_close(a, b, **TOL[dtype])
    assert base_lin.weight.grad is None  # the base side never takes part in the backward


def test_padding_chunks_and_no_grad_change_nothing():
    hidden, lin, ids, mask = _setup((3, 47, 31, 123), torch.float32)
    head = LogitHead(lin)
    plain = chunked_token_ce(head, hidden, ids, mask, 16)[0]
    padded = chunked_token_ce(head, hidden, ids, mask, 16, min_chunks=40)[0]  # 40 calls, most of them empty
    torch.testing.assert_close(padded, plain, rtol=0, atol=0)
    for a, b in zip(_grads(padded, hidden, lin), _grads(plain, hidden, lin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(chunked_token_ce(head, hidden, ids, mask, 16)[0], plain)


def test_chunks_hold_at_most_chunk_tokens_of_logits_forward_and_backward():
    hidden, lin, ids, mask = _setup((3, 47, 31, 123), torch.float32)
    rows_seen: list[int] = []
    lin.register_forward_hook(lambda _m, _i, out: rows_seen.append(out.shape[0]))
    loss = chunked_token_ce(LogitHead(lin), hidden, ids, mask, 16)[0]
    forward_calls = len(rows_seen)
    loss.backward()
    n = int((mask[:, 1:] * mask[:, :-1]).sum())
    assert max(rows_seen) <= 16
    assert forward_calls == -(-n // 16)
    assert len(rows_seen) == 2 * forward_calls  # every chunk rebuilt once in the backward pass


def test_all_padding_gives_zero_and_no_nan():
    hidden, lin, ids, _ = _setup((2, 5, 8, 11), torch.float32)
    mask = torch.zeros(2, 5, dtype=torch.long)
    s, n = chunked_token_ce(LogitHead(lin), hidden, ids, mask, 4)
    assert float(s) == 0.0 and int(n) == 0
    kl = chunked_kl(LogitHead(lin), LogitHead(lin), hidden, hidden.detach(), mask, 4).loss
    assert float(kl) == 0.0
    s.backward()


def test_chunk_size_rule_and_override(monkeypatch):
    monkeypatch.delenv(CHUNK_ENV, raising=False)
    assert chunk_tokens(128_256) == 130 and chunk_tokens(256_000) == 65
    assert chunk_tokens(32_000) == 256 and chunk_tokens(7) == 256  # never more than TRL's chunked_nll chunk
    assert kl_chunk_tokens(130) == 65 and kl_chunk_tokens(1) == 1  # KL holds two log-softmaxes per chunk
    monkeypatch.setenv(CHUNK_ENV, "32")
    assert chunk_tokens(128_256) == 32
    monkeypatch.setenv(CHUNK_ENV, "0")
    assert chunk_tokens(128_256) == 0
    monkeypatch.setenv(CHUNK_ENV, "many")
    with pytest.raises(ValueError, match=CHUNK_ENV):
        chunk_tokens(10)


# ---- the head reproduces the model's own logits ------------------------------------------------
def _tiny(kind: str):
    """A tiny random causal LM of architecture ``kind`` with large logits (so softcaps and scales matter)."""
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False)
        cls = tf.LlamaForCausalLM
    elif kind == "llama-tied":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=True)
        cls = tf.LlamaForCausalLM
    elif kind == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=5.0, attn_logit_softcapping=50.0)
        cls = tf.Gemma2ForCausalLM
    elif kind == "cohere":
        cfg = tf.CohereConfig(**common, logit_scale=0.37)
        cls = tf.CohereForCausalLM
    elif kind == "granite":
        cfg = tf.GraniteConfig(**common, logits_scaling=3.0)
        cls = tf.GraniteForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common)
        cls = tf.Qwen2ForCausalLM
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)  # logits of tens: a missing softcap/scale shows
    return model


ARCHS = ["llama", "llama-tied", "gemma2", "cohere", "granite", "qwen2", "gpt2"]


@pytest.mark.parametrize("kind", ARCHS)
def test_head_reproduces_model_logits(kind):
    model = _tiny(kind)
    head = logit_head(model)
    assert head is not None
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(head(out.hidden_states[-1]), out.logits, rtol=1e-5, atol=1e-5)
    assert head_mismatch(model, head, ids[:1]) is None
    expected_post = {"gemma2": ("softcap", 5.0), "cohere": ("mul", 0.37), "granite": ("div", 3.0)}
    if kind in expected_post:
        assert expected_post[kind] in [(op, pytest.approx(v)) for op, v in head.post]
    else:
        assert head.post == ()


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_dropping_the_post_processing_is_detected(kind):
    model = _tiny(kind)
    bare = LogitHead(model.get_output_embeddings())
    reason = head_mismatch(model, bare, torch.arange(1, 9)[None])
    assert reason is not None and "differs" in reason


def test_unknown_head_falls_back_to_full_logits(caplog):
    import transformers as tf

    class Doubled(tf.LlamaForCausalLM):  # an architecture with post-processing logit_head does not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    model = Doubled(tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1))
    model.train()
    with caplog.at_level(logging.WARNING, logger="gere_plugin.logits"):
        assert replay_logit_head(model, list(range(1, 10))) is None
    assert "full-vocabulary logits" in caplog.text and "differs" in caplog.text
    assert all(m.training for m in model.modules()), "training flags must be restored after the check"
    assert replay_logit_head(_tiny("llama"), list(range(1, 10))) is not None


@pytest.mark.parametrize("where", ["lora", "modules_to_save"])
def test_peft_head_with_and_without_adapters(where):
    from peft import LoraConfig, get_peft_model

    model = _tiny("llama")
    if where == "lora":
        cfg = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    else:
        cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    if where == "modules_to_save":
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "modules_to_save" in n:
                    p.add_(1.0)  # the trained copy differs from the original head
    head = logit_head(peft_model)
    assert head is not None
    ids = torch.arange(3, 20)[None]
    assert head_mismatch(peft_model, head, ids) is None
    with peft_model.disable_adapter(), torch.no_grad():
        assert head_mismatch(peft_model, head.without_adapters(), ids) is None
        base = peft_model(input_ids=ids, output_hidden_states=True)
    # outside the context (where a chunk is rebuilt in the backward pass) the adapter-free head still
    # gives the base's logits, the live head does not
    with torch.no_grad():
        torch.testing.assert_close(head.without_adapters()(base.hidden_states[-1]), base.logits)
        assert not torch.allclose(head(base.hidden_states[-1]), base.logits, atol=1e-3)
