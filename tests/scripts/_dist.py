"""Shared ending of the launched multi-process scripts."""

from __future__ import annotations


def close_process_group() -> None:
    """Leave torch.distributed in order: every rank reaches a barrier, then the group is destroyed.

    Without it each rank exits with gloo's threads still running, and one of them can abort in the
    interpreter's teardown (``terminate called without an active exception``, SIGABRT) after its work
    is done and written, which fails the launch. A script calls it after ``main()`` returns; a rank that
    raised never gets there, and the launcher then stops the ranks waiting at the barrier.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
