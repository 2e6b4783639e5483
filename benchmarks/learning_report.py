"""The summary of the learning benchmark's runs (`benchmarks/learning.py`): per-method statistics over seeds, paired
differences with bootstrap intervals, the Markdown tables and the plot.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any

from benchmarks.learning_runs import METHODS, TASKS

# Paired comparisons of the final reward, (method, baseline), per seed; reported where both methods ran.
PAIRS = (
    ("vppo", "grpo"),
    ("vppo_guard", "grpo"),
    ("vppo_guard", "vppo"),
    ("vppo_guard_level", "grpo"),
    ("vppo_guard", "vppo_guard_level"),
    ("vppo_official_tas", "vppo"),
)
BOOTSTRAP_RESAMPLES = 10_000
WINDOW = 20  # steps of the moving average that steps-to-threshold and the final reward are read from
THRESHOLD = 0.5  # chance is 0.25


def moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def steps_to_threshold(rewards: list[float], window: int, threshold: float) -> int | None:
    """First step whose `window`-step moving-average reward reaches `threshold` (None if never)."""
    return next((i + 1 for i, value in enumerate(moving_average(rewards, window)) if value >= threshold), None)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def metric_mean(log: list[dict], key: str, last: int | None = None) -> float | None:
    values = [row[key] for row in log if row.get(key) is not None]
    if last is not None:
        values = values[-last:]
    return statistics.fmean(values) if values else None


def paired_bootstrap(differences: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Mean of per-seed paired differences and its 95% percentile bootstrap interval (seeds resampled)."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(differences, k=len(differences))) for _ in range(resamples))
    return {
        "mean": statistics.fmean(differences),
        "low": means[int(0.025 * resamples)],
        "high": means[int(0.975 * resamples) - 1],
        "wins": sum(d > 0 for d in differences),
        "losses": sum(d < 0 for d in differences),
        "seeds": len(differences),
        "differences": differences,
    }


def paired_differences(results: list[dict[str, Any]], window: int) -> dict[str, Any]:
    """Per task, for each pair of `PAIRS` that ran: final-reward differences paired by seed, bootstrap intervals."""
    final = {
        (r["task"], r["method"], r["seed"]): statistics.fmean(row["reward"] for row in r["log"][-window:])
        for r in results
    }
    paired: dict[str, Any] = {}
    for task in sorted({r["task"] for r in results}, key=TASKS.index):
        for method, baseline in PAIRS:
            seeds = sorted(
                seed for t, m, seed in final if t == task and m == method and (task, baseline, seed) in final
            )
            if len(seeds) >= 2:
                differences = [final[task, method, seed] - final[task, baseline, seed] for seed in seeds]
                paired.setdefault(task, {})[f"{method} - {baseline}"] = paired_bootstrap(differences)
    return paired


def colour_kept_where_dependencies_carry_signal(log: list[dict]) -> float | None:
    """
    TGF's colour-token share over the steps whose guard statistic (the kept tokens' mean dependency at the configured
    ratio) reaches `cold_start_guard_full`, where the guard is fully open. VPPO without the guard logs the same
    statistic as `vppo/dependency_selected_mean`. None for a method without TGF or a run without such a step.
    """
    from vppo_trl.method.config import VPPOConfig

    full = VPPOConfig.__dataclass_fields__["cold_start_guard_full"].default
    values = []
    for row in log:
        statistic = row.get("vppo/guard_dependency")
        if statistic is None:  # no guard: VPPO logs the same statistic under its own name
            statistic = row.get("vppo/dependency_selected_mean")
        if statistic is not None and statistic >= full and row.get("learning/colour_kept") is not None:
            values.append(row["learning/colour_kept"])
    return statistics.fmean(values) if values else None


def summarise(results: list[dict[str, Any]], window: int, threshold: float) -> dict[str, Any]:
    """Per task and method, over seeds: steps to threshold, final reward, TGF's colour-token share and dependencies."""
    summary: dict[str, Any] = {}
    for task in sorted({r["task"] for r in results}, key=TASKS.index):
        summary[task] = {}
        for method in sorted({r["method"] for r in results if r["task"] == task}, key=list(METHODS).index):
            runs = sorted((r for r in results if r["task"] == task and r["method"] == method), key=lambda r: r["seed"])
            rewards = [[row["reward"] for row in r["log"]] for r in runs]
            reached = [steps_to_threshold(values, window, threshold) for values in rewards]
            entry = {
                "seeds": [r["seed"] for r in runs],
                "final_reward": spread([statistics.fmean(values[-window:]) for values in rewards]),
                "steps_to_threshold": [step for step in reached],
                "reached": sum(step is not None for step in reached),
                "train_seconds": spread([r["train_seconds"] for r in runs]),
            }
            if any(step is not None for step in reached):
                entry["steps_to_threshold_reached"] = spread([step for step in reached if step is not None])
            for key, name in (
                ("learning/colour_kept", "colour_kept"),
                ("learning/tokens_kept", "tokens_kept"),
                ("learning/colour_dependency", "colour_dependency"),
                ("learning/other_dependency", "other_dependency"),
                ("vppo/guard_openness", "guard_openness"),
                ("vppo/advantage_scale_max", "advantage_scale_max"),
                ("learning/scale_gap", "scale_gap"),
                ("learning/net_advantage", "net_advantage"),
                ("entropy", "entropy"),
            ):
                first = [metric_mean(r["log"], key, None) for r in runs]
                values = [metric_mean(r["log"], key, window) for r in runs]
                if all(value is not None for value in values):
                    entry[f"{name}_last{window}"] = spread(values)
                    entry[f"{name}_all"] = spread(first)
            # Over the runs that had such a step at all.
            open_kept = [colour_kept_where_dependencies_carry_signal(r["log"]) for r in runs]
            if any(value is not None for value in open_kept):
                entry["colour_kept_open"] = spread([value for value in open_kept if value is not None])
                entry["colour_kept_open_runs"] = sum(value is not None for value in open_kept)
            first_window = [metric_mean(r["log"][:window], "vppo/guard_openness") for r in runs]
            if all(value is not None for value in first_window):
                entry[f"guard_openness_first{window}"] = spread(first_window)
            summary[task][method] = entry
    return summary


