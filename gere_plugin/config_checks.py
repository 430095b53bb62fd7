"""Validation of ``gere_*`` values and the per-step sizes derived from them.

The knobs themselves (names, defaults, help) are defined once, in :class:`gere_plugin.config.GeReArguments`;
this module holds the rules their values must follow (:func:`validate_gere_values`, shared by the
dataclass ``__post_init__`` and the Axolotl pydantic model, so both give the same errors), the
cross-key checks, and the ``resolve_*`` helpers that turn ``null`` sizes into numbers for a given batch.
Every name here is re-exported by :mod:`gere_plugin.config`; the list of known keys and their defaults
is read from there when a check runs (that module imports this one, not the reverse, at import time).
"""

from __future__ import annotations

import math
from typing import Any, Optional

#: The values ``gere_regularizer`` accepts.
REGULARIZERS = ("tm", "l1", "l2", "kl", "none")
#: What the forgetting monitor does when ``gere_monitor_max_ppl_rise`` is crossed.
MONITOR_ACTIONS = ("warn", "stop")
#: The values ``gere_tm_reduction`` accepts.
TM_REDUCTIONS = ("mean", "violations")


class GeReConfigError(ValueError):
    """A ``gere_*`` value is invalid. The message names the key and says how to fix it."""


def parse_weight(value: Any) -> Optional[float]:
    """``'dynamic'`` -> ``None``; a number or numeric string -> float. Raises on anything else."""
    if isinstance(value, str) and value.strip().lower() == "dynamic":
        return None
    if isinstance(value, bool):
        raise GeReConfigError(
            f"gere_weight={value!r} is not valid: use 'dynamic' or a non-negative number such as 1 or 100."
        )
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise GeReConfigError(
            f"gere_weight={value!r} is not valid: use 'dynamic' or a non-negative number such as 1 or 100."
        ) from None
    if not math.isfinite(w) or w < 0:
        raise GeReConfigError(f"gere_weight={value!r} must be a finite number >= 0 (or 'dynamic').")
    return w


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int, hint: str) -> None:
    if not _is_int(value):
        raise GeReConfigError(f"{name}={value!r} must be an integer >= {minimum}. {hint}")
    if value < minimum:
        raise GeReConfigError(f"{name}={value!r} is out of range: it must be >= {minimum}. {hint}")


def validate_gere_values(values: dict[str, Any]) -> dict[str, Any]:
    """Validate (and normalise) a mapping of ``gere_*`` values; return the normalised mapping.

    Used by the dataclass ``__post_init__`` and by the Axolotl pydantic model, so both give the same
    errors. Unknown ``gere_*`` keys are rejected with the closest valid name.
    """
    from .config import gere_defaults, gere_fields

    known = {f.name for f in gere_fields()}
    out = dict(values)
    for key in values:
        if key.startswith("gere_") and key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise GeReConfigError(f"Unknown key '{key}'.{hint} Valid keys: {', '.join(sorted(known))}.")

    def get(name: str) -> Any:
        return out.get(name, gere_defaults()[name])

    replay = get("gere_replay")
    if replay is not None and (not isinstance(replay, str) or not replay.strip()):
        raise GeReConfigError(
            f"gere_replay={replay!r} must be a path (jsonl/json/parquet/txt file or folder) or a datasets id."
        )
    for name in ("gere_replay_split", "gere_replay_text_field"):
        v = get(name)
        if not isinstance(v, str) or not v:
            raise GeReConfigError(f"{name}={v!r} must be a non-empty string.")
    if get("gere_replay_size") is not None:
        _check_int("gere_replay_size", get("gere_replay_size"), 1, "The paper uses 1000; null/None = every usable text, at most 1000.")
    _check_int("gere_replay_max_length", get("gere_replay_max_length"), 2, "The reference uses 563.")
    _check_int("gere_replay_min_tokens", get("gere_replay_min_tokens"), 2, "A sample needs 2 tokens for a CE target.")
    per_step = get("gere_replay_per_step")
    if per_step is not None:
        _check_int("gere_replay_per_step", per_step, 1, "Use null/None for the default (a quarter of the global batch).")
    _validate_task_replay(get, out)
    reg = get("gere_regularizer")
    if reg not in REGULARIZERS:
        raise GeReConfigError(f"gere_regularizer={reg!r} is not one of {', '.join(REGULARIZERS)}.")
    weight = get("gere_weight")
    parse_weight(weight)
    if not isinstance(weight, str):
        out["gere_weight"] = str(float(weight)) if "gere_weight" in out else weight
    cap = get("gere_weight_max")
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(float(cap)) or cap <= 0:
            raise GeReConfigError(
                f"gere_weight_max={cap!r} must be a number > 0 (an upper bound of the dynamic weight) or null for no bound."
            )
        if "gere_weight_max" in out:
            out["gere_weight_max"] = float(cap)
    sigma = get("gere_sigma")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise GeReConfigError(f"gere_sigma={sigma!r} must be a number > 0 (the paper uses 1.0).")
    if not math.isfinite(float(sigma)) or float(sigma) <= 0:
        raise GeReConfigError(f"gere_sigma={sigma!r} must be > 0: thresholds are mu +- gere_sigma*sigma (paper: 1.0).")
    red = get("gere_tm_reduction")
    if red not in TM_REDUCTIONS:
        raise GeReConfigError(f"gere_tm_reduction={red!r} is not one of {', '.join(TM_REDUCTIONS)}.")
    layers = get("gere_layers")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
        out["gere_layers"] = layers
    if not isinstance(layers, (list, tuple)) or not layers or not all(_is_int(x) for x in layers):
        raise GeReConfigError(f"gere_layers={layers!r} must be a non-empty list of integers, e.g. [-1].")
    if len(set(layers)) != len(layers):
        raise GeReConfigError(f"gere_layers={layers!r} lists a layer twice.")
    cache = get("gere_state_cache")
    if cache is not None and (not isinstance(cache, str) or not cache.strip()):
        raise GeReConfigError(f"gere_state_cache={cache!r} must be a folder path or null.")
    _check_int("gere_state_batch_size", get("gere_state_batch_size"), 1, "Lower it if state building runs out of memory.")
    _check_int("gere_freeze_layers", get("gere_freeze_layers"), 0, "0 disables layer freezing.")
    if not isinstance(get("gere_freeze_embeddings"), bool):
        raise GeReConfigError(f"gere_freeze_embeddings={get('gere_freeze_embeddings')!r} must be true or false.")
    _check_int("gere_seed", get("gere_seed"), 0, "")
    _validate_task_methods(out, get)
    _validate_monitor(get, out)
    return out


