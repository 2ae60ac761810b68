"""Helpers shared by the fault tests (imported by tests and by multinode_run.py)."""

import json
from pathlib import Path


def registered_checkpoints(storage: Path) -> int:
    """Checkpoints Ray Train's controller has registered (its snapshot file). Files on disk are not enough:
    a checkpoint reported shortly before a failure may never be registered, and is then not resumed from."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return len(snapshot.get("checkpoint_results") or [])
