"""Tracking can only cost a warning: a tracking server that is down (a real closed port on loopback) is
one line in the log, and the night's outputs are untouched."""

from __future__ import annotations

import logging
import socket

from dlbatch.config import load_config
from dlbatch.store import run_paths
from dlbatch.tracking import log_night


def test_a_tracking_server_that_is_down_is_one_warning_line(tmp_path, caplog):
    with socket.socket() as probe:  # a port that nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    cfg = load_config(None, [f"output_root={tmp_path}", "tasks=[text]", f"tracking.mlflow_uri={uri}"])
    paths = run_paths(str(tmp_path), "text", "2026-11-25")
    summary = {"task": "text", "run_id": paths.run_id, "verdict": {"status": "promoted", "reason": "ok"},
               "versions": {"dlbatch": "0.1.0"}, "config": {"train": {"epochs": 1}}, "history": []}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dlbatch"):
        assert log_night(cfg, summary, paths, "<html></html>") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"text: not logged to MLflow at {uri} ("), lines
    assert "\n" not in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written on its way out