def _check_number(name: str, value: Any, minimum: float, strict: bool, hint: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or (float(value) <= minimum if strict else float(value) < minimum):
        raise GeReConfigError(f"{name}={value!r} must be a number {'>' if strict else '>='} {minimum:g}. {hint}")
    return float(value)


def _validate_task_methods(out: dict[str, Any], get: Any) -> None:
    """The FLOW, EWC, task-KL and WiSE keys (each block on its own; numbers are normalised to float)."""
    for name in ("gere_flow", "gere_flow_normalize"):
        if not isinstance(get(name), bool):
            raise GeReConfigError(f"{name}={get(name)!r} must be true or false.")
    tau = get("gere_flow_tau")
    if tau is not None:
        value = _check_number("gere_flow_tau", tau, 0.0, True, "null = the median base loss (the paper).")
        if "gere_flow_tau" in out:
            out["gere_flow_tau"] = value
    cache = get("gere_flow_cache")
    if cache is not None and (not isinstance(cache, str) or not cache.strip()):
        raise GeReConfigError(f"gere_flow_cache={cache!r} must be a folder path or null.")
    _check_int("gere_flow_batch_size", get("gere_flow_batch_size"), 1, "Lower it if the base-loss pass runs out of memory.")
    lam = _check_number("gere_ewc_lambda", get("gere_ewc_lambda"), 0.0, False, "0 turns EWC off.")
    if "gere_ewc_lambda" in out:
        out["gere_ewc_lambda"] = lam
    gamma = get("gere_ewc_gamma")
    value = _check_number("gere_ewc_gamma", gamma, 0.0, False, "Online EWC decays the earlier Fisher by gamma in [0, 1].")
    if value > 1:
        raise GeReConfigError(f"gere_ewc_gamma={gamma!r} must be in [0, 1] (1 = plain accumulation over tasks).")
    if "gere_ewc_gamma" in out:
        out["gere_ewc_gamma"] = value
    _check_int("gere_ewc_samples", get("gere_ewc_samples"), 1, "The diagonal Fisher is estimated from this many task samples.")
    state = get("gere_ewc_state")
    if state is not None and (not isinstance(state, str) or not state.strip()):
        raise GeReConfigError(f"gere_ewc_state={state!r} must be the path of a gere_ewc folder or null.")
    kl = _check_number("gere_task_kl", get("gere_task_kl"), 0.0, False, "0 turns the KL to the base on task rows off.")
    if "gere_task_kl" in out:
        out["gere_task_kl"] = kl
    alpha = get("gere_wise_alpha")
    if alpha is not None:
        ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(float(alpha))
        if not ok or not 0 < float(alpha) <= 1:
            raise GeReConfigError(
                f"gere_wise_alpha={alpha!r} must be a number in (0, 1]: the share of this task's weight change that is "
                "kept (theta <- (1 - alpha) * theta_before + alpha * theta_after). Use e.g. 0.5-0.8, or null (or 1) "
                "to keep the trained weights as they are."
            )
        if "gere_wise_alpha" in out:
            out["gere_wise_alpha"] = float(alpha)


def check_key_combinations(values: dict[str, Any]) -> None:
    """Checks across keys (a sub-key of a method that is off); ``values`` holds the keys that are set."""
    from .config import gere_defaults

    def get(name: str) -> Any:
        return values.get(name, gere_defaults()[name])

    if not get("gere_flow"):
        for name in ("gere_flow_tau", "gere_flow_cache"):
            if get(name) is not None:
                raise GeReConfigError(f"{name} is set but gere_flow is false: set gere_flow: true to use FLOW, or drop {name}.")
    if get("gere_task_replay_logit_weight") and not get("gere_task_replay"):
        raise GeReConfigError(
            "gere_task_replay_logit_weight is set but gere_task_replay is not: logit replay acts on the earlier-task "
            "rows. Point gere_task_replay at the earlier tasks' files (with their .topk.safetensors snapshots), or "
            "set gere_task_replay_logit_weight to 0."
        )
    if get("gere_ewc_state") is not None and not get("gere_ewc_lambda"):
        raise GeReConfigError(
            "gere_ewc_state is set but gere_ewc_lambda is 0, so EWC is off: set gere_ewc_lambda > 0 or drop gere_ewc_state."
        )


def _validate_monitor(get: Any, out: dict[str, Any]) -> None:
    """The ``gere_monitor*`` checks of :func:`validate_gere_values`."""
    monitor = get("gere_monitor")
    if monitor is not None and (not isinstance(monitor, str) or not monitor.strip()):
        raise GeReConfigError(
            f"gere_monitor={monitor!r} must be a path (jsonl/json/parquet/txt file or folder) or a datasets id of "
            "held-out general texts."
        )
    _check_int("gere_monitor_size", get("gere_monitor_size"), 1, "64 texts cost little; more give a steadier curve.")
    _check_int("gere_monitor_steps", get("gere_monitor_steps"), 1, "The monitor also measures at step 0 and at the end.")
    _check_int("gere_monitor_max_length", get("gere_monitor_max_length"), 2, "A text needs 2 tokens to be scored.")
    _check_int("gere_monitor_task_size", get("gere_monitor_task_size"), 0, "0 turns gere/monitor_task_kl off.")
    rise = get("gere_monitor_max_ppl_rise")
    if rise is not None:
        if isinstance(rise, bool) or not isinstance(rise, (int, float)) or not math.isfinite(float(rise)) or rise <= 0:
            raise GeReConfigError(
                f"gere_monitor_max_ppl_rise={rise!r} must be a number > 0 (a relative rise: 0.2 = +20% held-out "
                "perplexity over the base model) or null for no guard."
            )
        out["gere_monitor_max_ppl_rise"] = float(rise) if "gere_monitor_max_ppl_rise" in out else rise
    action = get("gere_monitor_action")
    if action not in MONITOR_ACTIONS:
        raise GeReConfigError(f"gere_monitor_action={action!r} is not one of {', '.join(MONITOR_ACTIONS)}.")


def check_guard_has_monitor(values: Any) -> None:
    """The guard (``gere_monitor_max_ppl_rise``) needs the monitor (``gere_monitor``): a cross-key check,
    kept out of :func:`validate_gere_values` because :func:`gere_value_problems` checks keys one by one."""
    getter = values.get if hasattr(values, "get") else (lambda k, d=None: getattr(values, k, d))
    if getter("gere_monitor") is None and getter("gere_monitor_max_ppl_rise") is not None:
        raise GeReConfigError(
            "gere_monitor_max_ppl_rise is set but gere_monitor is not: the guard reads the monitor's perplexity. "
            "Point gere_monitor at held-out general texts, or remove gere_monitor_max_ppl_rise."
        )


def _validate_task_replay(get: Any, out: dict[str, Any]) -> None:
    """The ``gere_task_replay*`` keys (normalising one source given as a string to a list of one)."""
    sources = get("gere_task_replay")
    if isinstance(sources, str):
        sources = [sources]
        out["gere_task_replay"] = sources
    if sources is not None:
        if isinstance(sources, tuple):
            sources = list(sources)
            out["gere_task_replay"] = sources
        if not isinstance(sources, list) or not sources or not all(isinstance(x, str) and x.strip() for x in sources):
            raise GeReConfigError(
                f"gere_task_replay={sources!r} must be a non-empty list of paths or datasets ids (one per earlier "
                "task), e.g. [task1/train.jsonl, task2/train.jsonl]; null = no earlier-task replay."
            )
        if len(set(sources)) != len(sources):
            raise GeReConfigError(f"gere_task_replay={sources!r} lists a source twice; give each earlier task once.")
    split = get("gere_task_replay_split")
    if not isinstance(split, str) or not split:
        raise GeReConfigError(f"gere_task_replay_split={split!r} must be a non-empty string.")
    _check_int("gere_task_replay_size", get("gere_task_replay_size"), 1,
               "It is the most rows kept per earlier task (a few percent of its data is the usual choice).")
    per_step = get("gere_task_replay_per_step")
    if per_step is not None:
        _check_int("gere_task_replay_per_step", per_step, 1, "Use null/None for the default (an eighth of the global batch).")
    rho = get("gere_task_replay_weight")
    if rho is not None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(float(rho)) or not 0 < rho < 1:
            raise GeReConfigError(
                f"gere_task_replay_weight={rho!r} must be a number strictly between 0 and 1 (the earlier tasks' share "
                "of the task term), or null for their row share."
            )
        out["gere_task_replay_weight"] = float(rho) if "gere_task_replay_weight" in out else rho
    beta = get("gere_task_replay_logit_weight")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(float(beta)) or beta < 0:
        raise GeReConfigError(
            f"gere_task_replay_logit_weight={beta!r} must be a number >= 0 (beta of the KL to the stored logits of "
            "the earlier-task rows; 0 = off)."
        )
    if "gere_task_replay_logit_weight" in out:
        out["gere_task_replay_logit_weight"] = float(beta)
    _check_int("gere_task_replay_topk", get("gere_task_replay_topk"), 1,
               "It is the tokens per position a logit snapshot keeps (32 holds almost all of a trained model's mass).")


def gere_value_problems(values: dict[str, Any]) -> list[str]:
    """Every problem of a mapping of ``gere_*`` values, one message per key (not only the first).

    Each key is validated on its own (the others at their defaults), so one bad key does not hide
    another; ``axolotl gere check`` lists them all in one run.
    """
    problems = []
    for key, value in values.items():
        try:
            validate_gere_values({key: value})
        except GeReConfigError as e:
            problems.append(str(e))
    if not problems:
        try:
            check_key_combinations(values)
        except GeReConfigError as e:
            problems.append(str(e))
    return problems


def validate_gere_args(args: Any) -> None:
    """Validate the ``gere_*`` attributes of ``args`` in place (normalising ``gere_weight``/``gere_layers``)."""
    from .config import gere_fields

    values = {f.name: getattr(args, f.name) for f in gere_fields() if hasattr(args, f.name)}
    if isinstance(values.get("gere_weight"), (int, float)) and not isinstance(values.get("gere_weight"), bool):
        parse_weight(values["gere_weight"])
        values["gere_weight"] = str(float(values["gere_weight"]))
    norm = validate_gere_values(values)
    check_key_combinations(norm)
    for k, v in norm.items():
        setattr(args, k, v)
    check_guard_has_monitor(args)



def resolve_replay_per_step(per_step: Optional[int], global_batch: int, default_basis: Optional[int] = None) -> int:
    """Replay rows per optimizer step; checks they leave room for task rows in the global batch.

    ``default_basis``: what the default (a quarter) is taken of when it is not the global batch (GRPO:
    the step's prompts, ``global_batch / num_generations``).
    """
    if per_step is None:
        per_step = max(1, (global_batch if default_basis is None else default_basis) // 4)
    if per_step >= global_batch:
        raise GeReConfigError(
            f"gere_replay_per_step={per_step} must be smaller than the global batch ({global_batch} = per-device "
            "batch x gradient accumulation x processes), so that most rows of a step stay task rows. Lower "
            "gere_replay_per_step or raise the batch size / gradient_accumulation_steps."
        )
    return per_step


def resolve_task_replay_per_step(per_step: Optional[int], global_batch: int) -> int:
    """Earlier-task rows per optimizer step; at most as many as the step's task rows."""
    if per_step is None:
        per_step = max(1, global_batch // 8)
    if per_step > global_batch:
        raise GeReConfigError(
            f"gere_task_replay_per_step={per_step} is larger than the global batch ({global_batch} = per-device batch x "
            "gradient accumulation x processes): a step would hold more earlier-task rows than rows of the task being "
            "learned. Lower gere_task_replay_per_step or raise the batch size / gradient_accumulation_steps."
        )
    return per_step


def resolve_task_replay_weight(weight: Optional[float], per_step: int, global_batch: int) -> float:
    """The earlier tasks' share ``rho`` of the task term: the key, or the row share ``T / (B + T)``."""
    if weight is not None:
        return float(weight)
    return per_step / (global_batch + per_step)

