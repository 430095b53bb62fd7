"""Moved to :mod:`gere_plugin.methods.flow`; this path keeps old imports working."""

from .methods.flow import (  # noqa: F401
    COLLATOR_COLUMNS,
    FLOW_FORMAT_VERSION,
    FORWARD_KEYS,
    Flow,
    FlowTable,
    batch_digests,
    compute_base_losses,
    flow_folder,
    flow_weights,
    median_tau,
    prepare_flow,
    row_digest,
    rows_fingerprint,
    task_batches,
    weight_summary,
    weighted_task_loss,
    weights_fingerprint,
)
