"""The jobs' command line: config and overrides in, the night's summary lines out, one-line errors and
the documented exit codes (0 success, 2 bad input or configuration, 3 below the floor or drift-blocked,
1 anything else)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from dlbatch.config import load_config
from dlbatch.errors import DlbatchError, QualityError

log = logging.getLogger("dlbatch")


def format_summary(summaries: list[dict[str, Any]]) -> str:
    lines = []
    for s in summaries:
        acc = s.get("test_accuracy")
        acc_text = f"test accuracy {acc:.2%}" if acc is not None else "no evaluation"
        rows = ", ".join(
            f"{k}: {v['used']}/{v['read']} used, {v['rejected']} rejected" for k, v in s["rows"].items()
        )
        lines.append(f"[{s['task']}] {acc_text} | {rows} | {s['durations_s']['total']:.0f}s")
        promotion = s.get("metrics", {}).get("promotion")
        status = s.get("verdict", {}).get("status")
        if status == "below_floor":
            lines.append(f"  BELOW THE QUALITY FLOOR: {s['verdict']['reason']}")
        elif status == "drifted":
            lines.append(f"  DRIFTED: {s['verdict']['reason']}")
        elif promotion:
            verdict = "promoted" if promotion["promoted"] else "NOT promoted"
            lines.append(
                f"  model {verdict}: {promotion['reason']}; scored with {promotion['champion_version']}"
            )
        if promotion and promotion.get("replaced_version"):
            lines.append(f"  force=true: this night's model replaced version {s['run_id'].split('-', 1)[1]} "
                         "in the model store and was decided again")  # fmt: skip
        for key in ("predictions", "model", "summary", "report"):
            if key in s["paths"]:
                lines.append(f"  {key}: {s['paths'][key]}")
    return "\n".join(lines)


def main(
    argv: list[str] | None,
    run: Callable[..., list[dict[str, Any]]],
    description: str,
    with_model: bool = False,
) -> int:
    """CLI wrapper shared by the jobs: config + overrides in, one-line error and non-zero exit on failure."""
    parser = _OneLineErrors(description=description)
    parser.add_argument("--config", help="YAML config file (default: built-in defaults = the demo)")
    parser.add_argument("--run-date", help="run date YYYY-MM-DD (default: today, UTC)")
    if with_model:
        parser.add_argument(
            "--model", help="checkpoint directory or URI (default: this run date's trained model)"
        )
    parser.add_argument(
        "--verbose", action="store_true", help="also log Ray Data's per-dataset execution banners"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. image.train.epochs=2"
    )
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides = list(args.overrides) + ([f"run_date={args.run_date}"] if args.run_date else [])
        overrides += ["verbose=true"] if args.verbose else []
        cfg = load_config(args.config, overrides)
        summaries = run(cfg, args.model) if with_model else run(cfg)
    except QualityError as err:  # the night's outputs are written; its summary still ends the log
        _stop_ray()
        print(format_summary(err.summaries))
        print(f"dlbatch: error: {err}", file=sys.stderr)
        return 3
    except DlbatchError as err:
        print(f"dlbatch: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Ray wraps worker errors; show the root cause in one line, details in the log
        log.debug("failure", exc_info=True)
        print(f"dlbatch: error: {_root_cause(err)}", file=sys.stderr)
        return 1
    _stop_ray()
    print(format_summary(summaries))
    return 0


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # flush and stop Ray's log streaming so the summary is the last thing printed


class _OneLineErrors(argparse.ArgumentParser):
    """A command-line mistake is one ``dlbatch: error:`` line (exit 2), like every other error."""

    def error(self, message: str):
        print(f"dlbatch: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _root_cause(err: BaseException) -> str:
    seen = err
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"
