"""Learning in miniature: GRPO, VPPO and its ablations trained from the same warm start on two CPU colour tasks.

`python benchmarks/learning.py` trains a tiny Qwen2.5-VL (the CPU demo's model and building blocks,
`vppo_trl.tools.demo`) with five methods that differ only in VPPO's switches, from the same warm start, with the
same budget and settings:

| method     | VPPOConfig                                                       |
|------------|------------------------------------------------------------------|
| `grpo`     | `token_filter_ratio=1.0, advantage_shaping=False` (exactly GRPO) |
| `vppo`     | the defaults: TGF keeps 40% of tokens by dependency, TAS on      |
| `tgf_only` | `advantage_shaping=False`                                        |
| `tas_only` | `token_filter_ratio=1.0`                                         |
| `random`   | `token_filter_criterion="random"`: VPPO with a random 40% mask   |

Four more can be added with `--methods`: `entropy` (VPPO with `token_filter_criterion="entropy"`), `vppo_guard`
(VPPO with `cold_start_guard=True`), `vppo_guard_level` (the guard without its sign balance,
`cold_start_guard_balance=False`) and `vppo_official_tas` (VPPO whose TAS statistics include the zero-advantage
completions, as the official code's do; `skip_zero_advantage=False` so that they are measured). The summary pairs
methods by seed (`PAIRS`): the per-seed differences in final reward and their 95% bootstrap interval.

Two tasks, both the demo's "What colour is the shape?" with a fresh image per prompt:

- `colour`: the answer is `<colour><|im_end|>` (the demo's task; TGF keeps ceil(0.4 * 2) = 1 of the 2 tokens);
- `filler`: the warm start teaches `w1 w2 w3 w4 <colour><|im_end|>` with four free filler words; the reward is 1 when
  the first colour word of the answer is right. Only the colour token can depend on the image; TGF keeps 3 of 6.

Settings shared by every method (chosen for the CPU budget, not tuned for any method): the demo's optimiser (AdamW,
lr 1e-3 constant, vision tower x5), G = 8 completions of `--prompts-per-step` 4 prompts (the demo uses 8), temperature
1, no KL, the vision special tokens masked in the output layer. The warm start is 60 supervised steps of answer
format (AdamW at 3e-3, `WARM_START_LR`: the demo's format-only warm start before the demo moved to sentence answers)
in which `--warm-start-seen` 0.5 of the answers name the image's colour instead of a random one.

Every method logs the visual dependency of every batch (the perturbed pass runs for GRPO too, only its result is
unused), which gives the share of colour tokens TGF keeps and the dependency of colour vs other tokens. Runs go to
worker processes; each run's log is written as soon as it ends (`runs/*.json`), then the summary (`summary.json`,
`LEARNING_RESULTS.md`) and the plot (`learning.png`). `--smoke` runs a few steps of everything (the tests use it);
`--from-runs` only re-summarises the runs already written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from vppo_trl.testing import (
    COLOURS,
    build_model,
    build_processor,
    build_tokenizer,
    colour_reward,
    make_colour_dataset,
    suppressed_token_ids,
)
from vppo_trl.tools import demo

METHODS: dict[str, dict[str, Any]] = {
    "grpo": {"token_filter_ratio": 1.0, "advantage_shaping": False},
    "vppo": {},
    "tgf_only": {"advantage_shaping": False},
    "tas_only": {"token_filter_ratio": 1.0},
    "random": {"token_filter_criterion": "random"},
    "entropy": {"token_filter_criterion": "entropy"},
    "vppo_guard": {"cold_start_guard": True},
    "vppo_guard_level": {"cold_start_guard": True, "cold_start_guard_balance": False},
    "vppo_official_tas": {"skip_zero_advantage": False},
}
# Methods whose TAS statistics include the zero-advantage completions, as the official code's (see RecordingTrainer).
OFFICIAL_TAS_METHODS = ("vppo_official_tas",)
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
DEFAULT_METHODS = ("grpo", "vppo", "tgf_only", "tas_only", "random")
TASKS = ("colour", "filler")
FILLERS = ("so", "the", "answer", "is", "now", "well", "yes", "okay")
NUM_FILLERS = 4
# Completion tokens: the answer and <|im_end|>, with room for nothing else (the demo's 4 for the one-word task).
MAX_COMPLETION_LENGTH = {"colour": 4, "filler": NUM_FILLERS + 2}
# The warm start's AdamW rate, every parameter alike: the CPU demo's until its warm start changed (issue 15), kept so
# that the sweeps of LEARNING.md start from the same kind of policy (60 steps give a loss of about ln(4)/2 = 0.69).
WARM_START_LR = 3e-3
WINDOW = 20  # steps of the moving average that steps-to-threshold and the final reward are read from
THRESHOLD = 0.5  # chance is 0.25


def warm_start_answer(task: str, seen_share: float):
    """
    Warm-start target: the image's colour with probability `seen_share`, else a colour drawn at random, preceded in
    the filler task by free filler words. With `seen_share=0` the warm start teaches the format only (the demo's).
    """

    def make_answer(rng: random.Random, colour: str) -> str:
        said = colour if rng.random() < seen_share else rng.choice(COLOURS)
        fillers = [rng.choice(FILLERS) for _ in range(NUM_FILLERS)] if task == "filler" else []
        return " ".join([*fillers, said])

    return make_answer


def first_colour_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the first colour word of the completion is the right one: filler words neither earn nor cost."""
    rewards = []
    for completion, colour in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else "".join(message["content"] for message in completion)
        words = [word.strip(".,;:!?\"'").lower() for word in text.split()]
        said = next((word for word in words if word in COLOURS), None)
        rewards.append(1.0 if said == colour else 0.0)
    return rewards


def warm_start_dir(output_dir: Path, task: str, seed: int) -> Path:
    return output_dir / "warm_start" / f"{task}_seed{seed}"


def build_warm_start(output_dir: Path, task: str, seed: int, steps: int, seen_share: float) -> dict[str, Any]:
    """The demo's model, tokenizer and format-only warm start for `task`, saved for every method of this seed."""
    extra_words = COLOURS if task == "colour" else COLOURS + FILLERS
    tokenizer = build_tokenizer(extra_words, vocab_size=demo.VOCAB_SIZE)
    tokenizer.padding_side = "left"
    processor = build_processor("qwen2_5_vl", tokenizer)
    model = build_model("qwen2_5_vl", tokenizer, seed=seed)
    make_answer = warm_start_answer(task, seen_share)
    loss = demo.warm_start(
        model, processor, steps, seed=seed + 1, make_answer=make_answer, learning_rate=WARM_START_LR
    )
    path = warm_start_dir(output_dir, task, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return {"task": task, "seed": seed, "loss": loss}


def make_recording_trainer_class():
    from vppo_trl import VPPOTrainer
    from vppo_trl.method.core import sign_scale_gap
    from vppo_trl.method.trainer import loss_mask

    class RecordingTrainer(VPPOTrainer):
        """VPPOTrainer that also logs where the colour token is and what TGF does with it (metrics only)."""

        colour_ids: torch.Tensor
        official_tas_statistics = False

        def _shape_advantages(self, batch, dependency, measured, shapeable, with_image, entropies=None):
            # The official code's TAS statistics: per process and micro-batch (here both are the whole generation
            # batch: one process, steps_per_generation 1) and over every completion, zero advantages included (all
            # measured, as skip_zero_advantage is off). Zero-advantage completions keep their zero advantage.
            statistics_rows = measured if self.official_tas_statistics else shapeable
            advantages = batch["advantages"].clone()
            super()._shape_advantages(batch, dependency, measured, statistics_rows, with_image, entropies=entropies)
            mask = loss_mask(batch).bool()
            self._log_scales_by_sign(advantages, batch["advantages"], shapeable)
            colour = torch.isin(batch["completion_ids"], self.colour_ids.to(mask.device)) & mask
            # The first colour word is the one the reward reads; later ones (rare) count as other tokens.
            first = colour & (colour.cumsum(-1) == 1)
            rows = measured & first.any(-1)
            metrics = self._metrics["train"]
            if rows.any():
                other = mask & ~first & rows.unsqueeze(-1)
                metrics["learning/colour_dependency"].append(dependency[first & rows.unsqueeze(-1)].mean().item())
                if other.any():
                    metrics["learning/other_dependency"].append(dependency[other].mean().item())
            trained = shapeable & first.any(-1)
            if batch["advantages"].dim() == 2 and trained.any():
                kept = batch["advantages"] != 0  # TGF-kept tokens of the completions with a policy gradient
                metrics["learning/colour_kept"].append(kept[first & trained.unsqueeze(-1)].float().mean().item())
                metrics["learning/tokens_kept"].append(
                    (kept[trained] & mask[trained]).sum().item() / mask[trained].sum().item()
                )

        def _log_scales_by_sign(self, advantages, shaped, shapeable) -> None:
            """
            The TAS scales applied, read back from the shaped advantages: their gap between the two sides of the
            advantage's sign (`sign_scale_gap`, after the guard's balance if any) and the mean shaped advantage (0 for
            GRPO, whose group advantages sum to 0). A scale that follows the sign tilts the update towards pushing
            every sampled answer down (or up).
            """
            rows = shapeable & (advantages != 0)
            if not rows.any():
                return
            scaled = shaped.abs().amax(-1) if shaped.dim() == 2 else shaped.abs()
            scales = torch.where(rows, scaled / advantages.abs().clamp(min=1e-12), torch.ones_like(scaled))
            metrics = self._metrics["train"]
            gap = sign_scale_gap(scales, advantages, rows)
            if gap is not None:
                metrics["learning/scale_gap"].append(gap)
            metrics["learning/net_advantage"].append((scales * advantages)[rows].mean().item())

    return RecordingTrainer


def train_one(
    output_dir: Path, task: str, method: str, seed: int, steps: int, prompts_per_step: int
) -> dict[str, Any]:
    """Train one method from the warm start of (`task`, `seed`); returns and writes its per-step log."""
    torch.set_num_threads(1)
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    from vppo_trl import VPPOConfig

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore", FutureWarning)
    set_seed(seed)
    path = warm_start_dir(output_dir, task, seed)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    masked = suppressed_token_ids(processor)
    demo.mask_tokens(policy, masked)
    run_dir = output_dir / "trainer" / f"{task}_{method}_seed{seed}"
    config = VPPOConfig(
        output_dir=str(run_dir),
        max_steps=steps,
        per_device_train_batch_size=prompts_per_step * demo.NUM_GENERATIONS,
        num_generations=demo.NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH[task],
        temperature=1.0,
        beta=0.0,
        gradient_checkpointing=False,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        **METHODS[method],
    )
    train_dataset = make_colour_dataset(steps * prompts_per_step, seed=seed + 3)
    vision = list(policy.model.visual.parameters())
    vision_ids = {id(p) for p in vision}
    optimizer = torch.optim.AdamW(
        [
            {"params": vision, "lr": config.learning_rate * demo.VISION_LR_MULTIPLIER},
            {"params": [p for p in policy.parameters() if p.requires_grad and id(p) not in vision_ids]},
        ],
        lr=config.learning_rate,
        weight_decay=0.0,
    )
    trainer = make_recording_trainer_class()(
        model=policy,
        reward_funcs=colour_reward if task == "colour" else first_colour_reward,
        args=config,
        train_dataset=train_dataset,
        processing_class=processor,
        optimizers=(optimizer, None),
    )
    trainer.official_tas_statistics = method in OFFICIAL_TAS_METHODS
    tokenizer = processor.tokenizer
    trainer.colour_ids = torch.tensor(
        [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))[0] for c in COLOURS for text in (c, " " + c)]
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    keys = ("reward", "vppo/token_fraction", "vppo/dependency_selected_mean", "vppo/dependency_rejected_mean")
    keys += ("vppo/advantage_scale_max", "vppo/guard_openness", "vppo/guard_dependency", "vppo/guard_filter_ratio")
    keys += ("vppo/guard_sign_gap",)
    keys += ("learning/colour_dependency", "learning/other_dependency", "learning/colour_kept", "learning/tokens_kept")
    keys += ("learning/scale_gap", "learning/net_advantage", "entropy")
    log = [{key: entry.get(key) for key in ("step", *keys)} for entry in demo.step_logs(trainer.state.log_history)]
    result = {"task": task, "method": method, "seed": seed, "steps": steps, "train_seconds": seconds, "log": log}
    runs = output_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / f"{task}_{method}_seed{seed}.json").write_text(json.dumps(result) + "\n")
    return result


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120, help="GRPO/VPPO steps per run.")
    parser.add_argument("--warm-start-steps", type=int, default=60)
    parser.add_argument(
        "--warm-start-seen",
        type=float,
        default=0.5,
        help="Share of warm-start answers that name the image's colour (0: format only, as in the demo).",
    )
    parser.add_argument(
        "--prompts-per-step", type=int, default=4, help=f"Prompts per step, x {demo.NUM_GENERATIONS} completions."
    )
    parser.add_argument("--workers", type=int, default=2, help="Runs trained in parallel, one process each.")
    parser.add_argument("--output-dir", type=Path, default=Path("learning_output"))
    parser.add_argument(
        "--reuse-warm-starts",
        action="store_true",
        help="Train from the warm starts already in --output-dir (an earlier call's, same settings) where they exist.",
    )
    parser.add_argument("--smoke", action="store_true", help="2 steps of every run, 1 seed (CI).")
    parser.add_argument(
        "--from-runs", action="store_true", help="Train nothing: summarise and plot the runs already in --output-dir."
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warm_start_steps, args.seeds = 2, 2, args.seeds[:1]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    output_dir = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.from_runs:
        results = [json.loads(path.read_text()) for path in sorted((output_dir / "runs").glob("*.json"))]
        return write_outputs(args, output_dir, [], results, start)
    warm = [
        build_warm_start(output_dir, task, seed, args.warm_start_steps, args.warm_start_seen)
        for task in args.tasks
        for seed in args.seeds
        if not (args.reuse_warm_starts and warm_start_dir(output_dir, task, seed).is_dir())
    ]
    print(
        f"warm starts built in {time.perf_counter() - start:.0f} s: "
        + ", ".join(f"{w['task']}/{w['seed']} loss {w['loss']:.3f}" for w in warm),
        flush=True,
    )
    jobs = [(task, method, seed) for seed in args.seeds for task in args.tasks for method in args.methods]
    results = []
    train = partial(train_one, output_dir, steps=args.steps, prompts_per_step=args.prompts_per_step)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(train, task, method, seed) for task, method, seed in jobs]
            for future in futures:
                results.append(future.result())
                report_run(results[-1], time.perf_counter() - start)
    else:
        for task, method, seed in jobs:
            results.append(train(task, method, seed))
            report_run(results[-1], time.perf_counter() - start)
    return write_outputs(args, output_dir, warm, results, start)


