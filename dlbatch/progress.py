"""Progress of a long stage as periodic log lines: what ``ray job logs -f`` shows between a stage's start
and its one-line result, where a terminal would show Ray Data's progress bar."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("dlbatch")


@contextlib.contextmanager
def heartbeat(label: str, every_s: float, done: Callable[[], str] | None = None) -> Iterator[None]:
    """Log ``<label>: running for N s[, <done()>]`` every ``every_s`` seconds until the block ends.
    ``done``: what has been done so far, in words (a failure to say it is left out, never raised)."""
    if every_s <= 0:
        yield
        return
    stop = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every_s):
            extra = ""
            if done is not None:
                try:
                    extra = f", {done()}"
                except Exception:  # noqa: BLE001 (a progress line must never fail the stage)
                    extra = ""
            log.info("%s: running for %.0fs%s", label, time.perf_counter() - started, extra)

    thread = threading.Thread(target=beat, name=f"heartbeat {label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