def format_table(summary: dict[str, Any], window: int, threshold: float) -> str:
    def cell(stats: dict | None, digits: int = 2) -> str:
        if stats is None:
            return "-"
        return f"{stats['mean']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"

    lines = []
    for task, methods in summary.items():
        lines += [
            f"#### Task `{task}`",
            "",
            f"| method | final reward (last {window} steps) | steps to avg{window} >= {threshold} | reached | "
            f"colour token kept by TGF (all steps / last {window}) | tokens kept | "
            "colour token kept where the guard statistic >= full | "
            f"guard openness (first {window} / all / last {window}) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, entry in methods.items():
            steps = entry.get("steps_to_threshold_reached")
            steps_cell = "-" if steps is None else f"{steps['mean']:.0f} ({steps['min']:.0f}-{steps['max']:.0f})"
            kept_all, kept_last = entry.get("colour_kept_all"), entry.get(f"colour_kept_last{window}")
            kept = "all" if kept_all is None else f"{cell(kept_all)} / {cell(kept_last)}"
            tokens = "all" if entry.get("tokens_kept_all") is None else cell(entry["tokens_kept_all"])
            open_kept = "-"
            if entry.get("colour_kept_open") is not None:
                open_kept = (
                    f"{cell(entry['colour_kept_open'])}, {entry['colour_kept_open_runs']}/{len(entry['seeds'])} runs"
                )
            guard = "-"
            if entry.get("guard_openness_all") is not None:
                guard = " / ".join(
                    cell(entry[key])
                    for key in (f"guard_openness_first{window}", "guard_openness_all", f"guard_openness_last{window}")
                )
            lines.append(
                f"| {method} | {cell(entry['final_reward'])} | {steps_cell} | "
                f"{entry['reached']}/{len(entry['seeds'])} | {kept} | {tokens} | "
                f"{open_kept} | {guard} |"
            )
        lines.append("")
    return "\n".join(lines)


def format_tilt_table(summary: dict[str, Any], window: int) -> str:
    """Per task and method: how far TAS's applied scales follow the advantage's sign, and the policy's entropy."""
    lines = [
        "#### TAS's tilt: the scales by the advantage's sign, and the policy's entropy",
        "",
        "| task | method | scale gap, negative - positive (all steps) | mean shaped advantage (all steps) | "
        f"entropy (all steps / last {window}) |",
        "|---|---|---|---|---|",
    ]
    for task, methods in summary.items():
        for method, entry in methods.items():
            if entry.get("entropy_all") is None:
                continue
            gap, net = entry.get("scale_gap_all"), entry.get("net_advantage_all")
            gap_cell = "-" if gap is None else f"{gap['mean']:+.3f}"
            net_cell = "-" if net is None else f"{net['mean']:+.4f}"
            lines.append(
                f"| {task} | {method} | {gap_cell} | {net_cell} | "
                f"{entry['entropy_all']['mean']:.2f} / {entry[f'entropy_last{window}']['mean']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def format_paired_table(paired: dict[str, Any], window: int) -> str:
    lines = [
        f"#### Paired by seed: difference in final reward (last {window} steps)",
        "",
        "| task | comparison | mean difference | 95% bootstrap interval | seeds better / worse / tied |",
        "|---|---|---|---|---|",
    ]
    for task, comparisons in paired.items():
        for name, stats in comparisons.items():
            tied = stats["seeds"] - stats["wins"] - stats["losses"]
            lines.append(
                f"| {task} | {name} | {stats['mean']:+.3f} | [{stats['low']:+.3f}, {stats['high']:+.3f}] | "
                f"{stats['wins']} / {stats['losses']} / {tied} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], window: int, threshold: float, path: Path) -> None:
    """
    Per task: the mean (over seeds) moving-average reward per method with the seeds' min-max band, TGF's colour share,
    and the cold-start guard's openness.
    """
    import matplotlib
    from matplotlib.figure import Figure

    tasks = sorted({r["task"] for r in results}, key=TASKS.index)
    methods = sorted({r["method"] for r in results}, key=list(METHODS).index)
    colours = dict(zip(methods, matplotlib.colormaps["tab10"].colors, strict=False))
    figure = Figure(figsize=(6.5 * len(tasks), 10.5))
    axes = figure.subplots(3, len(tasks), squeeze=False, height_ratios=(3, 2, 2))
    for column, task in enumerate(tasks):
        top, bottom, guard = axes[0, column], axes[1, column], axes[2, column]
        for method in methods:
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            curves = [moving_average([row["reward"] for row in r["log"]], window) for r in runs]
            length = min(len(curve) for curve in curves)
            steps = list(range(1, length + 1))
            mean = [statistics.fmean(curve[i] for curve in curves) for i in range(length)]
            low = [min(curve[i] for curve in curves) for i in range(length)]
            high = [max(curve[i] for curve in curves) for i in range(length)]
            top.plot(steps, mean, color=colours[method], linewidth=2, label=f"{method} ({len(runs)} seeds)")
            top.fill_between(steps, low, high, color=colours[method], alpha=0.12)
            kept = [[row.get("learning/colour_kept") for row in r["log"]] for r in runs]
            if any(value is not None for series in kept for value in series):
                smoothed = []
                for i in range(length):
                    values = [v for series in kept for v in series[max(0, i + 1 - window) : i + 1] if v is not None]
                    smoothed.append(statistics.fmean(values) if values else math.nan)
                bottom.plot(steps, smoothed, color=colours[method], linewidth=1.5, label=method)
            openness = [[row.get("vppo/guard_openness") for row in r["log"]] for r in runs]
            if all(value is not None for series in openness for value in series[:length]):
                curves = [moving_average(series[:length], window) for series in openness]
                mean = [statistics.fmean(curve[i] for curve in curves) for i in range(length)]
                low = [min(curve[i] for curve in curves) for i in range(length)]
                high = [max(curve[i] for curve in curves) for i in range(length)]
                guard.plot(steps, mean, color=colours[method], linewidth=1.5, label=method)
                guard.fill_between(steps, low, high, color=colours[method], alpha=0.12)
        top.axhline(0.25, color="grey", linestyle="--", linewidth=1, label="chance")
        top.axhline(threshold, color="grey", linestyle=":", linewidth=1, label="threshold")
        top.set_ylim(-0.02, 1.02)
        top.set_title(f"task '{task}': reward, {window}-step mean (band: seeds' min-max)")
        top.set_ylabel("accuracy reward")
        top.legend(loc="upper left", fontsize=8)
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_ylabel("share of colour tokens TGF keeps")
        if bottom.lines:
            bottom.legend(loc="lower right", fontsize=8)
        guard.set_ylim(-0.02, 1.02)
        guard.set_ylabel(f"guard openness ({window}-step mean)")
        guard.set_xlabel("step")
        if guard.lines:
            guard.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