def write_outputs(
    args: argparse.Namespace, output_dir: Path, warm: list[dict], results: list[dict], start: float
) -> dict[str, Any]:
    summary = {
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "window": WINDOW,
        "threshold": THRESHOLD,
        "warm_start": warm,
        "wall_seconds": time.perf_counter() - start,
        "results": summarise(results, WINDOW, THRESHOLD),
        "paired": paired_differences(results, WINDOW),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = "\n".join(
        (
            format_table(summary["results"], WINDOW, THRESHOLD),
            format_paired_table(summary["paired"], WINDOW),
            format_tilt_table(summary["results"], WINDOW),
        )
    )
    (output_dir / "LEARNING_RESULTS.md").write_text(table + "\n")
    plot(results, WINDOW, THRESHOLD, output_dir / "learning.png")
    print(table)
    print(f"Wall time {summary['wall_seconds']:.0f} s. Outputs in {output_dir}.")
    return summary


def report_run(result: dict[str, Any], elapsed: float) -> None:
    rewards = [row["reward"] for row in result["log"]]
    final = statistics.fmean(rewards[-WINDOW:])
    print(
        f"[{elapsed:6.0f} s] {result['task']:>6} {result['method']:>8} seed {result['seed']}: "
        f"final reward {final:.3f}, {result['train_seconds']:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
