"""GeRe for TRL: the set-up pass, the replay step, the task-side terms and the thin trainers built on them.

=====================  ==================================================================================
module                 what it holds
=====================  ==================================================================================
``resources``          :class:`Resources`: the ONE set-up pass (every check, then every resource built once)
``step``               :class:`ReplayStep`: the per-micro-batch replay work (rows, forward, CE, ``w * R``)
``task_terms``         :class:`TaskTerms`: the task-side terms (FLOW, task KL, EWC) in the step
``mixin``              :class:`GeReTrainerMixin`, :func:`with_gere`, :func:`enable_gere`, :func:`setup_gere`
``scaling``            loss scaling under gradient accumulation and data parallelism
``metrics``            :class:`MetricBuffer`: ``gere/*`` values, one all-reduce per step
``families``           loss families (``sft`` / ``dpo`` / ``grpo``) and the refusal of unknown trainers
``checkpoint``         what a checkpoint carries and the resume check; ``resume``: which checkpoint resumes
``announce``           the one line printed at train start
``sft`` ``dpo`` ``grpo``  ``GeReSFTConfig``/``GeReSFTTrainer`` and friends (import TRL)
=====================  ==================================================================================

The names below were importable from ``gere_plugin.trainer`` when it was one module; they stay importable.
"""

from ..cache.state_cache import build_state_cache  # noqa: F401
from ..data.schedule import uneven_micro_batches  # noqa: F401
from ..model.introspection import autocast_of, is_peft, is_sharded, tokenizer_of, unwrap  # noqa: F401
from ..model.reference import check_ref_model, frozen_copy  # noqa: F401
from .announce import announce, describe_gere  # noqa: F401
from .checkpoint import GERE_STATE_FILE, GeReCheckpointCallback, check_resume  # noqa: F401
from .diagnostics import grad_balance  # noqa: F401
from .families import COMBINE_FAMILIES, FAMILIES, LossFamily, family_for  # noqa: F401
from .metrics import MetricBuffer  # noqa: F401
from .mixin import GeReTrainerMixin, enable_gere, setup_gere, with_gere  # noqa: F401
from .resources import Resources, resolve_family  # noqa: F401
from .scaling import StepScaling, forward_collectives, step_scaling, trainer_divides_by_accumulation  # noqa: F401
from .step import ReplayForward, ReplayStep  # noqa: F401
from .task_terms import TaskTerms, check_task_methods  # noqa: F401
