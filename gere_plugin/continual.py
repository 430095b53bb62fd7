"""Continual fine-tuning over a sequence of tasks, evaluated after every task.

:func:`run_sequence` fine-tunes task after task on ONE model object that is carried forward (task
``k`` starts from task ``k-1``'s weights), evaluates every task and (optionally) general ability
after each stage, and returns / writes a result dict with the accuracy matrix ``R[i][j]``.

GeRe's base-model state cache is built once from the ORIGINAL base model (during the first task) and
reused by every later task through the same ``gere_state_cache`` folder; the l1/l2/kl baselines are
given a frozen copy of the original base model as their reference for every task.

Method presets (:data:`METHODS`):

=============== ===================================================================================
``plain``       plain SFT (no replay)
``replay``      vanilla GeRe replay: replay CE only (``gere_regularizer="none"``)
``kl``          replay + logit KL to the base model
``l1`` / ``l2`` replay + L1 / L2 distance of hidden states to the base model
``gere``        replay + threshold-margin loss on the base model's 3-way state labels (package defaults)
``gere_paper``  ``gere`` with the paper's exact weighting (:data:`PAPER_WEIGHTING`)
``gere_freeze`` ``gere`` + frozen embeddings and bottom layers from the second task on
``flow``        FLOW: task samples weighted by ``exp(-base_loss / tau)`` (no replay), each task's weights
                from the model that task starts from
``ewc``         online EWC: Fisher of each finished task, penalty ``lambda/2 sum F (theta - theta*)^2`` on
                the next ones (no replay; :data:`EWC_LAMBDA`)
``task_kl``     KL(base || model) on the task rows' trained tokens (ASFT's anchor; no replay;
                :data:`TASK_KL_WEIGHT`), against the ORIGINAL base model
``gere_flow``   ``gere`` + FLOW weights on the task rows
``gere_ewc``    ``gere`` + EWC
``sdft``        TRL's own SDFT trainer (external baseline, :mod:`gere_plugin.baselines`)
``osf``         PEFT's OSF adapter trained with TRL's SFTTrainer, merged after each task (external baseline)
``gere_er``     ``gere`` + experience replay of earlier tasks (``gere_task_replay*`` keys)
``replay_er``   ``replay`` + experience replay of earlier tasks (ablation: no TM)
``plain_er``    experience replay of earlier tasks only (ablation: no general replay)
=============== ===================================================================================

The EWC state written at the end of task ``k`` (``<task k output>/gere_ewc``) is handed to task ``k + 1``
as ``gere_ewc_state``; ``TrainSettings.gere_ewc_lambda`` / ``gere_task_kl`` override the presets' strengths.

Methods with earlier-task replay (``task_replay=True``) keep, after every finished task, a seeded
sample of at most ``gere_task_replay_size`` of its training rows as token ids (tokenized exactly as
the task trained on them) in ``output_dir/task_replay/<k>_<name>.jsonl``; every later task replays
all kept files through ``gere_task_replay``. The result records the budget and what was kept.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .evaluation.general import GeneralEvalConfig, evaluate_general
from .evaluation.metrics import continual_summary
from .evaluation.tasks import ClassificationItem, label_accuracy

logger = logging.getLogger(__name__)

__all__ = ["EWC_LAMBDA", "METHODS", "TASK_KL_WEIGHT", "MethodSpec", "SequenceTask", "TrainSettings", "evaluate_stage", "model_fingerprint",
           "run_sequence"]


@dataclass(frozen=True)
class MethodSpec:
    """How one method trains. ``replay`` is the general replay (``gere_replay``); ``task_replay`` replays
    kept samples of the earlier tasks of the sequence (``gere_task_replay``). ``freeze_from`` is the 0-based
    task index where freezing starts; ``gere`` holds extra ``gere_*`` keys of the method (e.g. its
    weighting), as ``(key, value)`` pairs."""

    name: str
    replay: bool
    regularizer: str = "tm"
    freeze_layers: int = 0
    freeze_embeddings: bool = False
    freeze_from: int = 1
    gere: tuple[tuple[str, Any], ...] = ()
    external: Optional[str] = None  # an external baseline of gere_plugin.baselines ("sdft", "osf")
    task_replay: bool = False

    def gere_kwargs(self, task_index: int) -> dict[str, Any]:
        """The ``gere_*`` regularizer/freeze keys for task ``task_index`` (replay source added by the caller)."""
        freeze = task_index >= self.freeze_from
        out = {
            "gere_regularizer": self.regularizer if self.replay else "none",
            "gere_freeze_layers": self.freeze_layers if freeze else 0,
            "gere_freeze_embeddings": self.freeze_embeddings if freeze else False,
        }
        out.update(dict(self.gere))  # the method's own keys (weighting, FLOW, EWC, task KL)
        return out

    @property
    def uses(self) -> list[str]:
        """The methods without replay this preset switches on (``flow``, ``ewc``, ``task_kl``)."""
        from .config import task_methods

        return task_methods(dict(self.gere))

    @property
    def needs_base_reference(self) -> bool:
        """Whether the method compares with the ORIGINAL base model (replay l1/l2/kl, task KL)."""
        return (self.replay and self.regularizer in ("l1", "l2", "kl")) or "task_kl" in self.uses


#: The paper's exact TM weighting: w = CE / TM, unbounded, TM reduced over its non-zero elements.
PAPER_WEIGHTING: tuple[tuple[str, Any], ...] = (
    ("gere_tm_reduction", "violations"), ("gere_weight", "dynamic"), ("gere_weight_max", None),
)

#: The feature-distillation baselines keep the paper's dynamic weight whatever the package default is.
FD_WEIGHTING: tuple[tuple[str, Any], ...] = (("gere_weight", "dynamic"), ("gere_weight_max", None))

#: EWC strength of the ``ewc`` presets (not tuned on any benchmark yet: override with
#: ``TrainSettings.gere_ewc_lambda`` / ``gere sequence --gere_ewc_lambda``).
EWC_LAMBDA = 1000.0
#: Task-KL weight of the ``task_kl`` preset: LLaMA-Factory's default ``asft_alpha``.
TASK_KL_WEIGHT = 0.1

METHODS: dict[str, MethodSpec] = {
    "plain": MethodSpec("plain", replay=False, regularizer="none"),
    "replay": MethodSpec("replay", replay=True, regularizer="none"),
    "kl": MethodSpec("kl", replay=True, regularizer="kl", gere=FD_WEIGHTING),
    "l1": MethodSpec("l1", replay=True, regularizer="l1", gere=FD_WEIGHTING),
    "l2": MethodSpec("l2", replay=True, regularizer="l2", gere=FD_WEIGHTING),
    "gere": MethodSpec("gere", replay=True, regularizer="tm"),
    "gere_paper": MethodSpec("gere_paper", replay=True, regularizer="tm", gere=PAPER_WEIGHTING),
    "gere_freeze": MethodSpec("gere_freeze", replay=True, regularizer="tm", freeze_layers=3, freeze_embeddings=True),
    "flow": MethodSpec("flow", replay=False, regularizer="none", gere=(("gere_flow", True),)),
    "ewc": MethodSpec("ewc", replay=False, regularizer="none", gere=(("gere_ewc_lambda", EWC_LAMBDA),)),
    "task_kl": MethodSpec("task_kl", replay=False, regularizer="none", gere=(("gere_task_kl", TASK_KL_WEIGHT),)),
    "gere_flow": MethodSpec("gere_flow", replay=True, regularizer="tm", gere=(("gere_flow", True),)),
    "gere_ewc": MethodSpec("gere_ewc", replay=True, regularizer="tm", gere=(("gere_ewc_lambda", EWC_LAMBDA),)),
    "sdft": MethodSpec("sdft", replay=False, regularizer="none", external="sdft"),
    "osf": MethodSpec("osf", replay=False, regularizer="none", external="osf"),
    "gere_er": MethodSpec("gere_er", replay=True, regularizer="tm", task_replay=True),
    "replay_er": MethodSpec("replay_er", replay=True, regularizer="none", task_replay=True),
    "plain_er": MethodSpec("plain_er", replay=False, regularizer="none", task_replay=True),
}

#: TrainSettings fields that override a preset's strength (only for presets that use the key).
STRENGTH_SETTINGS = {"gere_ewc_lambda": "ewc", "gere_task_kl": "task_kl"}


@dataclass
class SequenceTask:
    """One task of the sequence: TRL SFT rows (prompt/completion or text) and label-word test items.

    ``dev`` holds held-out items for choosing hyper-parameters (never the test items); may be empty.
    """

    name: str
    train: list[dict[str, str]]
    test: list[ClassificationItem]
    dev: list[ClassificationItem] = field(default_factory=list)

    @classmethod
    def from_label_task(cls, task: Any) -> SequenceTask:
        """From an :class:`gere_plugin.assets.LabelTask` (or anything with name/train/test[/dev])."""
        return cls(name=task.name, train=list(task.train), test=list(task.test), dev=list(getattr(task, "dev", [])))


def _gere_field(name: str, default: Any) -> Any:
    """A ``TrainSettings`` field for the ``gere_*`` key ``name``: help text and validation come from
    :class:`~gere_plugin.GeReArguments` (the one definition); only the default is the sequence's own."""
    from .config import gere_fields

    source = next(f for f in gere_fields() if f.name == name)
    return field(default=default, metadata=dict(source.metadata))


