"""`zaya-rl report RUN_DIR`: a run's plots as PNG files and one HTML page that shows them.

Reads what a run writes: `metrics.jsonl`, one record per step as the run goes (zaya_rl/metrics.py:
loss, lr, reward, `sources` with each source's curriculum level, `expert_load` per layer and
expert, `rollout_tokens_per_second`), and `summary.json`, written when the run finishes (per
stage: held-out accuracy over all sources, by source and by level; the seconds each phase of
the steps took). A plot whose numbers are not there yet (a run that has not finished has no
summary.json; a run without rl stages has no reward) is left out, and the page says why.

The plots: training reward and loss; held-out accuracy per stage, per source and level;
generated tokens per second; the split of a step's time; expert load per layer as a heat
map; the curriculum's level of each source.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Where an RL or SFT step's time goes (Controller's StageTimes phases), in stacking order.
PHASES = ("generate", "verify", "train", "sync")


@dataclass
class Run:
    """What a run directory holds: its step records in order, and its summary once it has one."""

    path: Path
    steps: list[dict]
    summary: dict | None

    def stages(self) -> list[str]:
        """The stages in the order they ran."""
        return list(dict.fromkeys(r["stage"] for r in self.steps))

    def of_stage(self, stage: str, key: str) -> tuple[list[int], list]:
        """(run step, value) of every step of `stage` that logged `key`; the run step counts the
        steps of every stage before it, so stages follow each other on one axis."""
        pairs = [(i, r[key]) for i, r in enumerate(self.steps) if r["stage"] == stage and key in r]
        return [i for i, _ in pairs], [v for _, v in pairs]


def load_run(run_dir: Path) -> Run:
    """Step records are those with a learning rate: the stage-end records, `_recovery`,
    `_resume` and `<stage>/_prepare` records carry none."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return Run(run_dir, [r for r in records if "lr" in r], summary)


