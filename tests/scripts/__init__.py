"""Helper scripts the slow tests launch as subprocesses (not collected as tests)."""
