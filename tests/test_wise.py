"""WiSE-FT after each task (``gere_wise_alpha``): the interpolation against hand values and naive references
(full model, fresh and carried-over LoRA adapters), a real GeReSFTTrainer run against an identical run without
the key, the key's checks, the sequence presets and the dev-split choice of alpha."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from gere_plugin import GeReArguments, GeReSFTTrainer
from gere_plugin.config import GeReConfigError, task_methods, validate_gere_values
from gere_plugin.continual import METHODS, WISE_ALPHA, TrainSettings, stage_gere_keys
from gere_plugin.continual.runner import check_sequence
from gere_plugin.continual.wise_select import select_wise_alpha
from gere_plugin.methods.wise import (
    WiSE,
    fresh_adapter_partners,
    interpolate_,
    lora_partner,
    trainable_snapshot,
)
from gere_plugin.trainer.task_terms import check_task_methods

from .conftest import sft_config


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Stand-in for training: every trainable tensor moves by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# The interpolation
# ---------------------------------------------------------------------------------------------
def test_interpolation_by_hand_leaves_frozen_weights_alone():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -4.0]))
    net[1].requires_grad_(False)
    frozen = net[1].weight.detach().clone()
    term = WiSE(0.25, net)
    assert set(term.before) == {"0.weight", "0.bias"} and term.snapshot_bytes == 6 * 4
    assert all(v.device.type == "cpu" for v in term.before.values())
    with torch.no_grad():  # "training"
        net[0].weight.copy_(torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
        net[0].bias.copy_(torch.tensor([4.0, 4.0]))
        net[1].weight.add_(1.0)  # a frozen tensor changed by hand is not WiSE's business
    summary = term.apply(net)
    # 0.75 * before + 0.25 * after
    assert net[0].weight.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert net[0].bias.tolist() == [1.0, -2.0]
    assert torch.equal(net[1].weight, frozen + 1.0)
    assert summary["update_norm"] == pytest.approx((4 * 16 + 16 + 64) ** 0.5)
    assert term.before == {} and term.apply(net) is summary  # once; the snapshot is freed


def test_full_model_matches_naive_reference(tiny_model):
    alpha = 0.3
    before = _trainable(tiny_model)
    term = WiSE(alpha, tiny_model)
    _perturb(tiny_model, seed=1)
    after = _trainable(tiny_model)
    term.apply(tiny_model)
    for n, p in tiny_model.named_parameters():
        expected = (1 - alpha) * before[n].double() + alpha * after[n].double()
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)
    assert term.keep == set() and "WiSE-FT" in term.describe() and "0.7 * theta_before" in term.describe()


def test_bf16_parameters_round_once():
    net = torch.nn.Linear(8, 8).to(torch.bfloat16)
    before = net.weight.detach().clone()
    term = WiSE(0.5, net)
    _perturb(net, seed=2, scale=0.5)
    after = net.weight.detach().clone()
    term.apply(net)
    expected = (0.5 * before.float() + 0.5 * after.float()).to(torch.bfloat16)
    assert net.weight.dtype == torch.bfloat16 and torch.equal(net.weight.detach(), expected)


def test_lora_names_pair_up():
    assert lora_partner("m.q_proj.lora_A.default.weight") == "m.q_proj.lora_B.default.weight"
    assert lora_partner("m.q_proj.lora_B.default.weight") == "m.q_proj.lora_A.default.weight"
    assert lora_partner("m.embed_tokens.lora_embedding_A.default") == "m.embed_tokens.lora_embedding_B.default"
    assert lora_partner("m.q_proj.weight") is None
    before = {"x.lora_A.d.weight": torch.ones(2, 3), "x.lora_B.d.weight": torch.zeros(3, 2), "y.weight": torch.zeros(1)}
    assert fresh_adapter_partners(before) == {"x.lora_A.d.weight"}


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]))


def test_fresh_lora_adapter_scales_the_update_exactly(tiny_model):
    alpha = 0.4
    peft_model = _lora(tiny_model)
    before = _trainable(peft_model)
    assert before and all("lora_" in n for n in before)
    term = WiSE(alpha, peft_model)
    # PEFT's fresh adapters: lora_B of a linear layer and lora_embedding_A of an embedding start at zero
    assert term.keep == {n for n in before if ".lora_A." in n or ".lora_embedding_B." in n}
    _perturb(peft_model, seed=3)
    after = _trainable(peft_model)
    term.apply(peft_model)
    now = _trainable(peft_model)
    for n in before:
        if n in term.keep:
            assert torch.equal(now[n], after[n]), n
        else:  # the zero factor: (1 - alpha) * 0 + alpha * after
            torch.testing.assert_close(now[n], alpha * after[n], rtol=0, atol=1e-7)
    # the merged weight: W0 + s * B @ A moved by exactly alpha times the trained update (naive product)
    scale = 8 / 4
    for n in before:
        if ".lora_A." in n:
            b = n.replace(".lora_A.", ".lora_B.")
            torch.testing.assert_close(scale * now[b] @ now[n], alpha * (scale * after[b] @ after[n]), rtol=1e-5, atol=1e-7)


def test_carried_over_lora_adapter_interpolates_both_factors(tiny_model):
    alpha = 0.6
    peft_model = _lora(tiny_model)
    _perturb(peft_model, seed=4)  # an adapter trained on an earlier task: no factor is zero
    before = _trainable(peft_model)
    term = WiSE(alpha, peft_model)
    assert term.keep == set()
    _perturb(peft_model, seed=5)
    after = _trainable(peft_model)
    term.apply(peft_model)
    for n, p in peft_model.named_parameters():
        if n in before:
            expected = (1 - alpha) * before[n].double() + alpha * after[n].double()
            torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A real trainer
# ---------------------------------------------------------------------------------------------
FAST = dict(gradient_checkpointing=False)


def _train(tiny_dir, tokenizer, dataset, out, **keys) -> tuple[GeReSFTTrainer, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    trainer = GeReSFTTrainer(model=model, args=sft_config(out, **FAST, **keys), train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.train()
    return trainer, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_result_is_the_interpolation_of_the_plain_run(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset):
    from transformers import AutoModelForCausalLM

    start = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(str(tiny_dir)).named_parameters()}
    _, plain = _train(tiny_dir, tiny_tokenizer, sft_dataset, tmp_path / "plain")
    alpha = 0.6
    trainer, wise = _train(tiny_dir, tiny_tokenizer, sft_dataset, tmp_path / "wise", gere_wise_alpha=alpha)
    assert trainer.gere_task.methods == ["wise"] and trainer.gere_step is None
    assert any(not torch.equal(plain[n], start[n]) for n in start)  # the plain run did train
    for n in start:
        expected = (1 - alpha) * start[n].double() + alpha * plain[n].double()
        torch.testing.assert_close(wise[n].double(), expected, rtol=0, atol=1e-6)
    summary = trainer.gere_task.term("wise").summary
    assert summary["alpha"] == alpha and summary["tensors"] == len(start) and summary["update_norm"] > 0
    # alpha = 1 is the plain run, bit for bit (no term is built)
    trainer, one = _train(tiny_dir, tiny_tokenizer, sft_dataset, tmp_path / "one", gere_wise_alpha=1.0)
    assert trainer.gere_task is None
    assert all(torch.equal(one[n], plain[n]) for n in plain)


def test_ewc_records_the_interpolated_weights(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset):
    from gere_plugin.methods.ewc import EWCState

    trainer, final = _train(tiny_dir, tiny_tokenizer, sft_dataset, tmp_path / "out", gere_wise_alpha=0.5,
                            gere_ewc_lambda=1.0, gere_ewc_samples=2)
    assert trainer.gere_task.methods == ["ewc", "wise"]  # the existing order, WiSE appended ...
    state = EWCState.load(tmp_path / "out" / "gere_ewc")  # ... but its after_task runs first
    assert set(state.anchor) == set(final)
    assert all(torch.equal(state.anchor[n], final[n]) for n in final)


# ---------------------------------------------------------------------------------------------
# The key and its checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 0.0, -0.2, 1.01, float("nan"), "0.5", True])
def test_alpha_outside_the_range_is_refused(value):
    with pytest.raises(GeReConfigError, match=r"gere_wise_alpha=.* must be a number in \(0, 1\]"):
        GeReArguments(gere_wise_alpha=value)


def test_alpha_switches_the_term_on_below_one():
    assert validate_gere_values({"gere_wise_alpha": 1})["gere_wise_alpha"] == 1.0
    assert task_methods({"gere_wise_alpha": 1.0}) == [] and task_methods({"gere_wise_alpha": None}) == []
    both = {"gere_task_kl": 0.1, "gere_flow": True, "gere_ewc_lambda": 5.0, "gere_wise_alpha": 0.5}
    assert task_methods(both) == ["flow", "ewc", "task_kl", "wise"]


def _fake_trainer(family: str, **extra) -> SimpleNamespace:
    return SimpleNamespace(gere_family=family, gere_combine="mean" if family == "sft" else "sum",
                           args=SimpleNamespace(), train_dataset=[{"x": 1}], **extra)


def test_every_loss_family_may_use_wise_but_not_the_sft_only_terms():
    args = GeReArguments(gere_wise_alpha=0.5)
    for family in ("sft", "dpo", "grpo"):
        check_task_methods(_fake_trainer(family), args, task_methods(args))
    args = GeReArguments(gere_wise_alpha=0.5, gere_ewc_lambda=1.0)
    with pytest.raises(GeReConfigError, match=r"^gere_ewc_lambda: supported by the SFT trainers only") as err:
        check_task_methods(_fake_trainer("dpo"), args, task_methods(args))
    assert "gere_wise_alpha" not in str(err.value)


def test_sharded_parameters_are_refused():
    args = GeReArguments(gere_wise_alpha=0.5)
    with pytest.raises(GeReConfigError, match="gere_wise_alpha: .*FSDP / DeepSpeed ZeRO-3"):
        check_task_methods(_fake_trainer("sft", is_fsdp_enabled=True), args, task_methods(args))


def test_snapshot_copies_only_what_trains():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    net[0].requires_grad_(False)
    snap = trainable_snapshot(net)
    assert set(snap) == {"1.weight", "1.bias"}
    assert snap["1.weight"].data_ptr() != net[1].weight.data_ptr() and torch.equal(snap["1.weight"], net[1].weight)


def test_interpolate_returns_the_update_norm_and_leaves_the_snapshot_alone():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    before = {"p": torch.tensor([1.0, 2.0])}
    assert interpolate_({"p": p}, before, 0.5) == pytest.approx(8**0.5)
    assert p.tolist() == [2.0, 3.0] and before["p"].tolist() == [1.0, 2.0]  # applied again, same snapshot
    assert interpolate_({"p": p}, before, 0.5) == pytest.approx(2**0.5) and p.tolist() == [1.5, 2.5]


# ---------------------------------------------------------------------------------------------
# The sequence presets and the dev-split choice
# ---------------------------------------------------------------------------------------------
def test_presets_switch_wise_on_and_settings_override_alpha():
    assert METHODS["wise"].uses == ["wise"] and not METHODS["wise"].replay
    assert METHODS["gere_wise"].replay and METHODS["gere_wise"].regularizer == "tm"
    settings = TrainSettings(max_steps=2)
    keys = stage_gere_keys(METHODS["wise"], 1, settings, None, None, seed=0)
    assert keys["gere_wise_alpha"] == WISE_ALPHA and 0 < WISE_ALPHA < 1
    keys = stage_gere_keys(METHODS["gere_wise"], 0, TrainSettings(max_steps=2, gere_wise_alpha=0.8), "r.jsonl", None, 0)
    assert keys["gere_wise_alpha"] == 0.8 and keys["gere_replay"] == "r.jsonl"
    with pytest.raises(GeReConfigError, match="gere_wise_alpha sets the strength of methods with wise"):
        check_sequence([SimpleNamespace(name="a")], METHODS["plain"], TrainSettings(gere_wise_alpha=0.8))


def test_select_alpha_guards_plasticity_then_keeps_earlier_tasks():
    current = {1.0: 90.0, 0.75: 89.5, 0.5: 88.9, 0.25: 70.0}
    # 0.5 is 1.1 points below alpha = 1: not eligible, however well it keeps the earlier tasks
    earlier = {1.0: [60.0, 50.0], 0.75: [70.0, 62.0], 0.5: [80.0, 80.0], 0.25: [90.0, 90.0]}
    assert select_wise_alpha(current, earlier) == 0.75
    assert select_wise_alpha(current, earlier, tolerance=2.0) == 0.5
    assert select_wise_alpha(current, earlier, tolerance=0.0) == 1.0
    # a larger alpha that keeps the earlier tasks better wins over a smaller one
    assert select_wise_alpha({1.0: 80.0, 0.5: 80.0}, {1.0: 70.0, 0.5: 65.0}) == 1.0
    # ties and the first task: the smallest eligible alpha
    assert select_wise_alpha({1.0: 80.0, 0.7: 80.0, 0.4: 79.5}, {1.0: 50.0, 0.7: 50.0, 0.4: 50.0}) == 0.4
    assert select_wise_alpha({1.0: 80.0, 0.7: 80.0, 0.4: 78.0}) == 0.7
    assert select_wise_alpha({1.0: 80.0, 0.7: 80.0}, {1.0: [], 0.7: []}) == 0.7
    assert select_wise_alpha({1.0: 80.0, 0.7: 80.0}, {1.0: 55.0, 0.7: 56.0}) == 0.7  # means given directly


@pytest.mark.parametrize(
    "current, earlier, match",
    [({}, None, "no candidate"), ({0.5: 80.0}, None, "must include alpha = 1.0"),
     ({1.0: 80.0, 0.0: 80.0}, None, r"in \(0, 1\]"), ({1.0: 80.0, 0.5: 80.0}, {1.0: 1.0}, "other candidates")],
)
def test_select_alpha_refuses_bad_inputs(current, earlier, match):
    with pytest.raises(ValueError, match=match):
        select_wise_alpha(current, earlier)


# ---------------------------------------------------------------------------------------------
# The sequence runner choosing alpha on the dev split
# ---------------------------------------------------------------------------------------------
def _label_task(name: str, labels: tuple[str, str], seed: int):
    import random

    from gere_plugin.continual import SequenceTask
    from gere_plugin.evaluation.tasks import ClassificationItem

    rng = random.Random(seed)
    words = "the river city music film team water light energy market school garden forest ocean planet".split()

    def item() -> ClassificationItem:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
        return ClassificationItem(f"{name}: {text}\nAnswer:", labels, rng.randint(0, 1))

    return SequenceTask(name=name, train=[item().as_prompt_completion() for _ in range(16)],
                        test=[item() for _ in range(6)], dev=[item() for _ in range(8)])


def test_runner_chooses_alpha_on_the_dev_split(tmp_path, tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from gere_plugin.continual import model_fingerprint, run_sequence
    from gere_plugin.evaluation.tasks import label_accuracy

    tasks = [_label_task("sentiment", (" positive", " negative"), 1), _label_task("question", (" yes", " no"), 2)]
    kw = dict(max_steps=2, per_device_train_batch_size=4, max_length=48, learning_rate=1e-3, logging_steps=1,
              eval_batch_size=8, general_every_task=False, print_logs=False)
    load = lambda: AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")  # noqa: E731
    start = load()
    plain = load()
    run_sequence(plain, tasks[:1], "plain", tmp_path / "plain", tokenizer=tiny_tokenizer, settings=TrainSettings(**kw),
                 seed=3)
    result = run_sequence(load(), tasks, "wise", tmp_path / "wise", tokenizer=tiny_tokenizer,
                          settings=TrainSettings(**kw, wise_alphas=(0.25, 0.5)), seed=3)
    first, second = result["stages"][0]["wise"], result["stages"][1]["wise"]
    assert first["candidates"] == second["candidates"] == [0.25, 0.5, 1.0]
    assert first["earlier_dev"] == [[], [], []] and all(len(e) == 1 for e in second["earlier_dev"])
    assert first["alpha"] == select_wise_alpha(dict(zip(first["candidates"], first["current_dev"])))
    # each candidate was scored on the interpolation of the plain run's weights (trained as the plain method)
    params = dict(start.named_parameters())
    trained = {n: p.detach().clone() for n, p in plain.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    for alpha, dev_acc in zip(first["candidates"], first["current_dev"]):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(trained[n])
        interpolate_(params, before, alpha)
        assert 100.0 * label_accuracy(start, tiny_tokenizer, tasks[0].dev, 8)["accuracy"] == dev_acc
        if alpha == first["alpha"]:  # ... and the chosen one is what task 1 ended with
            assert model_fingerprint(start) == result["stages"][0]["end_fingerprint"]
    # refusals: a method without WiSE-FT, a task without dev items
    with pytest.raises(GeReConfigError, match="wise_alphas chooses gere_wise_alpha for the WiSE-FT methods"):
        check_sequence(tasks, METHODS["plain"], TrainSettings(wise_alphas=(0.5,)))
    no_dev = [tasks[0], dataclasses.replace(tasks[1], dev=[])]
    with pytest.raises(GeReConfigError, match="task.s. question have no dev items"):
        check_sequence(no_dev, METHODS["wise"], TrainSettings(wise_alphas=(0.5,)))
    with pytest.raises(GeReConfigError, match=r"wise_alphas=.*in \(0, 1\]"):
        TrainSettings(wise_alphas=(0.0,))


def test_a_preset_with_its_own_alpha_grid_chooses_on_the_dev_split(tmp_path, tiny_dir, tiny_tokenizer):
    """MethodSpec.wise_alphas: the preset itself chooses alpha per task (der_paper_wise_tuned), a run's
    TrainSettings.wise_alphas overrides its grid, and a task without dev items is refused naming the method."""
    from transformers import AutoModelForCausalLM

    from gere_plugin.continual import WISE_ALPHA_GRID, MethodSpec, run_sequence
    from gere_plugin.continual.presets import NO_DEV_METHODS

    tuned, fixed = METHODS["der_paper_wise_tuned"], METHODS["der_paper_wise"]
    assert dataclasses.replace(tuned, name=fixed.name, wise_alphas=()) == fixed  # the same method but the choice
    assert tuned.wise_candidates() == WISE_ALPHA_GRID and tuned.wise_candidates((0.5,)) == (0.5,)
    assert fixed.wise_candidates() == () and METHODS["plain"].wise_candidates() == ()
    with pytest.raises(ValueError, match="method 'x': wise_alphas chooses gere_wise_alpha, which its gere keys lack"):
        MethodSpec("x", replay=False, regularizer="none", wise_alphas=(0.5,))
    with pytest.raises(ValueError, match=r"wise_alphas=\(1.5,\) must be numbers in \(0, 1\]"):
        MethodSpec("x", replay=False, regularizer="none", gere=(("gere_wise_alpha", 0.5),), wise_alphas=(1.5,))
    task = _label_task("sentiment", (" positive", " negative"), 1)
    with pytest.raises(GeReConfigError, match="method 'der_paper_wise_tuned' chooses WiSE-FT's alpha on the dev split"):
        check_sequence([dataclasses.replace(task, dev=[])], tuned, TrainSettings())
    with pytest.raises(GeReConfigError, match="gere_wise_alpha=0.5 fixes WiSE-FT's alpha, but method "
                                              "'der_paper_wise_tuned' chooses it"):
        check_sequence([task], tuned, TrainSettings(gere_wise_alpha=0.5))
    assert check_sequence([task], tuned, TrainSettings()) == ["sentiment"]
    # the CLI and the demo (tasks without dev items) do not offer it; its learning rate is der_paper's (no WiSE-FT)
    assert "der_paper_wise_tuned" not in NO_DEV_METHODS and {"der_paper_wise", "wise"} <= set(NO_DEV_METHODS)
    plain_train = tuned.without_wise()
    assert "wise" not in plain_train.uses and plain_train.wise_candidates() == ()
    assert all(plain_train.gere_kwargs(k) == METHODS["der_paper"].gere_kwargs(k) for k in (0, 1))

    own = dataclasses.replace(METHODS["wise"], name="wise_own_grid", wise_alphas=(0.5,))
    kw = dict(max_steps=2, per_device_train_batch_size=4, max_length=48, learning_rate=1e-3, logging_steps=1,
              eval_batch_size=8, general_every_task=False, print_logs=False)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
    result = run_sequence(model, [task], own, tmp_path / "own", tokenizer=tiny_tokenizer, settings=TrainSettings(**kw),
                          seed=3)
    stage = result["stages"][0]["wise"]
    assert stage["candidates"] == [0.5, 1.0] and stage["alpha"] in (0.5, 1.0)
    assert stage["alpha"] == select_wise_alpha(dict(zip(stage["candidates"], stage["current_dev"])))


def test_dpo_with_replay_interpolates_like_sft(tmp_path, tiny_dir, tiny_tokenizer, replay_file):
    """WiSE-FT touches no loss, so the DPO family may use it (with GeRe's replay here): the result is the
    interpolation of an identical run without the key."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from gere_plugin import GeReDPOConfig, GeReDPOTrainer

    rows = [{"prompt": f"Review: the film was {'great' if i % 2 else 'bad'} Sentiment:",
             "chosen": " positive" if i % 2 else " negative", "rejected": " negative" if i % 2 else " positive"}
            for i in range(16)]

    def run(name: str, **keys) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype="float32")
        cfg = GeReDPOConfig(
            output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=2, logging_steps=1, report_to=[],
            bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True,
            learning_rate=5e-3, seed=0, beta=0.1, gere_replay=str(replay_file), gere_replay_size=16,
            gere_replay_max_length=32, gere_replay_per_step=2, gere_state_cache=str(tmp_path / "cache"), **keys)
        trainer = GeReDPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                                 processing_class=tiny_tokenizer)
        trainer.train()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    start = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(str(tiny_dir)).named_parameters()}
    plain = run("plain")
    wise = run("wise", gere_wise_alpha=0.5)
    assert any(not torch.equal(plain[n], start[n]) for n in start)
    for n in start:
        torch.testing.assert_close(wise[n].double(), 0.5 * start[n].double() + 0.5 * plain[n].double(),
                                   rtol=0, atol=1e-6)
