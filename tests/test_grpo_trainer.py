"""GeReGRPOTrainer: real TRL GRPO (tiny random Llama, rule-based reward, no vLLM) with GeRe.

* the combined loss of a fixed batch equals a hand computation of ``L_grpo + CE_replay + w * R`` with
  ``w = CE_replay / R``, with and without gradient accumulation, on a batch whose GRPO loss is NEGATIVE
  (where the SFT/DPO rule ``primary / R`` would give a negative weight);
* training: TM exactly 0 at the first step and > 0 later, ``gere/*`` metrics next to TRL's GRPO metrics,
  the weight never negative, exactly ``gere_replay_per_step`` replay rows per optimizer step and the
  schedule's rows in every micro-batch, also when a generation batch spans several optimizer steps
  (``steps_per_generation``) and is reused (``num_iterations``);
* frozen layers stay bit-identical (full fine-tune) and frozen LoRA weights stay exactly zero;
* the default ``gere_replay_per_step`` counts prompts, not completions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gere_plugin import GeReGRPOConfig, GeReGRPOTrainer
from gere_plugin.losses import dynamic_weight

from .conftest import WORDS, general_texts
from .test_sft_trainer import _independent_reg, _independent_thresholds, _perturb


def vowel_reward(completions, **kwargs) -> list[float]:
    """Rule-based reward: the share of vowels among the letters of each completion."""
    out = []
    for c in completions:
        letters = [ch for ch in c if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0)
    return out


@pytest.fixture(scope="module")
def prompts():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": t} for t in general_texts(48, seed=5, min_words=3, max_words=8)])


def grpo_config(tmp_path, replay_file, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
        num_generations=2, max_completion_length=8, max_steps=3, logging_steps=1, report_to=[], bf16=False,
        use_cpu=True, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True, learning_rate=1e-2,
        seed=0, use_vllm=False,
        gere_replay=str(replay_file), gere_replay_size=32, gere_replay_max_length=32, gere_replay_per_step=2,
        gere_state_cache=str(tmp_path / "cache"),
    )
    base.update(kw)
    return GeReGRPOConfig(**base)


def make_trainer(tmp_path, tiny_dir, tok, prompts, replay_file, peft_config=None, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    return GeReGRPOTrainer(model=model, reward_funcs=vowel_reward, args=grpo_config(tmp_path, replay_file, **kw),
                           train_dataset=prompts, processing_class=tok, peft_config=peft_config)


def fixed_batch(tok, n: int, advantages: list[float]) -> dict[str, torch.Tensor]:
    """A GRPO micro-batch built by hand: left-padded prompts, fixed completions, given advantages."""
    prompt = tok([f"the {WORDS[10 + i]} was" for i in range(n)], padding=True, padding_side="left",
                 add_special_tokens=False, return_tensors="pt")
    g = torch.Generator().manual_seed(3)
    completion_ids = torch.randint(4, len(tok), (n, 5), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[0, 3:] = 0  # one shorter completion
    return {
        "prompt_ids": prompt["input_ids"], "prompt_mask": prompt["attention_mask"],
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.tensor(advantages[:n]),
        "num_items_in_batch": completion_mask.sum(),
    }


@pytest.mark.parametrize("accumulation", [1, 2])
def test_combined_loss_equals_hand_computation_on_a_fixed_batch(tmp_path, tiny_dir, tiny_tokenizer, prompts,
                                                                replay_file, accumulation):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    trainer = make_trainer(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file, loss_type="grpo", beta=0.0,
                           gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // accumulation)
    model, step = trainer.model, trainer.gere_step
    replay = step.replay
    _perturb(model)  # R > 0: the model now differs from the base the states were built from
    model.train()
    advantages = [1.0, 0.5, 0.25, 0.75]  # all positive: the GRPO loss is negative
    batch = fixed_batch(tiny_tokenizer, 4 // accumulation, advantages)
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.state.global_step = 0
    got = [trainer.compute_loss(model, dict(batch)) for _ in range(accumulation)]

    # Hand computation. On-policy (no old log-probs) the importance ratio is exactly 1, so TRL's "grpo"
    # loss of a micro-batch is -mean(advantages), divided by the accumulation steps (TRL scales it).
    l_grpo = -sum(advantages[: 4 // accumulation]) / (4 // accumulation)
    rows = step.schedule.rows_for_step(0)
    pos, neg = _independent_thresholds(base, replay)
    with torch.no_grad():
        per_row_ce = {}
        for i in rows:
            x = torch.tensor([replay.input_ids[i]])
            per_row_ce[i] = (F.cross_entropy(model(x).logits[0, :-1].float(), x[0, 1:], reduction="sum"), x.shape[1] - 1)
        step_targets = sum(n for _, n in per_row_ce.values())
        for micro in range(accumulation):
            mrows = step.schedule.rows_for_micro(0, micro, accumulation)
            ce_sum = sum(per_row_ce[i][0] for i in mrows)
            n = sum(per_row_ce[i][1] for i in mrows)
            ce = ce_sum / n
            r = _independent_reg("tm", model, base, replay, mrows, pos, neg)
            w = ce / (r + 1e-8)  # the grpo family's weight: matched to the replay CE
            expected = l_grpo / accumulation + (n / step_targets) * ce + (len(mrows) / len(rows)) * w * r
            assert float(r) > 1e-4
            assert float(got[micro]) == pytest.approx(float(expected), rel=2e-4, abs=1e-5), f"micro-batch {micro}"
            # the SFT/DPO rule would have turned the weight negative on this batch
            assert float(dynamic_weight(torch.tensor(l_grpo), r)) < 0 < float(w)
    # summed over the step: L_grpo + CE_replay(step) + mean over micro-batches of w * R
    metrics = trainer._metrics["train"]
    assert metrics["gere/task_loss"][-1] == pytest.approx(l_grpo, rel=1e-5)
    assert metrics["gere/weight"][-1] > 0
    assert metrics["gere/replay_rows"][-1] == len(rows) == 2


@pytest.mark.parametrize(
    "layout",
    [
        dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, gere_replay_per_step=3),
        # one generation batch spans 2 optimizer steps and is trained on twice (4 steps per generation)
        dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, gere_replay_per_step=3,
             steps_per_generation=4, num_iterations=2, max_steps=4),
    ],
    ids=["accumulation", "steps_per_generation+num_iterations"],
)
def test_grpo_trains_tm_zero_first_then_positive_weight_never_negative_counts_exact(
    tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file, layout
):
    trainer = make_trainer(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file, gere_freeze_layers=1,
                           gere_freeze_embeddings=True, **layout)
    frozen_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n in trainer.gere_frozen}
    others_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n not in trainer.gere_frozen}
    trainer.train()
    steps = int(trainer.args.max_steps)
    accumulation = int(trainer.args.gradient_accumulation_steps)
    per_step = int(trainer.args.gere_replay_per_step)
    logs = [h for h in trainer.state.log_history if "loss" in h and "gere/reg_loss" in h]
    assert len(logs) == steps
    for h in logs:
        for key in ("gere/task_loss", "gere/replay_ce", "gere/reg_loss", "gere/out_of_state", "gere/replay_rows",
                    "entropy", "clip_ratio/region_mean"):  # TRL's GRPO metrics survive next to GeRe's
            assert key in h, f"{key} missing at step {h['step']}"
        assert h["gere/replay_rows"] == per_step
        assert ("gere/weight" in h) == (h["gere/reg_loss"] != 0)
        if "gere/weight" in h:
            assert h["gere/weight"] >= 0
    assert "reward" in logs[0] and "completions/mean_length" in logs[0]  # logged on generation steps
    assert logs[0]["gere/reg_loss"] == 0.0 and logs[0]["gere/out_of_state"] == 0.0  # the model is the base
    assert all(h["gere/reg_loss"] > 0 for h in logs[1:])
    # exact replay rows: every micro-batch of every optimizer step, against the schedule
    by_step: dict[int, list[dict]] = {}
    for e in trainer.gere_step.history:
        by_step.setdefault(e["step"], []).append(e)
    assert sorted(by_step) == list(range(steps))
    for s, entries in by_step.items():
        assert [e["micro"] for e in entries] == list(range(accumulation))
        for e in entries:
            assert e["rows"] == trainer.gere_step.schedule.rows_for_micro(s, e["micro"], accumulation)
        rows = [r for e in entries for r in e["rows"]]
        assert len(rows) == per_step and len(set(rows)) == per_step
    # frozen embeddings + bottom layer: bit-identical; the rest trained
    params = dict(trainer.model.named_parameters())
    assert frozen_before and "model.embed_tokens.weight" in frozen_before
    for n, before in frozen_before.items():
        assert torch.equal(before, params[n].detach()), f"{n} changed although frozen"
    assert any(not torch.equal(before, params[n].detach()) for n, before in others_before.items())


def test_grpo_lora_keeps_frozen_adapter_weights_at_zero(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file):
    from peft import LoraConfig

    trainer = make_trainer(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file, gere_freeze_layers=1,
                           peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
                           gradient_accumulation_steps=2, per_device_train_batch_size=2, gere_replay_per_step=3)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "gere/reg_loss" in h]
    assert logs[0]["gere/reg_loss"] == 0.0 and logs[-1]["gere/reg_loss"] > 0
    lora_b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    frozen = {n: p for n, p in lora_b.items() if "layers.0." in n}
    assert frozen and all(torch.count_nonzero(p) == 0 for p in frozen.values())
    assert any(torch.count_nonzero(p) > 0 for n, p in lora_b.items() if n not in frozen)


def test_default_replay_rows_count_prompts_not_completions(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file):
    # 16 completions per step = 4 prompts x 4 generations: the default is a quarter of the PROMPTS (1), not of
    # the completions (4)
    trainer = make_trainer(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file, per_device_train_batch_size=8,
                           gradient_accumulation_steps=2, num_generations=4, gere_replay_per_step=None)
    assert trainer.gere_step.per_step == 1
    trainer = make_trainer(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file, per_device_train_batch_size=16,
                           gradient_accumulation_steps=2, num_generations=2, gere_replay_per_step=None)
    assert trainer.gere_step.per_step == 4  # 32 completions = 16 prompts


def test_replay_rows_must_stay_below_the_completions_of_a_step(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file):
    with pytest.raises(ValueError, match="gere_replay_per_step=4 must be smaller than the global batch"):
        make_trainer(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file, gere_replay_per_step=4)


def test_train_start_line_names_the_grpo_rule(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file):
    from gere_plugin.trainer import describe_gere

    trainer = make_trainer(tmp_path, tiny_dir, tiny_tokenizer, prompts, replay_file)
    line = describe_gere(trainer)
    assert "loss family grpo" in line and "matched to the replay CE" in line
    assert "logged loss = task + replay CE + w*R" in line
