"""FLOW: weights, the weighted loss and its scaling against hand / independent computations, the cache."""

from __future__ import annotations

import json
import math
import statistics
import types

import pytest
import torch
import torch.nn.functional as F

from gere_plugin import GeReSFTTrainer
from gere_plugin.config import GeReArguments, GeReConfigError
from gere_plugin.flow import batch_digests, flow_weights, median_tau, weighted_task_loss
from gere_plugin.losses import per_row_ce
from gere_plugin.states import StateCacheError
from gere_plugin.task_step import check_task_methods

from .conftest import sft_config

FAST = dict(gradient_checkpointing=False)


# -- pure math ----------------------------------------------------------------------------------
def test_flow_weights_on_fixed_losses_by_hand():
    losses = [0.5, 1.0, 2.0, 3.0, float("nan")]  # the NaN sample has no trained token
    w, tau = flow_weights(losses)
    assert tau == 1.5  # median of 0.5, 1, 2, 3
    expected = [math.exp(-0.5 / 1.5), math.exp(-1.0 / 1.5), math.exp(-2.0 / 1.5), math.exp(-3.0 / 1.5), 1.0]
    assert w.tolist() == pytest.approx(expected, rel=1e-12)
    assert median_tau([4.0, 1.0, 2.0]) == 2.0

    w, tau = flow_weights(losses, tau=2.0)
    assert tau == 2.0 and w[0].item() == pytest.approx(math.exp(-0.25), rel=1e-12)

    wn, _ = flow_weights(losses, normalize=True)
    mean = sum(expected[:4]) / 4
    assert wn.tolist() == pytest.approx([e / mean for e in expected[:4]] + [1.0], rel=1e-12)

    with pytest.raises(GeReConfigError, match="gere_flow_tau"):
        flow_weights([0.0, 0.0, 0.0])  # median 0: no temperature
    with pytest.raises(GeReConfigError, match="no task sample has a trained token"):
        flow_weights([float("nan")])


def test_weighted_loss_on_a_fixed_batch_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=g)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 0, 1]])
    weights = torch.tensor([0.5, 2.0])

    def ce(row: int, t: int) -> float:  # position t - 1 predicts labels[row, t]
        z = logits[row, t - 1].tolist()
        return -(z[labels[row, t]] - math.log(sum(math.exp(v) for v in z)))

    row0 = ce(0, 1) + ce(0, 2)
    row1 = ce(1, 2) + ce(1, 3)
    sums, counts = per_row_ce(logits, labels)
    assert sums.tolist() == pytest.approx([row0, row1], rel=1e-6)
    assert counts.tolist() == [2, 2]
    # the trained-token count of the step (here 10, as if other micro-batches held 6 more) is the denominator
    got = weighted_task_loss(sums, weights, 10)
    assert float(got) == pytest.approx((0.5 * row0 + 2.0 * row1) / 10, rel=1e-6)
    assert float(weighted_task_loss(sums, torch.ones(2), counts.sum())) == pytest.approx((row0 + row1) / 4, rel=1e-6)