def _train_field(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainSettings:
    """Training hyper-parameters shared by every task and method of a sequence.

    Every field is spelled as the setting it feeds: TRL / transformers training arguments
    (``max_steps``, ``learning_rate``, ``per_device_train_batch_size``, ...) and ``gere_*`` keys of
    :class:`~gere_plugin.GeReArguments` (help and validation from there; only the defaults suit short
    sequences). ``gere_seed=None`` uses the training seed; fixing it lets runs with different training
    seeds share one base-state cache. ``gere_monitor`` turns the forgetting monitor on for every method
    (plain included; the same texts and training rows for all, drawn with ``gere_seed``); its values are
    kept in each stage's ``history``. ``gere sequence`` generates its flags from these fields.
    The old names (``steps_per_task``, ``batch_size``, ``replay_size``, ``replay_max_length``,
    ``replay_per_step``, ``replay_seed``, ``state_batch_size``) still work, with a deprecation warning.
    """

    max_steps: int = _train_field(30, "Optimizer steps per task.")
    learning_rate: float = _train_field(2e-4, "Peak learning rate.")
    per_device_train_batch_size: int = _train_field(8, "Task rows per micro-batch and process.")
    gradient_accumulation_steps: int = _train_field(1, "Micro-batches per optimizer step.")
    max_length: int = _train_field(128, "Task rows are truncated to this many tokens.")
    warmup_ratio: float = _train_field(0.1, "Linear warm-up over this share of max_steps (0.1 = 10%).")
    warmup_steps: int = _train_field(0, "Linear warm-up steps; > 0 overrides warmup_ratio.")
    lr_scheduler_type: str = _train_field("cosine", "transformers scheduler name (cosine, linear, constant, ...).")
    weight_decay: float = _train_field(0.0, "AdamW weight decay.")
    bf16: bool = _train_field(False, "Train in bf16 mixed precision.")
    completion_eos: bool = _train_field(
        False, "Append EOS to prompt/completion rows (TRL's default) and train on it; false (default) = the loss "
        "is on the completion's own tokens only (for label-word tasks: the label).")
    logging_steps: int = _train_field(5, "Log every this many optimizer steps.")
    gere_replay_size: Optional[int] = _gere_field("gere_replay_size", None)
    gere_replay_max_length: int = _gere_field("gere_replay_max_length", 128)
    gere_replay_per_step: int = _gere_field("gere_replay_per_step", 2)
    gere_weight: str = _gere_field("gere_weight", "dynamic")
    gere_seed: Optional[int] = _gere_field("gere_seed", None)
    gere_state_batch_size: int = _gere_field("gere_state_batch_size", 16)
    gere_ewc_lambda: Optional[float] = _gere_field("gere_ewc_lambda", None)
    gere_task_kl: Optional[float] = _gere_field("gere_task_kl", None)
    gere_monitor: Optional[str] = _gere_field("gere_monitor", None)
    gere_monitor_size: int = _gere_field("gere_monitor_size", 64)
    gere_monitor_steps: int = _gere_field("gere_monitor_steps", 5)
    gere_monitor_max_length: int = _gere_field("gere_monitor_max_length", 128)
    gere_monitor_task_size: int = _gere_field("gere_monitor_task_size", 16)
    gere_task_replay_size: int = _gere_field("gere_task_replay_size", 100)
    gere_task_replay_per_step: Optional[int] = _gere_field("gere_task_replay_per_step", None)
    gere_task_replay_weight: Optional[float] = _gere_field("gere_task_replay_weight", None)
    eval_batch_size: int = 16
    general_every_task: bool = True
    print_logs: bool = True
    grad_diagnostics: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .config import GeReConfigError, validate_gere_values

        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name.startswith("gere_") and getattr(self, f.name) is not None}
        validate_gere_values(given)  # the keys' own checks, naming the key
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                     "logging_steps", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GeReConfigError(f"{name}={value!r} must be an integer >= 1.")
        if not isinstance(self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1:
            raise GeReConfigError(f"warmup_ratio={self.warmup_ratio!r} must be a number in [0, 1).")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise GeReConfigError(f"learning_rate={self.learning_rate!r} must be a number > 0.")

    @property
    def resolved_warmup_steps(self) -> int:
        """``warmup_steps`` when set, else ``ceil(warmup_ratio x max_steps)``."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.max_steps)

    def training_args(self, output_dir: Any, seed: int) -> dict[str, Any]:
        """The ``TrainingArguments`` keywords every trainer of a sequence stage shares (the GeRe trainers
        and the external baselines of :mod:`gere_plugin.baselines`): no checkpoints, no reporting, CPU
        when there is no CUDA device."""
        import torch

        return dict(
            output_dir=str(output_dir),
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=self.resolved_warmup_steps,
            weight_decay=self.weight_decay,
            max_steps=self.max_steps,
            logging_steps=self.logging_steps,
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            bf16=self.bf16,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            dataloader_num_workers=0,
        )

    def __getattr__(self, name: str) -> Any:  # old attribute names (read) keep working
        new = _RENAMED_SETTINGS.get(name)
        if new is None:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")
        return getattr(self, new)

    @classmethod
    def upgrade_dict(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A settings dict (e.g. from an older result file) with the old field names renamed."""
        return {_RENAMED_SETTINGS.get(k, k): v for k, v in values.items()}


#: Old TrainSettings names -> the names of the settings they feed.
_RENAMED_SETTINGS = {
    "steps_per_task": "max_steps",
    "batch_size": "per_device_train_batch_size",
    "replay_size": "gere_replay_size",
    "replay_max_length": "gere_replay_max_length",
    "replay_per_step": "gere_replay_per_step",
    "replay_seed": "gere_seed",
    "state_batch_size": "gere_state_batch_size",
}
_settings_init = TrainSettings.__init__


def _settings_init_with_old_names(self: TrainSettings, *args: Any, **kwargs: Any) -> None:
    old = sorted(k for k in kwargs if k in _RENAMED_SETTINGS)
    if old:
        import warnings

        warnings.warn(
            "TrainSettings(" + ", ".join(f"{k}=" for k in old) + ") is deprecated: use "
            + ", ".join(f"{_RENAMED_SETTINGS[k]}=" for k in old) + " (the names of the settings they feed).",
            DeprecationWarning,
            stacklevel=2,
        )
        for k in old:
            kwargs[_RENAMED_SETTINGS[k]] = kwargs.pop(k)
    _settings_init(self, *args, **kwargs)


TrainSettings.__init__ = _settings_init_with_old_names  # type: ignore[method-assign]


def _release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """The memory a stage adds while its trainer is built and trains: ``peak - before``, in MiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` (peak reset on entry). On CPU: the process's resident
    set size, read from ``/proc/self/statm`` every ``interval`` seconds by a background thread (peaks
    shorter than that can be missed); ``None`` where neither is available. ``before`` excludes what is
    already in memory (the model, the evaluation data), so methods compare on what they add: optimizer
    state, gradients, activations, EWC's anchor and Fisher, reference copies made by the trainer. The
    runner's frozen copy of the original base (``kl``/``l1``/``l2``/``task_kl``) is made once before the
    first stage and is NOT in it: add one model's size for those methods. On CPU the free C heap is
    returned to the system on entry (``malloc_trim``), so memory freed by an earlier run in the same
    process does not hide this stage's growth.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.kind: Optional[str] = None
        self.before = self.peak = 0.0
        self._stop: Any = None
        self._thread: Any = None

    @staticmethod
    def _rss_mb() -> Optional[float]:
        try:
            with open("/proc/self/statm") as fh:
                pages = int(fh.read().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            self.kind = "cuda_allocated"
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = self.peak = torch.cuda.memory_allocated() / 2**20
            return self
        _release_free_heap()  # else memory freed by an earlier run stays resident and hides this one's growth
        rss = self._rss_mb()
        if rss is None:
            return self
        import threading

        self.kind, self.before, self.peak = "cpu_rss", rss, rss
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                now = self._rss_mb()
                if now is not None and now > self.peak:
                    self.peak = now

        self._thread = threading.Thread(target=sample, name="gere-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() / 2**20)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            now = self._rss_mb()
            self.peak = max(self.peak, now or 0.0)

    def record(self) -> Optional[dict[str, Any]]:
        """``{"kind", "before_mb", "peak_mb", "added_mb"}`` or ``None`` when nothing could be measured."""
        if self.kind is None:
            return None
        return {"kind": self.kind, "before_mb": self.before, "peak_mb": self.peak, "added_mb": self.peak - self.before}


def step_clock() -> Any:
    """A Trainer callback that records the wall seconds of every optimizer step in ``.seconds``.

    A step runs from the end of the previous one (the start of training for the first) to its own end,
    so batch loading, the replay forward and the optimizer update count; one-off work before the first
    step (trainer set-up, caches) and after the last (EWC's Fisher pass, the final save) does not. The
    median of ``.seconds`` is therefore the steady-state step time, and ``train_seconds - sum(.seconds)``
    what a run spends once per task inside ``train()``.
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._last: Optional[float] = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._last = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            if self._last is not None:
                self.seconds.append(now - self._last)
            self._last = now

    return StepClock()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) over every parameter and buffer, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_state(folder: Optional[Path]) -> dict[str, Any]:
    """Existence, mtime and content hash of a state cache's ``meta.json`` (to prove reuse)."""
    if folder is None:
        return {"exists": False}
    meta = Path(folder) / "meta.json"
    if not meta.is_file():
        return {"exists": False}
    return {
        "exists": True,
        "mtime_ns": meta.stat().st_mtime_ns,
        "sha256": hashlib.sha256(meta.read_bytes()).hexdigest()[:16],
    }


def evaluate_stage(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[SequenceTask],
    general: Optional[GeneralEvalConfig],
    batch_size: int = 16,
) -> dict[str, Any]:
    """Accuracy on every task's test items and (when ``general`` is given) general ability.

    ``majority_share[task]`` is the share of the most frequent predicted label (1.0 = the model
    answers every item with the same label word, i.e. it learned the label prior, not the task).
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {"tasks": {}, "majority_share": {}}
    for task in tasks:
        res = label_accuracy(model, tokenizer, task.test, batch_size=batch_size)
        out["tasks"][task.name] = res["accuracy"]
        # share of the most frequent prediction: near 1.0 means the model collapsed onto one label
        counts = [res["predictions"].count(k) for k in set(res["predictions"])]
        out["majority_share"][task.name] = max(counts) / len(res["predictions"])
    if general is not None:
        out["general"] = evaluate_general(model, tokenizer, general)
    out["seconds"] = time.perf_counter() - t0
    return out


def _load_model(model: Union[str, Path, torch.nn.Module]) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)


def _load_tokenizer(tokenizer: Any, model: Union[str, Path, torch.nn.Module]) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    src = tokenizer if tokenizer is not None else model
    if isinstance(src, torch.nn.Module):
        raise ValueError("pass tokenizer= when model is an in-memory model")
    tok = AutoTokenizer.from_pretrained(str(src))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _train_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from .monitor import METRIC_KEYS as MONITOR_METRICS

    keep = ("step", "loss", "learning_rate", "grad_norm", "gere/task_loss", "gere/replay_ce", "gere/reg_loss", "gere/weight",
            "gere/out_of_state", "gere/replay_rows", "gere/grad_norm_ce", "gere/grad_norm_reg",
            "gere/grad_norm_total", "gere/clip_coef", "gere/grad_cosine", "gere/task_replay_ce",
            "gere/task_replay_rows", "gere/task_ce", "gere/flow_weight", "gere/flow_ce", "gere/task_kl", "gere/ewc_penalty",
            "train_runtime", "train_loss", *MONITOR_METRICS)
    return [{k: v for k, v in rec.items() if k in keep} for rec in log_history]


def _monitor_record(trainer: Any) -> Optional[dict[str, Any]]:
    """What the stage's forgetting monitor scored and what its passes cost (``None`` without a monitor)."""
    monitor = getattr(trainer, "gere_monitor", None)
    if monitor is None:
        return None
    return {
        "source": monitor.texts.source,
        "texts": len(monitor.texts.texts),
        "tokens": monitor.texts.num_tokens,
        "task_rows": monitor.num_task_rows,
        "every": monitor.every,
        "pass_seconds": [[step, seconds] for step, seconds in monitor.seconds],
        "tripped": monitor.tripped,
    }


def _tokenized_without_eos(rows: Sequence[dict[str, str]], tokenizer: Any) -> list[dict[str, Any]]:
    """Prompt/completion rows as TRL's pre-tokenized format (``input_ids`` + ``completion_mask``) without the
    EOS that TRL would append, so the loss falls on the completion's tokens only; ``text`` rows unchanged
    apart from tokenization. Tokenized exactly as TRL does (prompt, then prompt + completion)."""
    out = []
    for row in rows:
        if "prompt" in row:
            prompt_ids = tokenizer(row["prompt"])["input_ids"]
            ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
            if ids[: len(prompt_ids)] != prompt_ids:
                raise ValueError(f"prompt tokens change when the completion is appended: {row['prompt']!r}")
            out.append({"input_ids": ids, "completion_mask": [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))})
        else:
            out.append({"input_ids": tokenizer(row["text"])["input_ids"]})
    return out


