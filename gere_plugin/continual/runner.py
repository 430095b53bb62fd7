"""The sequence runner: :func:`run_sequence` fine-tunes task after task on one model, evaluating after each,
and :func:`build_trainer` makes the trainer of one stage (a GeRe SFT trainer, or an external baseline's)."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..evaluation.general import GeneralEvalConfig
from ..evaluation.metrics import continual_summary
from ..methods.wise import trainable_snapshot
from .cost import PeakMemory, step_clock
from .presets import EARLIER_TASK_KEYS, METHODS, STRENGTH_SETTINGS, MethodSpec, SequenceTask
from .settings import TrainSettings
from .stage import (
    cache_state,
    evaluate_stage,
    load_model,
    load_tokenizer,
    model_fingerprint,
    record_training,
    score_items,
    task_replay_record,
)
from .task_rows import keep_task_sample, tokenized_without_eos

logger = logging.getLogger("gere_plugin.continual")

__all__ = ["SequenceRun", "build_trainer", "run_sequence"]


# ---------------------------------------------------------------------------------------------
# One stage's trainer
# ---------------------------------------------------------------------------------------------
def _quiet(trainer: Any, settings: TrainSettings) -> Any:
    """``trainer`` without TRL's printed logs when ``settings.print_logs`` is off."""
    if not settings.print_logs:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def stage_gere_keys(
    method: MethodSpec,
    task_index: int,
    settings: TrainSettings,
    replay: Optional[str],
    state_cache: Optional[Path],
    seed: int,
    ewc_state: Optional[Path] = None,
    task_replay: Sequence[Path] = (),
) -> dict[str, Any]:
    """The ``gere_*`` keys of task ``task_index``: the shared settings of what the method uses (earlier-task
    replay, general replay, monitor), then the method's own keys, then an explicit strength setting."""
    gere: dict[str, Any] = {}
    gere_seed = settings.gere_seed if settings.gere_seed is not None else seed
    if task_replay:
        gere.update(
            gere_task_replay=[str(p) for p in task_replay],
            gere_task_replay_size=settings.gere_task_replay_size,
            gere_task_replay_per_step=settings.gere_task_replay_per_step,
            gere_task_replay_weight=settings.gere_task_replay_weight,
            gere_task_replay_topk=settings.gere_task_replay_topk,
            gere_seed=gere_seed,
        )
    if method.replay:
        if replay is None:
            raise ValueError(f"method {method.name!r} replays general samples: pass replay=PATH")
        gere.update(
            gere_replay=str(replay),
            gere_replay_size=settings.gere_replay_size,
            gere_replay_max_length=settings.gere_replay_max_length,
            gere_replay_per_step=settings.gere_replay_per_step,
            gere_weight=settings.gere_weight,
            gere_state_cache=str(state_cache) if state_cache is not None else None,
            gere_state_batch_size=settings.gere_state_batch_size,
            gere_seed=gere_seed,
        )
    if settings.gere_monitor is not None:
        gere.update(
            gere_monitor=str(settings.gere_monitor),
            gere_monitor_size=settings.gere_monitor_size,
            gere_monitor_steps=settings.gere_monitor_steps,
            gere_monitor_max_length=settings.gere_monitor_max_length,
            gere_monitor_task_size=settings.gere_monitor_task_size,
            # every method (plain too) draws the same monitor texts and training rows
            gere_seed=gere_seed,
        )
    gere.update(method.gere_kwargs(task_index))  # the method's own keys win over the shared settings
    for key, uses in STRENGTH_SETTINGS.items():
        if getattr(settings, key) is not None and uses in method.uses:
            gere[key] = getattr(settings, key)  # ... except an explicit strength for a key the method uses
    if not task_replay:  # no earlier task to replay (the first task): nothing for their share or logits to act on
        for key in EARLIER_TASK_KEYS:
            gere.pop(key, None)
    if ewc_state is not None:
        gere["gere_ewc_state"] = str(ewc_state)
    return gere