def test_row_digest_ignores_padding_and_sees_labels():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    labels = torch.tensor([[-100, 6, 7, -100, -100], [-100, -100, -100, 6, 7]])
    a, b = batch_digests({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert a == b  # right and left padding of the same sample
    (c,) = batch_digests({"input_ids": ids[:1, :3], "attention_mask": mask[:1, :3], "labels": torch.tensor([[-100, -100, 7]])})
    assert c != a  # same tokens, other trained positions
    with pytest.raises(GeReConfigError, match="padding_free"):
        batch_digests({"input_ids": ids, "labels": labels})


def test_flow_keys_are_validated():
    with pytest.raises(GeReConfigError, match="gere_flow_tau is set but gere_flow is false"):
        GeReArguments(gere_flow_tau=1.0)
    with pytest.raises(GeReConfigError, match="gere_flow_tau"):
        GeReArguments(gere_flow=True, gere_flow_tau=0.0)
    with pytest.raises(GeReConfigError, match="gere_flow_batch_size"):
        GeReArguments(gere_flow=True, gere_flow_batch_size=0)
    assert GeReArguments(gere_flow=True, gere_flow_tau=2).gere_flow_tau == 2.0


@pytest.mark.parametrize(
    "trainer_args, match",
    [
        (dict(gere_combine="sum"), "SFT trainers only"),
        (dict(gere_family="dpo", gere_combine="sum"), "loss family is 'dpo'"),
        (dict(gere_family="grpo", gere_combine="sum"), "loss family is 'grpo'"),
        (dict(args=types.SimpleNamespace(packing=True)), "packing=False"),
        (dict(args=types.SimpleNamespace(use_liger_kernel=True)), "use_liger_kernel"),
        (dict(args=types.SimpleNamespace(loss_type="dft")), "loss_type='dft'"),
        (dict(compute_loss_func=lambda *a, **k: 0), "compute_loss_func"),
    ],
)
def test_flow_refuses_what_it_cannot_serve(trainer_args, match):
    trainer = types.SimpleNamespace(gere_combine="mean", args=types.SimpleNamespace(), train_dataset=[1])
    for k, v in trainer_args.items():
        setattr(trainer, k, v)
    with pytest.raises(GeReConfigError, match=match) as err:
        check_task_methods(trainer, GeReArguments(gere_flow=True), ["flow"])
    assert "gere_flow" in str(err.value)


# -- inside the trainer ----------------------------------------------------------------------------
def make_trainer(tmp_path, model, tok, dataset, **overrides):
    kw = dict(FAST, gere_flow=True)
    kw.update(overrides)
    return GeReSFTTrainer(model=model, args=sft_config(tmp_path / "out", **kw), train_dataset=dataset, processing_class=tok)


def _batches(trainer, n):
    it = iter(trainer.get_train_dataloader())
    return [trainer._prepare_inputs(next(it)) for _ in range(n)]


def _independent_base_losses(base, trainer):
    """Token-mean CE of every task sample under the base model, one unpadded sample at a time
    (keyed by the sample's tokens), and their median."""
    out, values = {}, []
    with torch.no_grad():
        for i in range(len(trainer.train_dataset)):
            b = trainer.data_collator([{k: v for k, v in trainer.train_dataset[i].items() if k in ("input_ids", "labels", "completion_mask")}])
            logits = base(input_ids=b["input_ids"]).logits
            keep = b["labels"][:, 1:] != -100
            ce = F.cross_entropy(logits[:, :-1][keep], b["labels"][:, 1:][keep])
            out[tuple(b["input_ids"][0].tolist())] = float(ce)
            values.append(float(ce))
    return out, statistics.median(values)


@pytest.mark.parametrize("loss_type", [None, "nll"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_unit_weights_reproduce_trl_loss_exactly(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, accumulation, loss_type):
    """FLOW computes the task loss itself; with every weight 1 it must be TRL's own SFT loss, micro-batch by
    micro-batch, with TRL's scaling for gradient accumulation (TRL 1.9's default chunked loss and nll)."""
    from trl import SFTTrainer

    extra = {} if loss_type is None else {"loss_type": loss_type}
    trainer = make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset, gradient_accumulation_steps=accumulation,
                           per_device_train_batch_size=4 // accumulation, **extra)
    trainer.gere_task.flow.weights = torch.ones_like(trainer.gere_task.flow.weights)
    tiny_model.train()
    batches = _batches(trainer, accumulation)
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.state.global_step = 0
    for b in batches:
        ours = trainer.compute_loss(tiny_model, dict(b), num_items_in_batch=num_items)
        trl = SFTTrainer.compute_loss(trainer, tiny_model, dict(b), num_items_in_batch=num_items)
        assert ours.item() == pytest.approx(trl.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_flow_loss_equals_independent_computation(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, accumulation):
    """The summed micro-batch losses of one optimizer step equal sum_i w_i * ce_sum_i / N_step, with the base
    losses, tau (median) and weights recomputed here from a separate copy of the base model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    trainer = make_trainer(tmp_path, model, tiny_tokenizer, sft_dataset, gradient_accumulation_steps=accumulation,
                           per_device_train_batch_size=4 // accumulation, gere_flow_cache=str(tmp_path / "flow"))
    base_losses, tau = _independent_base_losses(base, trainer)
    assert trainer.gere_task.flow.tau == pytest.approx(tau, rel=1e-5)

    with torch.no_grad():  # the model now differs from the base the weights came from
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model.train()
    batches = _batches(trainer, accumulation)
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.state.global_step = 0
    got = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=num_items) for b in batches)

    expected = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            for r in range(b["input_ids"].shape[0]):
                real = b["attention_mask"][r].bool()
                w = math.exp(-base_losses[tuple(b["input_ids"][r][real].tolist())] / tau)
                keep = b["labels"][r, 1:] != -100
                expected += w * float(F.cross_entropy(logits[r, :-1][keep], b["labels"][r, 1:][keep], reduction="sum"))
    assert float(got) == pytest.approx(expected / float(num_items), rel=1e-5)
    assert trainer._metrics["train"]["gere/flow_weight"]  # the step's weights were logged
    assert (tmp_path / "flow" / "meta.json").is_file()


def test_flow_with_gere_replay_combines_as_documented(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, replay_file):
    """FLOW + replay: loss = mean(FLOW task loss, replay CE); gere/task_loss is the weighted task loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    trainer = make_trainer(tmp_path, model, tiny_tokenizer, sft_dataset, gere_replay=str(replay_file),
                           gere_regularizer="none", gere_state_cache=str(tmp_path / "cache"))
    model.train()
    (b,) = _batches(trainer, 1)
    n = (b["labels"][:, 1:] != -100).sum()
    trainer.current_gradient_accumulation_steps = 1
    trainer.state.global_step = 0
    loss = trainer.compute_loss(model, dict(b), num_items_in_batch=n)
    m = trainer._metrics["train"]
    with torch.no_grad():
        sums, counts = per_row_ce(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    weights = trainer.gere_task.flow.lookup(batch_digests(b))
    assert m["gere/task_loss"][-1] == pytest.approx(float((weights * sums).sum() / counts.sum()), rel=1e-5)
    assert float(loss) == pytest.approx(0.5 * (m["gere/task_loss"][-1] + m["gere/replay_ce"][-1]), rel=1e-5)


def test_flow_cache_is_reused_and_never_replaced(tmp_path, tiny_dir, tiny_tokenizer, sft_dataset, capsys, caplog):
    import logging

    from transformers import AutoModelForCausalLM

    caplog.set_level(logging.INFO, logger="gere_plugin")

    first = make_trainer(tmp_path, AutoModelForCausalLM.from_pretrained(str(tiny_dir)), tiny_tokenizer, sft_dataset,
                         max_steps=2)
    assert first.gere_task.flow_action == "built"
    first.train()
    # the train-start line: on stderr, or as a log record where an earlier test installed a handler
    assert "FLOW weights exp(-base_loss/" in capsys.readouterr().err + caplog.text
    logged = [h for h in first.state.log_history if "loss" in h]
    assert all("gere/flow_weight" in h and "gere/flow_ce" in h and "gere/task_loss" in h for h in logged)
    # gere/flow_ce is the older name of gere/task_ce (the unweighted CE), kept for FLOW runs
    assert all(h["gere/task_ce"] == h["gere/flow_ce"] for h in logged)
    folder = tmp_path / "out" / "gere_flow"
    meta = (folder / "meta.json").read_bytes()
    assert json.loads(meta)["kind"] == "gere_flow"

    # same starting model, same rows: reused, untouched
    again = make_trainer(tmp_path, AutoModelForCausalLM.from_pretrained(str(tiny_dir)), tiny_tokenizer, sft_dataset)
    assert again.gere_task.flow_action == "reused" and (folder / "meta.json").read_bytes() == meta
    # another starting model (the trained one): refused, never replaced
    with pytest.raises(StateCacheError, match="gere_flow_cache=.*model weights"):
        make_trainer(tmp_path, first.model, tiny_tokenizer, sft_dataset)
    assert (folder / "meta.json").read_bytes() == meta
    # a folder with user files is never touched
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(StateCacheError, match="gere_flow_cache=.*not empty"):
        make_trainer(tmp_path, AutoModelForCausalLM.from_pretrained(str(tiny_dir)), tiny_tokenizer, sft_dataset,
                     gere_flow_cache=str(user))
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


def test_unknown_training_row_is_an_error(tmp_path, tiny_model, tiny_tokenizer, sft_dataset):
    trainer = make_trainer(tmp_path, tiny_model, tiny_tokenizer, sft_dataset)
    (b,) = _batches(trainer, 1)
    b = dict(b, input_ids=b["input_ids"].flip(1))  # rows the base-loss pass never saw
    tiny_model.train()
    with pytest.raises(GeReConfigError, match="not in the base-loss pass"):
        trainer.compute_loss(tiny_model, b, num_items_in_batch=None)
