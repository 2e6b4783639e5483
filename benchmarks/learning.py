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

This file is the command line; `learning_runs.py` trains the runs, `learning_report.py` summarises and draws them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.learning_report import (  # noqa: E402
    THRESHOLD,
    WINDOW,
    colour_kept_where_dependencies_carry_signal,
    format_paired_table,
    format_table,
    format_tilt_table,
    paired_bootstrap,
    paired_differences,
    plot,
    steps_to_threshold,
    summarise,
)
from benchmarks.learning_runs import (  # noqa: E402
    DEFAULT_METHODS,
    METHODS,
    TASKS,
    build_warm_start,
    first_colour_reward,
    train_one,
    warm_start_dir,
)
from vppo_trl.tools import demo  # noqa: E402

# What the benchmark's tests read from this entry point, besides its command line.
__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "TASKS",
    "colour_kept_where_dependencies_carry_signal",
    "first_colour_reward",
    "main",
    "paired_bootstrap",
    "paired_differences",
    "steps_to_threshold",
]


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
