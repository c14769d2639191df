"""The run report: one PNG of the training curves and a self-contained HTML page around it.

Built from the parsed run.json alone, so `spotlora report RUN_URI` works long after the pod is
gone. It reads:

- `log_history`: transformers' `trainer.state.log_history`. Throughput needs a wall-clock `time`
  on the entries, which `service.metrics.callback.MetricsCallback` stamps; trl's `num_tokens` is
  cumulative per process, so a pair of entries across a restart (where it falls) is skipped.
- `events`: `{"type": "checkpoint" | "preempted" | "resumed", "step": int, "time": float}`,
  drawn as vertical lines on every panel.
- `attempts` and `cost`: the ledger (service.ledger), drawn as a timeline of attempts, each
  coloured by how it ended, with what preemption took from it hatched (a restart's start-up,
  the work after its last commit), and summed up in the table and above the timeline.
- `name` (the manifest's `metadata.name`): the title.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# The Agg canvas on a bare Figure, not pyplot: no display needed, and no global figure state
# to leak or to share between threads.
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

PNG_NAME = "report.png"
HTML_NAME = "report.html"

# Event type -> (colour, line style, legend label). Colour-blind safe (Okabe-Ito).
EVENT_STYLES: dict[str, tuple[str, Any, str]] = {
    "checkpoint": ("#009E73", (0, (2, 3)), "checkpoint committed"),
    "preempted": ("#D55E00", "-", "preempted"),
    "resumed": ("#0072B2", (0, (6, 2)), "resumed"),
}
TRAIN_COLOUR = "#0072B2"
EVAL_COLOUR = "#E69F00"
NEUTRAL_COLOUR = "#444444"
MAX_MARKED_POINTS = 80  # beyond this, point markers turn a line into a smear


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _series(log_history: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps: list[int] = []
    values: list[float] = []
    for entry in log_history:
        value = _finite(entry.get(key))
        if value is not None and "step" in entry:
            steps.append(int(entry["step"]))
            values.append(value)
    return steps, values


def throughput(log_history: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float]]:
    """Tokens/s between consecutive training logs that carry `num_tokens` and `time`."""
    steps: list[int] = []
    rates: list[float] = []
    previous: Mapping[str, Any] | None = None
    for entry in log_history:
        tokens, stamp = _finite(entry.get("num_tokens")), _finite(entry.get("time"))
        if tokens is None or stamp is None or "loss" not in entry:
            continue
        if previous is not None:
            delta_tokens = tokens - previous["num_tokens"]
            delta_seconds = stamp - previous["time"]
            if delta_tokens > 0 and delta_seconds > 0:  # a fall in num_tokens: a new process
                steps.append(int(entry["step"]))
                rates.append(delta_tokens / delta_seconds)
        previous = entry
    return steps, rates


def _mark_events(ax: Axes, events: Sequence[Mapping[str, Any]]) -> None:
    for event in events:
        style = EVENT_STYLES.get(str(event.get("type")))
        step = _finite(event.get("step"))
        if style is None or step is None:
            continue
        colour, linestyle, _ = style
        width = 1.6 if event.get("type") == "preempted" else 1.0
        ax.axvline(step, color=colour, linestyle=linestyle, linewidth=width, alpha=0.8, zorder=1)


def _shade_lost_work(ax: Axes, events: Sequence[Mapping[str, Any]]) -> bool:
    """Shade the steps trained after the last commit before a preemption, then redone;
    whether there were any."""
    shaded = False
    preempted_at: float | None = None
    for event in sorted(events, key=lambda e: _finite(e.get("time")) or 0.0):
        step = _finite(event.get("step"))
        if step is None:
            continue
        if event.get("type") == "preempted":
            preempted_at = step
        elif event.get("type") == "resumed" and preempted_at is not None:
            if preempted_at > step:
                ax.axvspan(step, preempted_at, color=EVENT_STYLES["preempted"][0], alpha=0.12)
                shaded = True
            preempted_at = None
    return shaded


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#888888")


def summary(run_record: Mapping[str, Any]) -> dict[str, str]:
    """The figures a reader wants first, as display strings."""
    history = run_record.get("log_history") or []
    events = run_record.get("events") or []
    counts = {kind: sum(1 for e in events if e.get("type") == kind) for kind in EVENT_STYLES}
    _, train = _series(history, "loss")
    _, evals = _series(history, "eval_loss")
    steps = [int(e["step"]) for e in history if "step" in e]
    tokens = [t for e in history if (t := _finite(e.get("num_tokens"))) is not None]
    _, rates = throughput(history)
    return {
        "steps": str(max(steps, default=0)),
        "final train loss": f"{train[-1]:.4f}" if train else "-",
        "best eval loss": f"{min(evals):.4f}" if evals else "-",
        "median tokens/s": f"{sorted(rates)[len(rates) // 2]:,.0f}" if rates else "-",
        "tokens (last process)": f"{tokens[-1]:,.0f}" if tokens else "-",
        "checkpoints": str(counts["checkpoint"]),
        # The ledger also counts attempts killed outright, which left no event behind.
        "preemptions": str((run_record.get("cost") or {}).get("preemptions", counts["preempted"])),
        "resumes": str(counts["resumed"]),
        **_bill(run_record.get("cost") or {}),
        **_against_estimate(run_record),
    }


def _against_estimate(run_record: Mapping[str, Any]) -> dict[str, str]:
    """What the run estimated at its start (service.estimate) beside what it took."""
    est = run_record.get("estimate") or {}
    if not est:
        return {}
    cost = run_record.get("cost") or {}
    measured = run_record.get("throughput") or {}

    def pair(a: Any, b: Any, fmt: str) -> str:
        return " / ".join("-" if (v := _finite(x)) is None else fmt.format(v) for x in (a, b))

    wall, seconds = _finite(est.get("wall_seconds")), _finite(cost.get("seconds"))
    return {
        "tokens/s, estimated / measured": pair(
            est.get("tokens_per_second"), measured.get("tokens_per_second"), "{:,.0f}"
        ),
        "minutes, estimated / actual": pair(wall and wall / 60, seconds and seconds / 60, "{:.1f}"),
        "cost, estimated / actual": pair(est.get("spot_usd"), cost.get("total_usd"), "${:,.4f}"),
    }


def _bill(cost: Mapping[str, Any]) -> dict[str, str]:
    if not cost:
        return {}

    def usd(key: str) -> str:
        value = _finite(cost.get(key))
        return "-" if value is None else f"${value:,.4f}"

    return {
        "attempts": str(cost.get("attempts", "-")),
        "cost": usd("total_usd"),
        "lost to preemption": f"{usd('lost_to_preemption_usd')} "
        f"({(cost.get('lost_work_seconds', 0) + cost.get('restart_seconds', 0)) / 60:.1f} min)",
        "per million tokens": usd("per_million_tokens_usd"),
        "on demand, the same run": usd("on_demand_usd"),
    }


def bill_line(cost: Mapping[str, Any]) -> str | None:
    """The bill against on demand, in one line above the attempts."""
    bill = _bill(cost)
    if not bill:
        return None
    return (
        f"cost {bill['cost']}, lost to preemption {bill['lost to preemption']}; "
        f"on demand, the same run: {bill['on demand, the same run']}"
    )


OUTCOME_COLOURS = {
    "done": "#009E73",
    "preempted": "#E69F00",
    "killed": "#D55E00",
    "failed": "#CC79A7",
    "superseded": "#999999",
}


def _attempts_timeline(ax: Axes, attempts: Sequence[Mapping[str, Any]]) -> None:
    """One bar per attempt on wall-clock minutes, the lost work at its end shaded."""
    starts = [_finite(a.get("started_unix")) for a in attempts]
    t0 = min((s for s in starts if s is not None), default=None)
    if t0 is None:
        _no_data(ax, "no attempts recorded")
        return
    for i, a in enumerate(attempts):
        start, end = _finite(a.get("started_unix")), _finite(a.get("ended_unix"))
        if start is None or end is None:
            continue
        colour = OUTCOME_COLOURS.get(str(a.get("outcome")), NEUTRAL_COLOUR)
        left, width = (start - t0) / 60, max(end - start, 0.0) / 60
        ax.barh(i, width, left=left, color=colour, alpha=0.85, height=0.6)
        lost = (_finite(a.get("lost_seconds")) or 0.0) / 60
        if lost > 0:
            ax.barh(i, min(lost, width), left=left + width - min(lost, width), color="none",
                    edgecolor="#222222", hatch="///", height=0.6)  # fmt: skip
        restart = (_finite(a.get("setup_seconds")) or 0.0) / 60 if i else 0.0
        if restart > 0:  # a start-up repeated because of the preemption before it
            ax.barh(i, min(restart, width), left=left, color="none", edgecolor="#222222",
                    hatch="///", height=0.6)  # fmt: skip
        label = f"{a.get('outcome')}, +{a.get('steps_gained', 0)} steps"
        if _finite(a.get("cost_usd")) is not None:
            label += f", ${a['cost_usd']:.4f}"
        ax.text(left + width, i, f"  {label}", va="center", fontsize=8)
    ax.set_yticks(range(len(attempts)), [f"attempt {i + 1}" for i in range(len(attempts))])
    ax.invert_yaxis()
    ax.set_xlabel(
        "minutes since the run's first attempt started "
        "(hatched: lost to preemption, a restart's start-up and work after the last commit)"
    )


def plot(run_record: Mapping[str, Any], path: Path) -> Path:
    history = run_record.get("log_history") or []
    events = run_record.get("events") or []
    name = run_record.get("name") or "spotlora run"

    attempts = run_record.get("attempts") or []
    fig = Figure(figsize=(10, 10.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax, tps_ax, attempts_ax = fig.subplots(4, 1, height_ratios=(2.2, 1, 1, 0.9))
    lr_ax.sharex(loss_ax)
    tps_ax.sharex(loss_ax)
    train_steps, train_loss = _series(history, "loss")
    eval_steps, eval_loss = _series(history, "eval_loss")
    if train_steps:
        loss_ax.plot(train_steps, train_loss, color=TRAIN_COLOUR, linewidth=1.4, label="train")
    if eval_steps:
        loss_ax.plot(
            eval_steps, eval_loss, color=EVAL_COLOUR, linewidth=1.4, markersize=4, label="eval",
            marker="o" if len(eval_loss) <= MAX_MARKED_POINTS else None,
        )  # fmt: skip
    if not (train_steps or eval_steps):
        _no_data(loss_ax, "no loss logged")
    loss_ax.set_ylabel("loss")

    lr_steps, lrs = _series(history, "learning_rate")
    if lr_steps:
        lr_ax.plot(lr_steps, lrs, color=NEUTRAL_COLOUR, linewidth=1.2)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        _no_data(lr_ax, "no learning rate logged")
    lr_ax.set_ylabel("learning rate")

    tps_steps, rates = throughput(history)
    if tps_steps:
        marker = "." if len(rates) <= MAX_MARKED_POINTS else None
        tps_ax.plot(tps_steps, rates, color=NEUTRAL_COLOUR, linewidth=1.2, marker=marker)
        tps_ax.set_ylim(bottom=0)
    else:
        _no_data(tps_ax, "no throughput: log entries carry no num_tokens/time")
    tps_ax.set_ylabel("tokens / s")
    tps_ax.set_xlabel("step")

    _attempts_timeline(attempts_ax, attempts)
    line = bill_line(run_record.get("cost") or {})
    if line:
        attempts_ax.set_title(line, loc="left", fontsize=10)
    for side in ("top", "right"):
        attempts_ax.spines[side].set_visible(False)
    redone = False
    for ax in (loss_ax, lr_ax, tps_ax):
        redone = _shade_lost_work(ax, events)
        _mark_events(ax, events)
        ax.grid(True, color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)

    handles, _ = loss_ax.get_legend_handles_labels()
    present = {str(e.get("type")) for e in events}
    handles += [
        Line2D([], [], color=colour, linestyle=style, label=label)
        for kind, (colour, style, label) in EVENT_STYLES.items()
        if kind in present
    ]
    if redone:
        handles.append(
            Patch(color=EVENT_STYLES["preempted"][0], alpha=0.12, label="steps redone after resume")
        )
    if handles:
        loss_ax.legend(handles=handles, loc="upper right", frameon=False, fontsize=9)

    facts = summary(run_record)
    fig.suptitle(
        f"{name}: {facts['steps']} steps, {facts['checkpoints']} checkpoints, "
        f"{facts['preemptions']} preemptions",
        fontsize=13,
    )
    fig.savefig(path, dpi=110)
    return path


def write_report(run_record: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write report.png and report.html (the PNG inlined) into out_dir; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(run_record, out_dir / PNG_NAME)
    name = run_record.get("name") or "spotlora run"
    rows = "\n".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>"
        for key, value in summary(run_record).items()
    )
    samples = _samples_table(run_record.get("evaluation") or {})
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    page = out_dir / HTML_NAME
    page.write_text(
        f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(name)}: spotlora run report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1120px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; }}
th, td {{ text-align: left; padding: 0.25rem 1rem 0.25rem 0; border-bottom: 1px solid #ddd; }}
th {{ font-weight: 600; }}
td.text {{ white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.85rem;
  vertical-align: top; max-width: 22rem; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>{html.escape(name)}</h1>
<table>
{rows}
</table>
<img alt="loss, learning rate and throughput by step" src="data:image/png;base64,{image}">
{samples}
</body></html>
""",
        encoding="utf-8",
    )
    return [png, page]


def _samples_table(evaluation: Mapping[str, Any]) -> str:
    """Generation samples, the base model's answer beside the trained one's, and the task
    metrics before and after."""
    samples = evaluation.get("samples") or []
    metrics = evaluation.get("metrics") or {}
    parts = []
    if metrics.get("after"):
        rows = "".join(
            f"<tr><th>{html.escape(name)}</th>"
            f"<td>{metrics.get('before', {}).get(name, 0):.1%}</td><td>{value:.1%}</td></tr>"
            for name, value in metrics["after"].items()
        )
        parts.append(
            "<h2>Task metrics</h2><table><tr><th></th><th>base</th><th>trained</th></tr>"
            f"{rows}</table>"
        )
    if samples:
        cells = "".join(
            "<tr>"
            + "".join(
                f'<td class="text">{html.escape(str(s.get(key) or ""))}</td>'
                for key in ("prompt", "reference", "before", "after")
            )
            + "</tr>"
            for s in samples
        )
        parts.append(
            "<h2>Samples</h2><table><tr><th>prompt</th><th>reference</th><th>base model</th>"
            f"<th>trained</th></tr>{cells}</table>"
        )
    return "\n".join(parts)