def build_trainer(
    model: torch.nn.Module,
    tokenizer: Any,
    task: SequenceTask,
    method: MethodSpec,
    task_index: int,
    settings: TrainSettings,
    replay: Optional[str],
    state_cache: Optional[Path],
    output_dir: Path,
    seed: int,
    ref_model: Optional[torch.nn.Module],
    ewc_state: Optional[Path] = None,
    num_tasks: int = 1,
    task_replay: Sequence[Path] = (),
    gere_overrides: Optional[dict[str, Any]] = None,
) -> Any:
    """The trainer of task ``task_index``: the external baseline's own trainer, or a GeRe SFT trainer with the
    method's keys (:func:`stage_gere_keys`), then ``gere_overrides``."""
    from datasets import Dataset

    from ..trainer.sft import GeReSFTConfig

    rows = task.train if settings.completion_eos else tokenized_without_eos(task.train, tokenizer)
    if method.external is not None:
        from .baselines import build_baseline_trainer

        return _quiet(build_baseline_trainer(method.external, model, tokenizer, task.train, settings, output_dir, seed,
                                             task_index, num_tasks, sft_rows=rows), settings)
    gere = stage_gere_keys(method, task_index, settings, replay, state_cache, seed, ewc_state, task_replay)
    gere.update(gere_overrides or {})
    cfg = GeReSFTConfig(
        **settings.training_args(output_dir, seed),
        max_length=settings.max_length,
        **gere,
        **settings.extra_config,
    )
    if not settings.completion_eos and any("completion_mask" in r for r in rows):
        cfg.completion_only_loss = True  # TRL infers it only from prompt/completion columns
    ds = Dataset.from_list(rows)
    trainer = _make_trainer(model, tokenizer, cfg, ds, method, ref_model)
    if settings.grad_diagnostics and getattr(trainer, "gere_step", None) is not None:
        trainer.gere_step.grad_diagnostics = True
    return _quiet(trainer, settings)


def _make_trainer(model: torch.nn.Module, tokenizer: Any, cfg: Any, ds: Any, method: MethodSpec,
                  ref_model: Optional[torch.nn.Module]) -> Any:
    from ..trainer.sft import GeReSFTTrainer

    # l1/l2/kl and the task KL: the reference is the ORIGINAL base model, not this task's starting weights.
    return GeReSFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer,
                          gere_ref_model=ref_model if method.needs_base_reference else None)


# ---------------------------------------------------------------------------------------------
# The sequence
# ---------------------------------------------------------------------------------------------
def check_sequence(tasks: Sequence[SequenceTask], spec: MethodSpec, settings: TrainSettings) -> list[str]:
    """The task names, after refusing an empty sequence, repeated names and a strength setting the method
    does not use."""
    if not tasks:
        raise ValueError("run_sequence needs at least one task")
    for key, uses in STRENGTH_SETTINGS.items():
        if getattr(settings, key) is not None and uses not in spec.uses:
            from ..config import GeReConfigError

            users = sorted(name for name, m in METHODS.items() if uses in m.uses)
            raise GeReConfigError(
                f"{key} sets the strength of methods with {uses} ({', '.join(users)}); method {spec.name!r} does not "
                f"use it. Pick one of those methods or drop {key}."
            )
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    if spec.wise_candidates(settings.wise_alphas):
        from ..config import GeReConfigError

        if "wise" not in spec.uses:
            users = sorted(name for name, m in METHODS.items() if "wise" in m.uses)
            raise GeReConfigError(
                f"wise_alphas chooses gere_wise_alpha for the WiSE-FT methods ({', '.join(users)}); method "
                f"{spec.name!r} does not interpolate. Pick one of those methods or drop wise_alphas."
            )
        if settings.gere_wise_alpha is not None:
            raise GeReConfigError(
                f"gere_wise_alpha={settings.gere_wise_alpha} fixes WiSE-FT's alpha, but method {spec.name!r} chooses "
                "it after every task on the dev items (wise_alphas). Drop gere_wise_alpha, or pick a preset with a "
                "fixed alpha (e.g. der_paper_wise instead of der_paper_wise_tuned)."
            )
        no_dev = [t.name for t in tasks if not t.dev]
        if no_dev:
            raise GeReConfigError(
                f"method {spec.name!r} chooses WiSE-FT's alpha on the dev split (wise_alphas), but task(s) "
                f"{', '.join(no_dev)} have no dev items. Give every task dev items, or pick a preset with a fixed alpha "
                "(drop wise_alphas)."
            )
    return names


