"""A self-contained HTML report per task run: what a person opens in the morning.

Plots (matplotlib, Agg backend) are embedded as base64 SVGs, so the page has no external references. Their
text stays text, drawn by the browser with its own fonts: label names in any script (matplotlib's bundled
font has no CJK glyphs, and a PNG of Chinese labels showed empty boxes).
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from typing import Any

import numpy as np

from dlbatch.profile import FEATURES
from dlbatch.quality import per_class_scores


def _svg(fig) -> str:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}), warnings.catch_warnings():
        # Layout measures with the bundled font, which lacks CJK glyphs; the browser draws them.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(buf, format="svg", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _curves(history: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    ax_acc.plot(
        epochs, [h["val_accuracy"] for h in history], marker="o", color="tab:green", label="val accuracy"
    )
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    data = _svg(fig)
    plt.close(fig)
    return data


def _confusion_plot(confusion: list[list[int]], names: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(names), 1 + 0.5 * len(names)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black"
        )
    data = _svg(fig)
    plt.close(fig)
    return data


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _shown(value: Any) -> str:
    """A profile value in a table cell: a distribution as its largest shares, a number rounded."""
    if isinstance(value, dict):
        total = sum(value.values()) or 1
        top = sorted(value.items(), key=lambda kv: -kv[1])[:4]
        more = f", +{len(value) - 4} more" if len(value) > 4 else ""
        return ", ".join(f"{k} {n / total:.0%}" for k, n in top) + more
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _profile_section(summary: dict[str, Any]) -> str:
    """Each split's input profile beside the references' (previous night, champion's training data), with
    one distance per feature; drifted ones are marked."""
    drift = summary.get("drift") or {}
    profiles = summary.get("profile") or {}
    if not profiles:
        return ""
    refs = drift.get("reference_profiles", {})
    names = list(refs)
    what = drift.get("references", {})
    drifted = {(d["split"], d["feature"], d["against"]) for d in drift.get("drifted", [])}
    header = ["split", "feature", "tonight"]
    for name in names:
        header += [what.get(name, name), "distance"]
    rows = []
    for split, profile in profiles.items():
        if not profile:
            continue
        rows.append([split, "rows", profile["rows"], *([""] * (2 * len(names)))])
        for feature, distances in drift.get("distances", {}).get(split, {}).items():
            row = [split, feature, _shown(profile.get(feature))]
            for name in names:
                ref = refs[name].get(split, refs[name].get("*")) or {}
                distance = distances.get(name)
                mark = " (drifted)" if (split, feature, name) in drifted else ""
                row += [_shown(ref.get(feature)), "" if distance is None else f"{distance:.3f}{mark}"]
            rows.append(row)
        if split not in drift.get("distances", {}):
            for feature in FEATURES.get(summary["task"], ()):
                if feature in profile:
                    rows.append([split, feature, _shown(profile[feature]), *([""] * (2 * len(names)))])
    threshold = drift.get("threshold")
    note = (
        f"<p>Distances above {threshold:g} are drift (drift.action={html.escape(drift.get('action', 'warn'))})."
        + ("" if names else " No earlier night to compare with yet.") + "</p>"
        if threshold is not None else ""
    )  # fmt: skip
    return "<h2>Input profile and drift</h2>" + note + _table(header, rows)


VERDICTS = {
    "drifted": "Drifted",
    "promoted": "Promoted",
    "kept_champion": "Kept the champion",
    "below_floor": "Below the quality floor",
    "trained": "Trained",
}


def render_report(summary: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    """HTML for one task's run summary (``summary.json``), compared with the previous night's if given."""
    metrics = summary.get("metrics", {})
    names = metrics.get("label_names", [])
    parts = [f"<h1>dlbatch {html.escape(summary['task'])} — {html.escape(summary['run_id'])}</h1>"]
    verdict = summary.get("verdict")
    if verdict:  # the night at a glance: what happened and why, in one sentence
        title = VERDICTS.get(verdict["status"], verdict["status"])
        parts.append(
            f"<p id='verdict' class='{html.escape(verdict['status'])}'><b>{html.escape(title)}</b>: "
            f"{html.escape(verdict['reason'])}.</p>"
        )
    acc = summary.get("test_accuracy")
    prev_acc = (previous or {}).get("test_accuracy")
    line = f"test accuracy <b id='test-accuracy'>{acc:.2%}</b>" if acc is not None else "no evaluation"
    if prev_acc is not None and acc is not None:
        line += f" (previous night {html.escape(previous['run_id'])}: {prev_acc:.2%}, change {100 * (acc - prev_acc):+.2f} points)"
    if metrics.get("test_macro_f1") is not None:
        line += (
            f"; macro-F1 <b id='macro-f1'>{metrics['test_macro_f1']:.2%}</b>, balanced accuracy "
            f"<b id='balanced-accuracy'>{metrics['test_balanced_accuracy']:.2%}</b>"
        )
    quality = metrics.get("quality")
    if quality:
        line += (
            f"; baselines on the same rows: majority class {quality['majority_accuracy']:.2%}, chance "
            f"{quality['chance_accuracy']:.2%}, quality floor {quality['floor']:.2%}"
        )
        if quality.get("metric", "accuracy") != "accuracy":
            line += f" (on {html.escape(quality['metric'])}: majority class {quality['baseline']:.2%})"
    parts.append(f"<p>{line}</p>")
    promotion = metrics.get("promotion")
    if promotion:
        decided = "promoted" if promotion["promoted"] else "not promoted"
        scored = promotion["champion_version"]
        then = f"Scored with champion {html.escape(scored)}." if scored else "No predictions published."
        forced = (
            " force=true: this night's stored version was replaced."
            if promotion.get("replaced_version")
            else ""
        )
        parts.append(
            f"<p id='promotion'>Model {decided}: {html.escape(promotion['reason'])}. {then}{forced}</p>"
        )
    if summary.get("history"):
        parts.append(
            f"<h2>Training</h2><img alt='loss and accuracy per epoch' src='data:image/svg+xml;base64,{_curves(summary['history'])}'>"
        )
        parts.append(_table(
            ["epoch", "train loss", "val loss", "val accuracy", "samples/s", "seconds"],
            [[h["epoch"] + 1, f"{h['train_loss']:.4f}", f"{h['val_loss']:.4f}", f"{h['val_accuracy']:.2%}",
              f"{h['samples_per_s']:,.0f}", f"{h['epoch_s']:.1f}"] for h in summary["history"]],
        ))  # fmt: skip
    if metrics.get("confusion"):
        parts.append(
            f"<h2>Test set</h2><img alt='confusion matrix' src='data:image/svg+xml;base64,{_confusion_plot(metrics['confusion'], names)}'>"
        )
        scores = per_class_scores(metrics["confusion"])
        parts.append(_table(
            ["class", "precision", "recall", "F1", "support"],
            [[n, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}", s["support"]] for n, s in zip(names, scores, strict=True)],
        ))  # fmt: skip
    parts.append(_profile_section(summary))
    rows = summary.get("rows", {})
    durations = summary.get("durations_s", {})
    stage_rows = []
    for stage, split in (("preprocess", "train"), ("evaluate", "test"), ("predict", "score")):
        if stage in durations and split in rows:
            stage_rows.append(
                [
                    stage,
                    f"{durations[stage]:.1f}",
                    rows[split]["read"],
                    f"{rows[split]['read'] / max(durations[stage], 1e-9):,.0f}",
                ]
            )
    if "train" in durations:
        stage_rows.append(["train", f"{durations['train']:.1f}", "", ""])
    parts.append("<h2>Stages</h2>" + _table(["stage", "seconds", "rows", "rows/s"], stage_rows))
    parts.append("<h2>Rows</h2>" + _table(
        ["split", "read", "used", "rejected"], [[s, c["read"], c["used"], c["rejected"]] for s, c in rows.items()]
    ))  # fmt: skip
    style = "body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>dlbatch {html.escape(summary['run_id'])}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
