"""What every benchmark of the suite shares: the machine's description (with its load, since
the machine may be shared), aligned text tables, Markdown tables, JSON files and bar charts.
Pure functions, apart from the file writes; matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def machine() -> dict:
    """Date, CPUs, RAM and load averages now: figures from a loaded machine must say so."""
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "machine": platform.machine(), "ram_gib": round(pages * page_size / 2**30, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


# Ray starts its worker processes at the raylet's niceness + 15 (Ray's `worker_niceness`), so
# our rollout and learner workers run at nice 15 while an alternative timed in the driver would
# run at the driver's. On a shared machine that alone decides who gets the CPU.
RAY_WORKER_NICENESS = 15


def match_ray_workers_niceness() -> int:
    """Lower this process to the niceness of Ray's workers, so that an alternative timed here
    competes for the CPU on equal terms with them; returns the niceness now."""
    current = os.nice(0)
    return os.nice(max(0, min(19, RAY_WORKER_NICENESS + current) - current)) if current < 19 else current


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def text_table(title: str, header: list[str], rows: list[list]) -> str:
    """An aligned plain-text table: first column left, the others right."""
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title]
    for row in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def bar_chart(path: Path, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str,
              log: bool = False) -> Path:
    """Bars per label, one colour per series (side by side when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(labels) * len(series) ** 0.5), 3.4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, values, width, label=name, color=f"C{i}")
        ax.bar_label(bars, labels=[_cell(float(v)) for v in values], fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves_plot(path: Path, title: str, rewards: dict[str, list[float]],
                accuracy: dict[str, list[tuple[int, float]]]) -> Path:
    """Training reward per step (left) and held-out accuracy at the steps it was measured (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, (name, values) in enumerate(rewards.items()):
        left.plot(range(1, len(values) + 1), values, marker="." if len(values) < 40 else None, label=name, color=f"C{i}")
    for i, (name, points) in enumerate(accuracy.items()):
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name, color=f"C{i}")
    left.set(xlabel="RL step", ylabel="mean reward (train samples)")
    right.set(xlabel="RL step", ylabel="held-out accuracy (sampled)")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