def write_result(result: dict[str, Any], result_path: Optional[Union[str, Path]]) -> None:
    """Write ``result`` as JSON to ``result_path`` atomically (nothing when it is ``None``)."""
    if result_path is not None:
        path = Path(result_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
        os.replace(tmp, path)


class SequenceRun:
    """One call of :func:`run_sequence`: what every stage shares, the result being filled in, and what is
    carried from task to task (the EWC state, the kept samples of finished tasks)."""

    def __init__(self, tasks: Sequence[SequenceTask], spec: MethodSpec, settings: TrainSettings, out_dir: Path,
                 tokenizer: Any, cache: Optional[Path], replay: Optional[Union[str, Path]], seed: int,
                 general: Optional[GeneralEvalConfig], ref_model: Optional[torch.nn.Module]) -> None:
        self.tasks, self.spec, self.settings, self.out_dir = tasks, spec, settings, out_dir
        self.tokenizer, self.cache, self.seed, self.general, self.ref_model = tokenizer, cache, seed, general, ref_model
        self.replay = str(replay) if replay is not None else None
        self.names = [t.name for t in tasks]
        self.ewc_state: Optional[Path] = None  # the EWC state of the tasks so far, handed to the next one
        self.kept: list[Path] = []  # earlier tasks' kept samples (methods with task_replay)
        self.keep_seed = settings.gere_seed if settings.gere_seed is not None else seed
        self.result: dict[str, Any] = {}

    def start(self, base: dict[str, Any]) -> dict[str, Any]:
        """The result before the first stage: the run's identity, settings and base evaluation."""
        spec, settings = self.spec, self.settings
        self.result = {
            "method": spec.name,
            "method_spec": dataclasses.asdict(spec),
            "seed": self.seed,
            "tasks": self.names,
            "settings": dataclasses.asdict(settings),
            "replay": self.replay,
            "state_cache": str(self.cache) if spec.replay else None,
            "task_replay": {
                "per_task": settings.gere_task_replay_size,
                "per_step": settings.gere_task_replay_per_step,
                "weight": settings.gere_task_replay_weight,
                "folder": str(self.out_dir / "task_replay"),
                "logit_weight": self.logit_weight if spec.logit_replay else None,
                "topk": settings.gere_task_replay_topk if spec.logit_replay else None,
                "kept": {},
            } if spec.task_replay else None,
            "base": base,
            "base_row": [base["tasks"][n] for n in self.names],
            "stages": [],
            "matrix": [],
        }
        return self.result

    def stage(self, k: int, net: torch.nn.Module) -> tuple[dict[str, Any], torch.nn.Module]:
        """Train task ``k`` on ``net``, keep its sample, evaluate; return the stage record and the trained model."""
        task = self.tasks[k]
        stage: dict[str, Any] = {"task": task.name, "index": k}
        stage["start_fingerprint"] = model_fingerprint(net)
        stage["state_cache_before"] = cache_state(self.cache) if self.spec.replay else None
        net = self.train(stage, k, net)  # the trainer is gone when this returns ...
        gc.collect()  # ... and its optimizer state freed before evaluating
        if self.spec.task_replay and k < len(self.tasks) - 1:
            self.keep_sample(k, net)
        stage["end_fingerprint"] = model_fingerprint(net)
        is_last = k == len(self.tasks) - 1
        general = self.general if is_last or self.settings.general_every_task else None
        stage["eval"] = evaluate_stage(net, self.tokenizer, self.tasks, general, self.settings.eval_batch_size)
        self.result["matrix"].append([stage["eval"]["tasks"][n] for n in self.names])
        self.result["stages"].append(stage)
        return stage, net

    def train(self, stage: dict[str, Any], k: int, net: torch.nn.Module) -> torch.nn.Module:
        """Build task ``k``'s trainer and train, recording set-up and training cost; return the model to carry on."""
        task = self.tasks[k]
        memory = PeakMemory().__enter__()  # from before the trainer exists: reference copies count
        t_setup = time.perf_counter()
        # alpha chosen on the dev split: the trainer trains without WiSE-FT and select_wise interpolates after
        choose = bool(self.spec.wise_candidates(self.settings.wise_alphas))
        try:
            trainer = build_trainer(
                net, self.tokenizer, task, self.spec, k, self.settings, self.replay, self.cache,
                self.out_dir / f"task_{k}_{task.name}", self.seed, self.ref_model, self.ewc_state, len(self.tasks),
                task_replay=self.kept, gere_overrides={"gere_wise_alpha": None} if choose else None,
            )
            wise_start = trainable_snapshot(trainer.model) if choose else None
        except BaseException:
            memory.__exit__(None, None, None)
            raise
        # one-time work before the first step (state-cache build, FLOW's base-loss pass, reference copies);
        # EWC's Fisher pass runs inside train() and is part of train_seconds
        stage["setup_seconds"] = time.perf_counter() - t_setup
        if self.spec.task_replay:
            stage["task_replay"] = task_replay_record(trainer)
        stage["trainable_params"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
        clock = step_clock()
        trainer.add_callback(clock)
        t0 = time.perf_counter()
        try:
            train_out = trainer.train()
        finally:
            memory.__exit__(None, None, None)
        record_training(stage, trainer, train_out, time.perf_counter() - t0, clock.seconds, memory)
        stage["state_cache_after"] = cache_state(self.cache) if self.spec.replay else None
        before, after = stage["state_cache_before"], stage["state_cache_after"]
        stage["state_cache_reused"] = bool(before and before.get("exists") and before == after)
        self.record_task_methods(stage, trainer)
        if wise_start is not None:
            stage["wise"] = self.select_wise(k, trainer.model, wise_start)
        if self.spec.external is not None:
            from .baselines import model_after_training

            return model_after_training(self.spec.external, trainer)
        return trainer.model

    def record_task_methods(self, stage: dict[str, Any], trainer: Any) -> None:
        """What the methods without replay did (FLOW's weights, EWC's states, WiSE-FT's interpolation); hands
        EWC's state on."""
        task_step = getattr(trainer, "gere_task", None)
        if task_step is None:
            return
        stage["task_methods"] = task_step.methods
        if task_step.flow is not None:
            stage["flow"] = dict(task_step.flow.summary(), base_losses=task_step.flow_action)
        if task_step.ewc is not None:
            stage["ewc_state_used"] = str(self.ewc_state) if self.ewc_state is not None else None
            self.ewc_state = task_step.ewc.written
            stage["ewc_state_written"] = str(self.ewc_state) if self.ewc_state is not None else None
        wise = task_step.term("wise")
        if wise is not None:
            stage["wise"] = dict(wise.summary)  # type: ignore[attr-defined]

    def select_wise(self, k: int, model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, Any]:
        """WiSE-FT with alpha chosen on the dev split: every candidate of :meth:`MethodSpec.wise_candidates` (and 1.0) is
        applied to the trained weights, scored on the dev items of task ``k`` and of the earlier tasks, and the
        one :func:`~gere_plugin.continual.wise_select.select_wise_alpha` picks is kept (the test split is not
        read). Cost: one more host copy of the trainable weights, and one dev evaluation of the tasks so far
        per candidate."""
        from ..methods.wise import fresh_adapter_partners, interpolate_
        from .wise_select import select_wise_alpha

        t0 = time.perf_counter()
        after = trainable_snapshot(model)
        params = {n: p for n, p in model.named_parameters() if n in before}
        keep = fresh_adapter_partners(before)

        def set_alpha(alpha: float) -> None:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(after[n].to(p.device))
            interpolate_(params, before, alpha, keep)

        def dev(task: SequenceTask) -> float:
            res = score_items(model, self.tokenizer, task.dev, self.settings.eval_batch_size, task.max_new_tokens)
            return 100.0 * res["accuracy"]

        candidates = sorted(set(self.spec.wise_candidates(self.settings.wise_alphas)) | {1.0})
        current: dict[float, float] = {}
        earlier: dict[float, list[float]] = {}
        for alpha in candidates:
            set_alpha(alpha)
            current[alpha] = dev(self.tasks[k])
            earlier[alpha] = [dev(t) for t in self.tasks[:k]]
        chosen = select_wise_alpha(current, earlier)
        set_alpha(chosen)
        return {"alpha": chosen, "candidates": candidates, "current_dev": [current[a] for a in candidates],
                "earlier_dev": [earlier[a] for a in candidates], "seconds": time.perf_counter() - t0}

    @property
    def logit_weight(self) -> float:
        """Logit replay's ``beta`` (an explicit setting wins over the preset's)."""
        given = self.settings.gere_task_replay_logit_weight
        return float(given if given is not None else dict(self.spec.gere).get("gere_task_replay_logit_weight", 0.0))

    def keep_sample(self, k: int, net: torch.nn.Module) -> None:
        """Keep task ``k``'s sample for the later tasks' earlier-task replay and, with logit replay, the
        model's top-k log-probabilities on it (``net`` as task ``k`` left it)."""
        task = self.tasks[k]
        path, n = keep_task_sample(task, self.tokenizer, self.settings, self.keep_seed, k, self.out_dir / "task_replay")
        self.kept.append(path)
        kept: dict[str, Any] = {"rows": n, "of": len(task.train), "path": str(path)}
        if self.spec.logit_replay and self.logit_weight > 0:
            kept["logit_snapshot"] = self.keep_logits(path, net)
        self.result["task_replay"]["kept"][task.name] = kept

    def keep_logits(self, path: Path, net: torch.nn.Module) -> dict[str, Any]:
        """Write ``net``'s top-k snapshot of the kept rows at ``path`` beside them (as the next trainers read them:
        completion-only, truncated to ``max_length``), through the model's forward as it stands, with no autocast
        added (measured on SmolLM2-135M after a bf16 task: the same snapshot bytes with and without an added bf16
        autocast, i.e. the forward already runs as in training)."""
        from ..data.task_rows import Tokenization
        from ..methods.logit_replay import snapshot_summary, write_logit_snapshot
        from ..model.introspection import pad_token_id

        settings = self.settings
        how = Tokenization(add_eos=True, completion_only=True, max_length=settings.max_length)
        t0 = time.perf_counter()
        written = write_logit_snapshot(net, path, self.tokenizer, how, settings.gere_task_replay_topk,
                                       pad_token_id(self.tokenizer), settings.eval_batch_size, key="--out")
        return dict(snapshot_summary(written), seconds=time.perf_counter() - t0)


def run_sequence(
    model: Union[str, Path, torch.nn.Module],
    tasks: Sequence[SequenceTask],
    method: Union[str, MethodSpec],
    output_dir: Union[str, Path],
    tokenizer: Any = None,
    settings: Optional[TrainSettings] = None,
    replay: Optional[Union[str, Path]] = None,
    state_cache: Optional[Union[str, Path]] = None,
    seed: int = 42,
    general: Optional[GeneralEvalConfig] = None,
    base_eval: Optional[dict[str, Any]] = None,
    result_path: Optional[Union[str, Path]] = None,
    save_final_model: bool = False,
    on_stage: Optional[Callable[[dict[str, Any]], None]] = None,
) -> dict[str, Any]:
    """Fine-tune ``tasks`` in order with ``method``, evaluating after every task.

    Args:
        model: base model folder or an in-memory causal LM (trained in place and carried forward).
        tasks: the sequence; each has TRL SFT ``train`` rows and label-word ``test`` items.
        method: a key of :data:`METHODS` or a :class:`MethodSpec`.
        output_dir: trainer output folders go to ``output_dir/task_<k>_<name>``.
        tokenizer: tokenizer object or folder (defaults to the model folder).
        settings: shared hyper-parameters (:class:`TrainSettings`).
        replay: replay source for replay methods (e.g. a ``.jsonl`` with a ``text`` field).
        state_cache: GeRe base-state cache folder, shared by all tasks (and by runs with the same
            replay set and ``seed``). Default ``output_dir/gere_states``.
        seed: training seed (data order, replay schedule ``gere_seed``).
        general: what general-ability evaluation to run (``None`` = task accuracies only).
        base_eval: a previous :func:`evaluate_stage` of the untrained base model, to skip re-running it.
        result_path: where to write the result JSON (also written after every stage).
        save_final_model: also ``save_pretrained`` the final model to ``output_dir/final``.
        on_stage: callback receiving each stage record as soon as it is finished.

    Returns:
        The result dict: ``method``, ``seed``, ``tasks``, ``matrix`` (``R[i][j]``), ``base_row``,
        ``base``, ``stages`` (per task: fingerprints, state-cache reuse, train history, evaluation, and
        cost: ``setup_seconds``, ``train_seconds``, ``step_seconds`` (each optimizer step's wall time,
        :func:`step_clock`), ``train_outside_steps_seconds`` and ``memory`` (:class:`PeakMemory`)),
        ``final`` and ``summary`` (AA/AP/BWT/FWT/FM/F1).
    """
    settings = settings or TrainSettings()
    spec = METHODS[method] if isinstance(method, str) else method
    check_sequence(tasks, spec, settings)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from ..cache.folders import state_cache_folder

    cache = state_cache_folder(state_cache, out_dir)  # the trainers' default-folder rule
    tok = load_tokenizer(tokenizer, model)
    net = load_model(model)

    t_start = time.perf_counter()
    base = base_eval if base_eval is not None else evaluate_stage(net, tok, tasks, general, settings.eval_batch_size)
    ref_model = None
    if spec.needs_base_reference:
        from ..trainer import frozen_copy

        ref_model = frozen_copy(net)
    run = SequenceRun(tasks, spec, settings, out_dir, tok, cache, replay, seed, general, ref_model)
    result = run.start(base)
    for k, task in enumerate(tasks):
        stage, net = run.stage(k, net)
        logger.info("continual %s seed %d: after %s -> %s", spec.name, seed, task.name, stage["eval"]["tasks"])
        if on_stage is not None:
            on_stage(stage)
        write_result(result, result_path)

    result["final"] = result["stages"][-1]["eval"]
    general_score = result["final"].get("general", {}).get("general_score")
    result["summary"] = continual_summary(result["matrix"], result["base_row"], general_score)
    result["seconds"] = time.perf_counter() - t_start
    if save_final_model:
        net.save_pretrained(str(out_dir / "final"))
        tok.save_pretrained(str(out_dir / "final"))
    write_result(result, result_path)
    return result
