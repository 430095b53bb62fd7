"""The one definition of every ``gere_*`` knob.

Everything that configures GeRe lives in :class:`GeReArguments`. The TRL configs
(:class:`~gere_plugin.GeReSFTConfig`, :class:`~gere_plugin.GeReDPOConfig`) inherit it, TRL's
``TrlParser`` turns it into ``--gere_*`` command-line flags, and the Axolotl plugin generates its
pydantic schema from the same fields (:func:`gere_fields`), so names, defaults and validation are
identical everywhere. The Markdown table in docs/configuration.md is generated from it too (``gere keys``).
The rules the values must follow are in :mod:`gere_plugin.config_checks` (every name re-exported here).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

# The value rules live in config_checks (re-exported here: every name below stays importable from
# gere_plugin.config); the checks read gere_fields / gere_defaults from this module when they run.
from .config_checks import (  # noqa: F401
    MONITOR_ACTIONS,
    REGULARIZERS,
    TM_REDUCTIONS,
    GeReConfigError,
    check_guard_has_monitor,
    check_key_combinations,
    gere_value_problems,
    parse_weight,
    resolve_replay_per_step,
    resolve_task_replay_per_step,
    resolve_task_replay_weight,
    validate_gere_args,
    validate_gere_values,
)

#: Replay samples drawn when ``gere_replay_size`` is not set (the paper's 1,000), or fewer when the
#: source has fewer usable texts.
DEFAULT_REPLAY_SIZE = 1000
#: Forgetting-monitor defaults: texts scored, and optimizer steps between two measurements (chosen so
#: the monitor costs <= 3% of SmolLM2-135M training time: benchmarks/monitor_cost.py).
DEFAULT_MONITOR_SIZE = 64
DEFAULT_MONITOR_STEPS = 200
#: Keys of the forgetting monitor (a config may set these without gere_replay).
MONITOR_KEYS = (
    "gere_monitor", "gere_monitor_size", "gere_monitor_steps", "gere_monitor_max_length", "gere_monitor_task_size",
    "gere_monitor_max_ppl_rise", "gere_monitor_action",
)  # fmt: skip
#: Task-side methods that work with every loss family (they never touch the loss): ``wise`` only changes the
#: weights after training. The others (FLOW, EWC, task KL) are SFT only (``check_task_methods``).
ANY_FAMILY_TASK_METHODS = ("wise",)
#: Rows drawn from each earlier task when ``gere_task_replay_size`` is not changed.
DEFAULT_TASK_REPLAY_SIZE = 100
#: Tokens per position a logit-replay snapshot keeps (``gere_task_replay_topk``).
DEFAULT_TASK_REPLAY_TOPK = 32

logger = logging.getLogger(__name__)


#: Keys that only act on replay rows: setting one without ``gere_replay`` is a mistake (an error in Axolotl).
REPLAY_ONLY_KEYS = (
    "gere_replay_split", "gere_replay_text_field", "gere_replay_size", "gere_replay_max_length",
    "gere_replay_min_tokens", "gere_replay_per_step", "gere_regularizer", "gere_weight", "gere_weight_max",
    "gere_sigma", "gere_tm_reduction", "gere_layers", "gere_state_cache", "gere_state_batch_size", "gere_seed",
)  # fmt: skip


def task_methods(values: Any) -> list[str]:
    """The anti-forgetting methods that act on the task side and need no replay, as switched on by a
    mapping or object of ``gere_*`` values: ``flow`` (``gere_flow``), ``ewc`` (``gere_ewc_lambda > 0``),
    ``task_kl`` (``gere_task_kl > 0``), ``wise`` (``0 < gere_wise_alpha < 1``; 1 is the plain run)."""
    getter = values.get if hasattr(values, "get") else (lambda k, d=None: getattr(values, k, d))

    def positive(key: str) -> bool:
        v = getter(key)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

    out = []
    if getter("gere_flow") is True:
        out.append("flow")
    if positive("gere_ewc_lambda"):
        out.append("ewc")
    if positive("gere_task_kl"):
        out.append("task_kl")
    alpha = getter("gere_wise_alpha")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1:
        out.append("wise")
    return out



@dataclass
class GeReArguments:
    """GeRe (general samples replay) settings shared by every trainer and the Axolotl plugin.

    Parameters:
        gere_replay: Replay set source: a ``.jsonl``/``.json``/``.parquet``/``.txt`` file, a folder
            of such files, a folder saved with ``datasets.save_to_disk``, or a ``datasets`` hub id
            (must be in the local cache when offline).
        gere_replay_split: Split to read when the source is a ``datasets`` folder or id (``gere_replay``
            and ``gere_monitor``).
        gere_replay_text_field: Column that holds the general text (``gere_replay`` and ``gere_monitor``).
        gere_replay_size: Number of replay samples drawn (seeded) from the source. ``None`` = every
            usable text, at most 1,000 (the paper's size); a number is a requirement (an error when
            the source has fewer usable texts).
        gere_replay_max_length: Replay samples are truncated to this many tokens.
        gere_replay_min_tokens: Samples with fewer tokens are dropped (counted and logged).
        gere_replay_per_step: Replay rows added to every optimizer step, spread over micro-batches,
            gradient accumulation and ranks. ``None`` = a quarter of the global batch (at least 1).
        gere_task_replay: Earlier tasks' training data, replayed next to the general replay (experience
            replay): a list of sources, one per earlier task, each a file / folder / ``datasets`` folder or
            id like ``gere_replay``. Rows keep their format: ``prompt``/``completion`` (loss on the
            completion), ``messages`` (chat template), ``text``, ``prompt``/``chosen``/``rejected`` (CE on
            the chosen answer) or pre-tokenized ``input_ids`` (+ ``completion_mask`` or ``labels``).
        gere_task_replay_split: Split read from a ``datasets`` folder or id of ``gere_task_replay``.
        gere_task_replay_size: At most this many rows are drawn (seeded) from each earlier task; a task
            with fewer usable rows is used whole (logged).
        gere_task_replay_per_step: Earlier-task rows in every optimizer step (over micro-batches,
            accumulation and ranks), in addition to the task rows and to ``gere_replay_per_step``.
            ``None`` = an eighth of the global batch (at least 1).
        gere_task_replay_weight: Share ``rho`` of the task term given to earlier-task rows: task term =
            ``(1 - rho) * loss_task + rho * CE_earlier``. ``None`` = their row share,
            ``gere_task_replay_per_step / (global batch + gere_task_replay_per_step)``.
        gere_task_replay_logit_weight: ``beta`` of logit replay (dark-experience-replay style): the
            earlier-task rows also get ``beta * KL(stored || model)`` on their target tokens, against the
            top-k log-probabilities the model had when that task ended (a ``<stem>.topk.safetensors``
            snapshot beside the earlier-task file; ``gere sequence`` writes it). Task term =
            ``(1 - rho) * loss_task + rho * (CE_earlier + beta * KL_earlier)``. 0 = off.
        gere_task_replay_topk: Tokens per position of the stored snapshot the KL compares (at most the
            snapshot's own ``k``; with the vocabulary size the KL is exact).
        gere_regularizer: ``tm`` (GeRe), ``l1``/``l2`` (hidden-state distance to the base model),
            ``kl`` (logit KL to the base model) or ``none`` (vanilla replay, CE only).
        gere_weight: ``dynamic`` (weight = CE / regularizer, both detached: the paper's rule) or a
            fixed number.
        gere_weight_max: Upper bound of the dynamic weight, ``w = min(CE / R, gere_weight_max)``
            (default 100, with the ``mean`` TM reduction: the regularizer's pull grows with the share
            of activations that left their state, and never drowns the task early in training).
            ``None`` = no bound: the paper's exact rule (with an unbounded dynamic weight the TM
            reduction does not change the gradient, ``w * R`` has gradient ``CE * grad(S) / S``).
            Ignored with a fixed ``gere_weight``.
        gere_sigma: Threshold multiplier k in ``mu +- k * sigma``.
        gere_tm_reduction: ``mean`` (sum / number of elements, the default) or ``violations`` (sum /
            number of non-zero elements, the reference implementation's).
        gere_layers: Hidden-state indices (``hidden_states[i]`` of the HF output) the regularizer uses.
        gere_state_cache: Folder for the base-model state cache; reused when its fingerprints match.
            ``None`` = ``<output_dir>/gere_states``.
        gere_state_batch_size: Batch size of the forward passes that build the state cache.
        gere_freeze_layers: Freeze this many bottom decoder layers (spurious-forgetting remedy).
        gere_freeze_embeddings: Freeze the input embeddings.
        gere_seed: Seed of the replay sampling and schedule (and of the monitor's samples).
        gere_flow: FLOW sample weighting of the task loss (no replay needed): each sample's tokens are
            weighted by ``exp(-base_loss / tau)``, see :mod:`gere_plugin.flow`.
        gere_flow_tau: FLOW temperature; ``None`` = median base loss of the task samples.
        gere_flow_normalize: Divide the FLOW weights by their mean over the task samples.
        gere_flow_cache: Folder of the cached base losses. ``None`` = ``<output_dir>/gere_flow``.
        gere_flow_batch_size: Batch size of the base-loss forward passes.
        gere_ewc_lambda: EWC strength (``0`` = off), see :mod:`gere_plugin.ewc`.
        gere_ewc_state: EWC state (Fisher + anchor weights) of the earlier tasks; ``None`` = first task.
        gere_ewc_gamma: Online-EWC decay of the earlier tasks' Fisher.
        gere_ewc_samples: Task samples used for the Fisher estimate at the end of the run.
        gere_task_kl: Weight of ``KL(base || model)`` on the task rows' trained tokens (``0`` = off).
        gere_wise_alpha: WiSE-FT interpolation after training, ``theta <- (1 - alpha) * theta_before +
            alpha * theta_after`` over the trainable parameters, ``0 < alpha <= 1``; ``None`` / 1 = off;
            see :mod:`gere_plugin.methods.wise`.
        gere_monitor: Held-out general texts of the forgetting monitor (same formats as ``gere_replay``;
            none of them may be in the replay set). Works with and without replay.
        gere_monitor_size: Monitor texts drawn (seeded) from ``gere_monitor``; fewer usable texts: all.
        gere_monitor_steps: Measure every this many optimizer steps, before the first update (step 0)
            and after the last step.
        gere_monitor_max_length: Monitor texts (and task rows) are truncated to this many tokens.
        gere_monitor_task_size: Training rows (a fixed, seeded sample) on which ``gere/monitor_task_kl``
            is measured; 0 = not measured.
        gere_monitor_max_ppl_rise: Guard: when ``gere/monitor_ppl_rise`` exceeds this (0.2 = +20% over
            the base model), ``gere_monitor_action`` happens. ``None`` = no guard.
        gere_monitor_action: ``warn`` (log a warning) or ``stop`` (end training after this step).
    """

    gere_replay: Optional[str] = field(
        default=None,
        metadata={"help": "Replay set: jsonl/json/parquet/txt file or folder, a datasets folder, or a datasets id."},
    )
    gere_replay_split: str = field(
        default="train", metadata={"help": "Split read from a datasets folder or id (gere_replay and gere_monitor)."}
    )
    gere_replay_text_field: str = field(
        default="text", metadata={"help": "Column holding the general text (gere_replay and gere_monitor)."}
    )
    gere_replay_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Replay samples drawn (seeded) from the source. Default: every usable text, at most 1000 "
            "(a number set here is required: fewer usable texts is an error)."
        },
    )
    gere_replay_max_length: int = field(
        default=512, metadata={"help": "Replay samples are truncated to this many tokens."}
    )
    gere_replay_min_tokens: int = field(
        default=2, metadata={"help": "Replay samples with fewer tokens are dropped (with a count)."}
    )
    gere_replay_per_step: Optional[int] = field(
        default=None,
        metadata={
            "help": "Replay rows in every optimizer step (over micro-batches, accumulation and ranks). "
            "Default: a quarter of the global batch, at least 1."
        },
    )
    # -- earlier tasks (experience replay), next to the general replay ------------------------------
    gere_task_replay: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Earlier tasks' training data replayed next to the general replay, one source per task (files, "
            "folders or datasets ids). Rows keep their format (prompt/completion, messages, text, DPO pairs: CE on "
            "chosen, or input_ids + completion_mask); CE only."
        },
    )
    gere_task_replay_split: str = field(
        default="train", metadata={"help": "Split read from a datasets folder or id of gere_task_replay."}
    )
    gere_task_replay_size: int = field(
        default=DEFAULT_TASK_REPLAY_SIZE,
        metadata={"help": "At most this many rows are drawn (seeded) from each earlier task (fewer usable rows: all)."},
    )
    gere_task_replay_per_step: Optional[int] = field(
        default=None,
        metadata={
            "help": "Earlier-task rows in every optimizer step (over micro-batches, accumulation and ranks), on top of "
            "gere_replay_per_step. Default: an eighth of the global batch, at least 1."
        },
    )
    gere_task_replay_weight: Optional[float] = field(
        default=None,
        metadata={
            "help": "Share rho of the task term for earlier-task rows: (1 - rho) * task loss + rho * CE_earlier. "
            "Default: their row share, per_step / (global batch + per_step)."
        },
    )
    gere_task_replay_logit_weight: float = field(
        default=0.0,
        metadata={
            "help": "Logit replay (DER): beta of beta * KL(stored top-k || model) on the earlier-task rows' targets, "
            "next to their CE, against the snapshot taken when that task ended (<stem>.topk.safetensors beside the "
            "file; gere sequence writes it; rows without one: CE only). 0 = off. Needs gere_task_replay."
        },
    )
    gere_task_replay_topk: int = field(
        default=DEFAULT_TASK_REPLAY_TOPK,
        metadata={"help": "Top-k tokens per position that logit replay stores and compares (KL exact at the vocab size)."},
    )
    gere_regularizer: str = field(
        default="tm",
        metadata={
            "help": "tm (GeRe threshold-margin), l1, l2, kl, or none (vanilla replay).",
            "choices": list(REGULARIZERS),
        },
    )
    gere_weight: str = field(
        default="dynamic",
        metadata={"help": "'dynamic' (CE / regularizer, detached) or a fixed non-negative number."},
    )
    gere_weight_max: Optional[float] = field(
        default=100.0,
        metadata={
            "help": "Upper bound of the dynamic weight: w = min(CE / R, gere_weight_max). null = unbounded: the "
            "paper's exact rule. Ignored with a fixed gere_weight."
        },
    )
    gere_sigma: float = field(
        default=1.0, metadata={"help": "Threshold multiplier k: states split at mu +- k*sigma."}
    )
    gere_tm_reduction: str = field(
        default="mean",
        metadata={
            "help": "mean (sum / number of elements) or violations (sum / non-zero count, the reference code's).",
            "choices": list(TM_REDUCTIONS),
        },
    )
    gere_layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={"help": "hidden_states indices used by the regularizer (-1 = after the final norm)."},
    )
    gere_state_cache: Optional[str] = field(
        default=None,
        metadata={"help": "State cache folder, reused when fingerprints match. Default <output_dir>/gere_states."},
    )
    gere_state_batch_size: int = field(
        default=8, metadata={"help": "Batch size of the forward passes that build the state cache."}
    )
    gere_freeze_layers: int = field(
        default=0, metadata={"help": "Freeze this many bottom decoder layers before training."}
    )
    gere_freeze_embeddings: bool = field(
        default=False, metadata={"help": "Freeze the input embeddings before training."}
    )
    gere_seed: int = field(
        default=42, metadata={"help": "Seed of replay sampling and the replay schedule (and of the monitor's samples)."}
    )
    # -- FLOW (Sanyal et al., ICML 2025): task samples weighted by the base model's loss; needs no replay --
    gere_flow: bool = field(
        default=False,
        metadata={
            "help": "FLOW: weight every task sample's loss by exp(-base_loss / tau), base_loss = the sample's token-mean "
            "CE under the model as handed to the trainer (computed once before training, cached). SFT only."
        },
    )
    gere_flow_tau: Optional[float] = field(
        default=None,
        metadata={"help": "FLOW temperature tau > 0. null = the median base loss over the task samples (the paper)."},
    )
    gere_flow_normalize: bool = field(
        default=False,
        metadata={
            "help": "Divide the FLOW weights by their mean over the task samples (mean weight 1, the learning rate "
            "keeps its meaning). false = the paper's weights, all <= 1."
        },
    )
    gere_flow_cache: Optional[str] = field(
        default=None,
        metadata={
            "help": "Folder of the per-sample base losses, reused when model weights, tokenizer and task rows match. "
            "Default <output_dir>/gere_flow."
        },
    )
    gere_flow_batch_size: int = field(
        default=8, metadata={"help": "Batch size of the forward passes that compute the FLOW base losses."}
    )
    # -- EWC (elastic weight consolidation, online form): a diagonal-Fisher anchor to earlier tasks --
    gere_ewc_lambda: float = field(
        default=0.0,
        metadata={
            "help": "EWC strength: loss += lambda/2 * sum F (theta - theta*)^2 over the trainable parameters, F and "
            "theta* from gere_ewc_state. 0 = off. With > 0 the run also estimates its own diagonal Fisher when "
            "training ends and writes <output_dir>/gere_ewc for the next task. SFT only."
        },
    )
    gere_ewc_state: Optional[str] = field(
        default=None,
        metadata={
            "help": "EWC state of the earlier task(s): a gere_ewc folder written by the previous run. null = no "
            "penalty in this run (the first task), only the Fisher estimate at its end."
        },
    )
    gere_ewc_gamma: float = field(
        default=1.0,
        metadata={
            "help": "Online EWC decay: the Fisher written at the end is gamma * F(gere_ewc_state) + F(this task), "
            "gamma in [0, 1] (1 = plain accumulation)."
        },
    )
    gere_ewc_samples: int = field(
        default=200,
        metadata={"help": "Task samples (seeded draw) whose per-sample gradients estimate the diagonal Fisher."},
    )
    # -- KL to the base model on the task rows (the anchor of LLaMA-Factory's ASFT) --
    gere_task_kl: float = field(
        default=0.0,
        metadata={
            "help": "Weight of KL(base || model) on the task rows' trained tokens, added per token to the task CE "
            "(ASFT-style anchor; reference as for gere_regularizer kl). 0 = off. SFT only."
        },
    )
    # -- WiSE-FT: the trained weights pulled back toward the weights the task started from, after training --
    gere_wise_alpha: Optional[float] = field(
        default=None,
        metadata={
            "help": "Weight-space interpolation when train() returns (WiSE-FT): theta <- (1 - alpha) * theta_before "
            "+ alpha * theta_after over the trainable parameters (LoRA: the adapter weights; a fresh adapter's "
            "update is scaled by alpha exactly), theta_before = the weights when the trainer was built. "
            "0 < alpha <= 1; null or 1 = off. Smaller alpha keeps more of the earlier tasks and general ability "
            "and learns less of this one: choose it on a dev split (e.g. 0.5-0.8). Any loss family; "
            "not under FSDP / ZeRO-3."
        },
    )
    gere_monitor: Optional[str] = field(
        default=None,
        metadata={
            "help": "Forgetting monitor: held-out general texts (formats as gere_replay; none may be in the replay "
            "set), scored while training with or without replay. Logs gere/monitor_* metrics."
        },
    )
    gere_monitor_size: int = field(
        default=DEFAULT_MONITOR_SIZE,
        metadata={"help": "Monitor texts drawn (seeded) from gere_monitor (fewer usable texts: all of them)."},
    )
    gere_monitor_steps: int = field(
        default=DEFAULT_MONITOR_STEPS,
        metadata={"help": "Monitor every this many optimizer steps, before the first update (step 0) and after the last."},
    )
    gere_monitor_max_length: int = field(
        default=128, metadata={"help": "Monitor texts and task rows are truncated to this many tokens."}
    )
    gere_monitor_task_size: int = field(
        default=16,
        metadata={"help": "Training rows (fixed, seeded) on which gere/monitor_task_kl is measured; 0 = off."},
    )
    gere_monitor_max_ppl_rise: Optional[float] = field(
        default=None,
        metadata={
            "help": "Guard: when gere/monitor_ppl_rise exceeds this (0.2 = +20% over the base model), "
            "gere_monitor_action happens. null = no guard."
        },
    )
    gere_monitor_action: str = field(
        default="warn",
        metadata={
            "help": "What the guard does: warn (log a warning) or stop (end training after this step).",
            "choices": list(MONITOR_ACTIONS),
        },
    )

    def __post_init__(self) -> None:
        _fp32_where_bf16_is_unsupported(self)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        validate_gere_args(self)

    def gere_dict(self) -> dict[str, Any]:
        """The ``gere_*`` values as a plain dict."""
        return {f.name: getattr(self, f.name) for f in gere_fields()}

    @property
    def gere_weight_value(self) -> Optional[float]:
        """The fixed weight as a float, or ``None`` for the dynamic weight."""
        return parse_weight(self.gere_weight)



def _fp32_where_bf16_is_unsupported(args: Any) -> None:
    """TRL turns an unset ``bf16`` into ``True``, and transformers then refuses to run on a machine
    without a bf16 device (a CPU-only laptop). The GeRe configs train in fp32 there instead, saying so;
    an explicit ``bf16`` / ``fp16`` / ``use_cpu`` is left as given."""
    if getattr(args, "bf16", False) is not None or getattr(args, "fp16", False) or getattr(args, "use_cpu", False):
        return
    try:
        from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
    except ImportError:
        return
    if not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
        logger.warning("gere: bf16 is not set and this machine has no bf16 accelerator: training in fp32 "
                       "(set bf16=True with use_cpu=True for bf16 on the CPU).")
        args.bf16 = False


def gere_fields() -> list[dataclasses.Field]:
    """The dataclass fields of every ``gere_*`` knob, in declaration order."""
    return [f for f in dataclasses.fields(GeReArguments) if f.name.startswith("gere_")]


def gere_defaults() -> dict[str, Any]:
    out = {}
    for f in gere_fields():
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        else:
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def keys_markdown() -> str:
    """The Markdown table of every ``gere_*`` key (docs/configuration.md holds it, checked against it)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for name, f in ((f.name, f) for f in gere_fields()):
        default = gere_defaults()[name]
        shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else default)
        meaning = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            meaning += f" One of: {', '.join('`' + c + '`' for c in choices)}."
        rows.append(f"| `{name}` | `{shown}` | {meaning} |")
    return "\n".join(rows) + "\n"
