"""The training hyper-parameters every task and method of a sequence shares (:class:`TrainSettings`), and the
old field names that still work."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["TrainSettings"]


def _gere_field(name: str, default: Any) -> Any:
    """A ``TrainSettings`` field for the ``gere_*`` key ``name``: help text and validation come from
    :class:`~gere_plugin.GeReArguments` (the one definition); only the default is the sequence's own."""
    from ..config import gere_fields

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
    gere_wise_alpha: Optional[float] = _gere_field("gere_wise_alpha", None)
    gere_monitor: Optional[str] = _gere_field("gere_monitor", None)
    gere_monitor_size: int = _gere_field("gere_monitor_size", 64)
    gere_monitor_steps: int = _gere_field("gere_monitor_steps", 5)
    gere_monitor_max_length: int = _gere_field("gere_monitor_max_length", 128)
    gere_monitor_task_size: int = _gere_field("gere_monitor_task_size", 16)
    gere_task_replay_size: int = _gere_field("gere_task_replay_size", 100)
    gere_task_replay_per_step: Optional[int] = _gere_field("gere_task_replay_per_step", None)
    gere_task_replay_weight: Optional[float] = _gere_field("gere_task_replay_weight", None)
    gere_task_replay_logit_weight: Optional[float] = _gere_field("gere_task_replay_logit_weight", None)
    gere_task_replay_topk: int = _gere_field("gere_task_replay_topk", 32)
    wise_alphas: tuple[float, ...] = _train_field(
        (), "WiSE-FT presets only: candidate gere_wise_alpha values, one chosen after every task on the dev split by "
        "select_wise_alpha (1.0 is always a candidate; every task needs dev items). Empty = the fixed alpha.")
    eval_batch_size: int = 16
    general_every_task: bool = True
    print_logs: bool = True
    grad_diagnostics: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..config import GeReConfigError, validate_gere_values

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
        alphas = self.wise_alphas
        if not isinstance(alphas, (list, tuple)) or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a <= 1 for a in alphas):
            raise GeReConfigError(
                f"wise_alphas={alphas!r} must be a list of numbers in (0, 1] (candidate gere_wise_alpha values), or "
                "empty for the preset's fixed alpha."
            )
        self.wise_alphas = tuple(float(a) for a in alphas)

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