def _figure(rows: int = 1, cols: int = 1, width: float = 8.0, height: float = 3.6, sharex: bool = False):
    fig = Figure(figsize=(width, height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, sharex=sharex)


def _moving_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def _run_axis(run: Run, ax) -> None:
    """The whole run on the x axis, with a line where each stage after the first begins and
    each stage's name at its start."""
    ax.set_xlim(-0.5, len(run.steps) - 0.5)
    for stage in run.stages():
        first = next(i for i, r in enumerate(run.steps) if r["stage"] == stage)
        if first:
            ax.axvline(first - 0.5, color="grey", linewidth=0.8, linestyle=":")
        label = ax.text(first - 0.4, 0.97, stage, transform=ax.get_xaxis_transform(), fontsize=8, va="top",
                        color="grey")
        label.set_in_layout(False)


def plot_training(run: Run) -> Figure | str:
    """Mean reward of each RL step (and its moving mean), and every step's loss."""
    if not any("reward" in r for r in run.steps):
        return "no rl step logged yet"
    fig, axes = _figure(2, 1, sharex=True)
    reward_ax, loss_ax = axes[0][0], axes[1][0]
    for stage in run.stages():
        x, reward = run.of_stage(stage, "reward")
        if x:
            reward_ax.plot(x, reward, alpha=0.35, linewidth=0.8)
            reward_ax.plot(x, _moving_mean(reward, max(1, len(reward) // 10)), label=f"{stage} (moving mean)")
        x, loss = run.of_stage(stage, "loss")
        loss_ax.plot(x, loss, linewidth=0.8, label=stage)
    reward_ax.set(ylabel="training reward", title="Training reward (mean over each step's samples) and loss")
    loss_ax.set(xlabel="step of the run", ylabel="loss")
    for ax in (reward_ax, loss_ax):
        _run_axis(run, ax)
        ax.legend(fontsize=8)
    return fig


def held_out_series(stage_eval: dict) -> dict[str, float]:
    """One stage's held-out accuracies by "source, level N"; a summary written before
    per-source evaluation holds levels only."""
    by_source = stage_eval.get("by_source") or {"all sources": stage_eval}
    return {f"{source}, level {level}": accuracy for source, result in by_source.items()
            for level, accuracy in result["by_level"].items()}


def plot_held_out(run: Run) -> Figure | str:
    """Held-out accuracy after each evaluated stage, per source and level; a panel per mode
    (sampled, greedy), the accuracy over all sources in black with its 95% interval."""
    if run.summary is None:
        return "summary.json is written when the run finishes"
    stages = [(name, s) for name, s in run.summary["stages"].items() if "eval_sampled" in s]
    if not stages:
        return "no stage was evaluated"
    modes = [m for m in ("sampled", "greedy") if any(f"eval_{m}" in s for _, s in stages)]
    fig, axes = _figure(len(modes), 1)
    for ax, mode in zip((row[0] for row in axes), modes):
        # A stage's own eval block may leave greedy out: each panel has the stages that measured it.
        x = [i for i, (_, s) in enumerate(stages) if f"eval_{mode}" in s]
        evals = [stages[i][1][f"eval_{mode}"] for i in x]
        series = [held_out_series(e) for e in evals]
        for label in dict.fromkeys(k for s in series for k in s):
            ax.plot(x, [s.get(label, float("nan")) for s in series], marker="o", label=label)
        low = [e["accuracy"] - e["ci95"][0] for e in evals]
        high = [e["ci95"][1] - e["accuracy"] for e in evals]
        ax.errorbar(x, [e["accuracy"] for e in evals], yerr=[low, high], color="black", marker="s",
                    capsize=4, label="all sources (95% interval)")
        ax.set(ylabel=f"held-out accuracy, {mode}", ylim=(0, 1), xticks=range(len(stages)),
               xticklabels=[name for name, _ in stages], xlim=(-0.5, len(stages) - 0.5))
        ax.legend(fontsize=8)
    axes[0][0].set_title("Held-out accuracy after each stage, per source and level")
    return fig


def plot_tokens_per_second(run: Run) -> Figure | str:
    """The engines' generated tokens per second of generation in each step that generated."""
    if not any("rollout_tokens_per_second" in r for r in run.steps):
        return "no step generated yet"
    fig, axes = _figure()
    ax = axes[0][0]
    for stage in run.stages():
        x, rate = run.of_stage(stage, "rollout_tokens_per_second")
        if x:
            ax.plot(x, rate, marker=".", linewidth=0.8, label=stage)
    ax.set(xlabel="step of the run", ylabel="tokens / s", title="Generated tokens per second of generation")
    _run_axis(run, ax)
    ax.legend(fontsize=8)
    return fig


def plot_step_time(run: Run) -> Figure | str:
    """Seconds per step of each stage, split into its phases; `other` is the rest of the
    stage's training time (data, advantages, logging, checkpoints)."""
    if run.summary is None:
        return "summary.json is written when the run finishes"
    stages = [(name, s) for name, s in run.summary["stages"].items() if s["steps"]]
    if not stages:
        return "no stage took a step"
    fig, axes = _figure(height=0.6 * len(stages) + 1.6)
    ax = axes[0][0]
    y = list(range(len(stages)))
    left = [0.0] * len(stages)
    for phase in PHASES + ("other",):
        if phase == "other":
            widths = [(s["train_seconds"] - sum(s["phase_seconds"].values())) / s["steps"] for _, s in stages]
        else:
            widths = [s["phase_seconds"].get(phase, 0.0) / s["steps"] for _, s in stages]
        ax.barh(y, widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths)]
    ax.set(yticks=y, yticklabels=[f"{name} ({s['steps']} steps)" for name, s in stages], xlabel="seconds per step",
           title="Where a step's time went")
    ax.invert_yaxis()
    ax.legend(fontsize=8, ncols=len(PHASES) + 1, loc="lower right")
    return fig


def plot_expert_load(run: Run) -> Figure | str:
    """Per stage, the share of its steps' tokens routed to each expert of each layer (a layer
    sums to the experts per token), averaged over the stage's steps."""
    stages = [(stage, run.of_stage(stage, "expert_load")[1]) for stage in run.stages()]
    stages = [(stage, loads) for stage, loads in stages if loads]
    if not stages:
        return "no expert load logged (a dense model, or no step yet)"
    fig, axes = _figure(1, len(stages), width=4.2 * len(stages), height=3.4)
    for ax, (stage, loads) in zip(axes[0], stages):
        layers, experts = len(loads[0]), len(loads[0][0])
        mean = [[sum(load[layer][e] for load in loads) / len(loads) for e in range(experts)] for layer in range(layers)]
        image = ax.imshow(mean, cmap="viridis", aspect="auto")
        if layers * experts <= 128:  # small enough to print each share
            for layer in range(layers):
                for e in range(experts):
                    ax.text(e, layer, f"{mean[layer][e]:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set(xlabel="expert", ylabel="layer", title=f"{stage} ({len(loads)} steps)", xticks=range(experts),
               yticks=range(layers))
        fig.colorbar(image, ax=ax, label="share of tokens")
    fig.suptitle("Expert load per layer, mean over each stage's steps")
    return fig


def plot_curriculum(run: Run) -> Figure | str:
    """Each source's level and pass rate (over its window at that level) at every RL step."""
    if not any("sources" in r for r in run.steps):
        return "no rl step logged yet"
    fig, axes = _figure(2, 1, sharex=True)
    level_ax, rate_ax = axes[0][0], axes[1][0]
    top_level = 0
    for stage in run.stages():
        x, sources = run.of_stage(stage, "sources")
        for name in dict.fromkeys(n for step in sources for n in step):
            points = [(i, s[name]) for i, s in zip(x, sources) if name in s]
            label = f"{stage}: {name}"
            level_ax.step([i for i, _ in points], [m["level"] for _, m in points], where="post", label=label)
            top_level = max([top_level] + [m["level"] for _, m in points])
            rate_ax.plot([i for i, _ in points], [m["pass_rate"] for _, m in points], label=label)
    level_ax.set(ylabel="level", title="Curriculum: each source's level and pass rate", ylim=(-0.5, top_level + 0.5))
    level_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    rate_ax.set(xlabel="step of the run", ylabel="pass rate at its level", ylim=(0, 1))
    for ax in (level_ax, rate_ax):
        _run_axis(run, ax)
        ax.legend(fontsize=8)
    return fig


# (file name, title, drawing function): each function returns its figure, or why it cannot draw one.
PLOTS: list[tuple[str, str, Callable[[Run], Figure | str]]] = [
    ("training", "Training reward and loss", plot_training),
    ("held_out", "Held-out accuracy per stage, source and level", plot_held_out),
    ("tokens_per_second", "Generated tokens per second", plot_tokens_per_second),
    ("step_time", "Step-time split", plot_step_time),
    ("expert_load", "Expert load per layer", plot_expert_load),
    ("curriculum", "Curriculum levels", plot_curriculum),
]


def write_report(run_dir: Path, out_dir: Path) -> list[Path]:
    """Draw every plot that the run's files allow into `out_dir` as PNG, then `report.html`
    there; returns the page's path and the plots'. A plot not drawn this time loses its PNG
    of an earlier report, so what lies beside the page is what it shows."""
    run = load_run(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, written = [], []
    for name, title, draw in PLOTS:
        figure, png = draw(run), out_dir / f"{name}.png"
        if isinstance(figure, str):
            png.unlink(missing_ok=True)
            sections.append(f"<h2>{html.escape(title)}</h2>\n<p>Not drawn: {html.escape(figure)}.</p>")
        else:
            figure.savefig(png, dpi=100)
            written.append(png)
            sections.append(f'<h2>{html.escape(title)}</h2>\n<img src="{png.name}" alt="{html.escape(title)}">')
    page = out_dir / "report.html"
    page.write_text(_page(run, sections))
    return [page] + written


def _page(run: Run, sections: list[str]) -> str:
    title = f"zaya-rl run {run.summary['recipe'] if run.summary else run.path.name}"
    return "\n".join([
        "<!doctype html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:0.2em 0.6em;text-align:right}img{max-width:100%}</style>",
        "</head><body>", f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(str(run.path.resolve()))}: {len(run.steps)} steps logged; report written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.</p>",
        _stage_table(run), *sections, "</body></html>",
    ])


def _stage_table(run: Run) -> str:
    """Per stage: steps, wall time, and held-out accuracy (sampled, greedy) over all sources
    and per source."""
    if run.summary is None:
        return "<p>The run has not finished: no summary.json yet.</p>"
    rows = ["<tr><th>stage</th><th>steps</th><th>wall s</th><th>held-out source</th><th>problems</th>"
            "<th>sampled</th><th>95% interval</th><th>greedy</th></tr>"]
    for name, stage in run.summary["stages"].items():
        sampled, greedy = stage.get("eval_sampled"), stage.get("eval_greedy") or {}
        results = [("all", sampled, greedy)] if sampled else [("not evaluated", None, {})]
        if sampled and "by_source" in sampled:
            results += [(source, result, greedy.get("by_source", {}).get(source))
                        for source, result in sampled["by_source"].items()]
        for source, s, g in results:
            cells = [name, stage["steps"], f"{stage['wall_seconds']:.0f}", source, s["n"] if s else "",
                     f"{s['accuracy']:.3f}" if s else "", "[{:.3f}, {:.3f}]".format(*s["ci95"]) if s else "",
                     f"{g['accuracy']:.3f}" if g else ""]
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"