def _tokenized_for_training(rows: Sequence[dict[str, str]], tokenizer: Any, settings: TrainSettings) -> list[dict[str, Any]]:
    """Rows as token ids, tokenized exactly as the task's trainer tokenizes them: without EOS
    (:func:`_tokenized_without_eos`) or, with ``completion_eos``, TRL's own rules (EOS appended)."""
    if not settings.completion_eos:
        return _tokenized_without_eos(rows, tokenizer)
    from .task_replay import Tokenization, tokenize_row

    out = []
    for row in rows:
        got = tokenize_row(row, tokenizer, Tokenization(add_eos=True))
        assert got is not None, f"not a prompt/completion or text row: {sorted(row)}"
        ids, mask = got
        out.append({"input_ids": ids, "completion_mask": mask} if "prompt" in row else {"input_ids": ids})
    return out


def keep_task_sample(task: SequenceTask, tokenizer: Any, settings: TrainSettings, seed: int, index: int,
                     folder: Path) -> tuple[Path, int]:
    """Write a seeded sample of at most ``gere_task_replay_size`` of ``task``'s training rows, as the token
    ids the task trained on, to ``folder/<index>_<name>.jsonl`` (atomically); return ``(path, rows kept)``.

    Only these ids are kept for later tasks (not a copy of the dataset), so memory and disk grow with the
    per-task budget, not with the tasks' sizes."""
    import numpy as np

    n = min(settings.gere_task_replay_size, len(task.train))
    chosen = sorted(np.random.default_rng([seed, index]).choice(len(task.train), size=n, replace=False).tolist())
    rows = _tokenized_for_training([task.train[i] for i in chosen], tokenizer, settings)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{index}_{task.name}.jsonl"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path, n


def _build_trainer(
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
) -> Any:
    from datasets import Dataset

    from .sft import GeReSFTConfig

    rows = task.train if settings.completion_eos else _tokenized_without_eos(task.train, tokenizer)
    if method.external is not None:
        from .baselines import build_baseline_trainer

        trainer = build_baseline_trainer(method.external, model, tokenizer, task.train, settings, output_dir, seed,
                                         task_index, num_tasks, sft_rows=rows)
        if not settings.print_logs:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        return trainer
    gere: dict[str, Any] = {}
    if task_replay:
        gere.update(
            gere_task_replay=[str(p) for p in task_replay],
            gere_task_replay_size=settings.gere_task_replay_size,
            gere_task_replay_per_step=settings.gere_task_replay_per_step,
            gere_task_replay_weight=settings.gere_task_replay_weight,
            gere_seed=settings.gere_seed if settings.gere_seed is not None else seed,
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
            gere_seed=settings.gere_seed if settings.gere_seed is not None else seed,
        )
    if settings.gere_monitor is not None:
        gere.update(
            gere_monitor=str(settings.gere_monitor),
            gere_monitor_size=settings.gere_monitor_size,
            gere_monitor_steps=settings.gere_monitor_steps,
            gere_monitor_max_length=settings.gere_monitor_max_length,
            gere_monitor_task_size=settings.gere_monitor_task_size,
            # every method (plain too) draws the same monitor texts and training rows
            gere_seed=settings.gere_seed if settings.gere_seed is not None else seed,
        )
    gere.update(method.gere_kwargs(task_index))  # the method's own keys win over the shared settings
    for key, uses in STRENGTH_SETTINGS.items():
        if getattr(settings, key) is not None and uses in method.uses:
            gere[key] = getattr(settings, key)  # ... except an explicit strength for a key the method uses
    if ewc_state is not None:
        gere["gere_ewc_state"] = str(ewc_state)
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
    if not settings.print_logs:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _make_trainer(model: torch.nn.Module, tokenizer: Any, cfg: Any, ds: Any, method: MethodSpec,
                  ref_model: Optional[torch.nn.Module]) -> Any:
    from .sft import GeReSFTTrainer

    # l1/l2/kl and the task KL: the reference is the ORIGINAL base model, not this task's starting weights.
    return GeReSFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer,
                          gere_ref_model=ref_model if method.needs_base_reference else None)


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
    if not tasks:
        raise ValueError("run_sequence needs at least one task")
    for key, uses in STRENGTH_SETTINGS.items():
        if getattr(settings, key) is not None and uses not in spec.uses:
            from .config import GeReConfigError

            users = sorted(name for name, m in METHODS.items() if uses in m.uses)
            raise GeReConfigError(
                f"{key} sets the strength of methods with {uses} ({', '.join(users)}); method {spec.name!r} does not "
                f"use it. Pick one of those methods or drop {key}."
            )
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .cache_folder import state_cache_folder

    cache = state_cache_folder(state_cache, out_dir)  # the trainers' default-folder rule
    tok = _load_tokenizer(tokenizer, model)
    net = _load_model(model)
    eval_general = general if settings.general_every_task else None

    t_start = time.perf_counter()
    base = base_eval if base_eval is not None else evaluate_stage(net, tok, tasks, general, settings.eval_batch_size)
    ref_model = None
    if spec.needs_base_reference:
        from .trainer import frozen_copy

        ref_model = frozen_copy(net)
    ewc_state: Optional[Path] = None  # the EWC state of the tasks so far, handed to the next one

    result: dict[str, Any] = {
        "method": spec.name,
        "method_spec": dataclasses.asdict(spec),
        "seed": seed,
        "tasks": names,
        "settings": dataclasses.asdict(settings),
        "replay": str(replay) if replay is not None else None,
        "state_cache": str(cache) if spec.replay else None,
        "task_replay": {
            "per_task": settings.gere_task_replay_size,
            "per_step": settings.gere_task_replay_per_step,
            "weight": settings.gere_task_replay_weight,
            "folder": str(out_dir / "task_replay"),
            "kept": {},
        } if spec.task_replay else None,
        "base": base,
        "base_row": [base["tasks"][n] for n in names],
        "stages": [],
        "matrix": [],
    }

    def write() -> None:
        if result_path is not None:
            path = Path(result_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
            os.replace(tmp, path)

    kept: list[Path] = []  # earlier tasks' kept samples (methods with task_replay)
    keep_seed = settings.gere_seed if settings.gere_seed is not None else seed
    for k, task in enumerate(tasks):
        stage: dict[str, Any] = {"task": task.name, "index": k}
        stage["start_fingerprint"] = model_fingerprint(net)
        stage["state_cache_before"] = _cache_state(cache) if spec.replay else None
        memory = PeakMemory().__enter__()  # from before the trainer exists: reference copies count
        t_setup = time.perf_counter()
        try:
            trainer = _build_trainer(
                net, tok, task, spec, k, settings, str(replay) if replay is not None else None,
                cache, out_dir / f"task_{k}_{task.name}", seed, ref_model, ewc_state, len(tasks), task_replay=kept,
            )
        except BaseException:
            memory.__exit__(None, None, None)
            raise
        # one-time work before the first step (state-cache build, FLOW's base-loss pass, reference copies);
        # EWC's Fisher pass runs inside train() and is part of train_seconds
        stage["setup_seconds"] = time.perf_counter() - t_setup
        replay_step = getattr(getattr(trainer, "gere_step", None), "task_replay", None)
        if spec.task_replay:
            stage["task_replay"] = None if replay_step is None else {
                "sources": list(replay_step.rows.sources), "rows": list(replay_step.rows.kept),
                "per_step": replay_step.per_step, "weight": replay_step.weight,
            }
        stage["trainable_params"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
        clock = step_clock()
        trainer.add_callback(clock)
        t0 = time.perf_counter()
        try:
            train_out = trainer.train()
        finally:
            memory.__exit__(None, None, None)
        stage["train_seconds"] = time.perf_counter() - t0
        stage["train_loss"] = float(train_out.training_loss)
        stage["steps"] = int(trainer.state.global_step)
        # cost: wall time per optimizer step (EWC's end-of-task Fisher pass included) and added memory
        stage["seconds_per_step"] = stage["train_seconds"] / max(stage["steps"], 1)
        # ... and apart: each optimizer step's wall seconds, and what train() spent outside the steps
        stage["step_seconds"] = [round(t, 4) for t in clock.seconds]
        stage["train_outside_steps_seconds"] = stage["train_seconds"] - sum(clock.seconds)
        stage["memory"] = memory.record()
        stage["history"] = _train_history(trainer.state.log_history)
        monitor = _monitor_record(trainer)
        if monitor is not None:
            stage["monitor"] = monitor
        stage["state_cache_after"] = _cache_state(cache) if spec.replay else None
        before, after = stage["state_cache_before"], stage["state_cache_after"]
        stage["state_cache_reused"] = bool(before and before.get("exists") and before == after)
        task_step = getattr(trainer, "gere_task", None)
        if task_step is not None:
            stage["task_methods"] = task_step.methods
            if task_step.flow is not None:
                stage["flow"] = dict(task_step.flow.summary(), base_losses=task_step.flow_action)
            if task_step.ewc is not None:
                stage["ewc_state_used"] = str(ewc_state) if ewc_state is not None else None
                ewc_state = task_step.ewc.written
                stage["ewc_state_written"] = str(ewc_state) if ewc_state is not None else None
        if spec.external is not None:
            from .baselines import model_after_training

            net = model_after_training(spec.external, trainer)
        else:
            net = trainer.model
        del trainer, replay_step, task_step  # frees the optimizer state before evaluating
        gc.collect()
        if spec.task_replay and k < len(tasks) - 1:
            path, n = keep_task_sample(task, tok, settings, keep_seed, k, out_dir / "task_replay")
            kept.append(path)
            result["task_replay"]["kept"][task.name] = {"rows": n, "of": len(task.train), "path": str(path)}
        stage["end_fingerprint"] = model_fingerprint(net)
        is_last = k == len(tasks) - 1
        stage["eval"] = evaluate_stage(net, tok, tasks, eval_general if not is_last else general,
                                       settings.eval_batch_size)
        result["matrix"].append([stage["eval"]["tasks"][n] for n in names])
        result["stages"].append(stage)
        logger.info("continual %s seed %d: after %s -> %s", spec.name, seed, task.name, stage["eval"]["tasks"])
        if on_stage is not None:
            on_stage(stage)
        write()

    result["final"] = result["stages"][-1]["eval"]
    general_score = result["final"].get("general", {}).get("general_score")
    result["summary"] = continual_summary(result["matrix"], result["base_row"], general_score)
    result["seconds"] = time.perf_counter() - t_start
    if save_final_model:
        net.save_pretrained(str(out_dir / "final"))
        tok.save_pretrained(str(out_dir / "final"))
    write()
    return result
