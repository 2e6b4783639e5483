"""The CPU demo over seeds, VPPO alone or with GRPO: `python benchmarks/demo_sweep.py --seeds 1000-1019 --workers 2`.

For each seed it builds the demo's warm start once (`vppo_trl.tools.demo`), trains each method of `--methods` from it
with the same settings, data and seed (`vppo`, `grpo`, and `vppo_guard`, VPPO with the cold-start guard; GRPO is
`VPPOTrainer` with TGF and TAS off, so all have dynamic sampling), and records per run: learned or not (the demo's
verdict), the steps trained, the first step at which the 20-step mean reward reaches 0.8, the held-out greedy accuracy
(and per colour, with what each colour was mistaken for), the training time and CPU time, and the machine's load
average (1 minute) when the run started and ended. It then prints the table and the summary: runs learned, the median
step and the median and slowest training time; with `grpo` among the methods, for each other method the mean paired
difference in steps (GRPO minus the method) with a bootstrap 95% interval over seeds. A run that never reaches 0.8
counts as `steps + 1` in the steps statistics (censored: the difference is then a lower bound).

Writes `<output-dir>/seed<N>.json` per seed (a method already in a seed's file is not run again; one added later trains
from the same, deterministic warm start), `results.json` and `results.md` (the table, as in the README).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vppo_trl.tools import demo  # noqa: E402


@dataclass
class SweepArguments:
    """Flags of the demo sweep; the training settings default to the demo's own."""

    seeds: str = field(default="0-9", metadata={"help": "Seeds: a range `0-9`, a list `0,3,5` or both `0-2,7`."})
    steps: int = field(default=demo.DemoArguments.steps, metadata={"help": "RL steps of every run."})
    warm_start_steps: int = field(
        default=demo.DemoArguments.warm_start_steps, metadata={"help": "Supervised warm-start steps per seed."}
    )
    output_dir: str = field(default="runs/demo_sweep", metadata={"help": "Where the per-seed results are written."})
    spotlight: bool = field(
        default=True, metadata={"help": "Write the token perception of each VPPO model (seed<N>/spotlight/)."}
    )
    methods: str = field(
        default="vppo",
        metadata={
            "help": f"Comma-separated methods, among {', '.join(demo.TRAINING_METHODS)}; with grpo among them, each "
            "other method is compared with it."
        },
    )
    workers: int = field(default=1, metadata={"help": "Seeds trained in parallel (one process each)."})
    quick: bool = field(default=False, metadata={"help": "The demo's --quick runs, to check that the sweep runs."})

    def __post_init__(self):
        if self.quick:
            quick = demo.DemoArguments(quick=True)
            self.steps, self.warm_start_steps = quick.steps, quick.warm_start_steps

    bootstrap_samples: int = field(default=10_000, metadata={"help": "Resamples of the bootstrap interval."})


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"--seeds: {part!r} is not a seed or a range like 0-9")
        seeds.extend(range(int(first), int(last or first) + 1))
    return list(dict.fromkeys(seeds))


def parse_methods(text: str) -> list[str]:
    methods = [method.strip() for method in text.split(",") if method.strip()]
    unknown = [method for method in methods if method not in demo.TRAINING_METHODS]
    if unknown or not methods:
        raise ValueError(
            f"--methods: {text!r} must name methods among {', '.join(demo.TRAINING_METHODS)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return list(dict.fromkeys(methods))


def compared_methods(methods: list[str]) -> list[str]:
    """The methods paired with GRPO by seed: every other one, when GRPO was trained."""
    return [method for method in methods if method != "grpo"] if "grpo" in methods else []


def seed_file(args: SweepArguments, seed: int) -> Path:
    return Path(args.output_dir) / f"seed{seed}.json"


def demo_settings(args: SweepArguments, seed: int, folder: Path) -> demo.DemoArguments:
    return demo.DemoArguments(
        steps=args.steps,
        warm_start_steps=args.warm_start_steps,
        seed=seed,
        output_dir=str(folder),
        spotlight=False,
        quick=args.quick,
    )


def run_seed(args: SweepArguments, seed: int) -> dict[str, Any]:
    """
    Warm start, then every method of `--methods` from it that `seed<N>.json` does not hold yet; the result is written
    back to that file. The warm start is deterministic, so a method added later trains from the same one.
    """
    path = seed_file(args, seed)
    result = json.loads(path.read_text()) if path.is_file() else {"seed": seed, "runs": {}}
    todo = [method for method in parse_methods(args.methods) if method not in result["runs"]]
    folder = Path(args.output_dir) / f"seed{seed}"
    settings = demo_settings(args, seed, folder)
    with demo.quiet_libraries():
        start = demo.build_warm_start(settings, folder / "warm_start")
        result["warm_start_accuracy"] = start.held_out.accuracy
        for method in todo:
            load_before = os.getloadavg()[0]
            trainer, summary = demo.timed_training(method, settings, start, folder / method, verbose=False)
            result["runs"][method] = {**summary, "load_average": [load_before, os.getloadavg()[0]]}
            if method == "vppo" and args.spotlight:
                demo.spotlight_trained_model(trainer.model, start.processor, settings, trainer.state.global_step)
    path.write_text(json.dumps(result, indent=2) + "\n")
    runs = result["runs"]
    print(f"seed {seed}: " + "; ".join(f"{m} {row_text(runs[m])}" for m in parse_methods(args.methods)), flush=True)
    return result


def row_text(run: dict[str, Any]) -> str:
    step = run["step_reaching_0.8"]
    return (
        f"{'learned' if run['learned'] else 'not learned'}, {run['steps_trained']} steps, 0.8 at "
        f"{step if step else 'never'}, accuracy {run['greedy_accuracy_after']:.2f}, {run['train_seconds']:.0f} s"
    )


def censored_steps(run: dict[str, Any], steps: int) -> int:
    return run["step_reaching_0.8"] or steps + 1


def bootstrap_interval(values: list[float], samples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values`."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(samples))
    return means[int(0.025 * samples)], means[min(samples - 1, int(0.975 * samples))]


def summarise(results: list[dict[str, Any]], args: SweepArguments) -> dict[str, Any]:
    methods = parse_methods(args.methods)
    summary: dict[str, Any] = {"seeds": [r["seed"] for r in results], "steps": args.steps, "methods": methods}
    for method in methods:
        runs = [r["runs"][method] for r in results]
        summary[method] = {
            "learned": sum(run["learned"] for run in runs),
            "median_steps_trained": statistics.median(run["steps_trained"] for run in runs),
            "median_step_reaching_0.8": statistics.median(censored_steps(run, args.steps) for run in runs),
            "median_accuracy": statistics.median(run["greedy_accuracy_after"] for run in runs),
            "median_train_seconds": statistics.median(run["train_seconds"] for run in runs),
            "max_train_seconds": max(run["train_seconds"] for run in runs),
            "median_train_cpu_seconds": statistics.median(run["train_cpu_seconds"] for run in runs),
            "load_average": [
                min(min(run["load_average"]) for run in runs),
                max(max(run["load_average"]) for run in runs),
            ],
        }
    for method in compared_methods(methods):
        differences = [
            censored_steps(r["runs"]["grpo"], args.steps) - censored_steps(r["runs"][method], args.steps)
            for r in results
        ]
        low, high = bootstrap_interval(differences, args.bootstrap_samples)
        summary[f"steps_difference_grpo_minus_{method}"] = {
            "per_seed": differences,
            "mean": statistics.fmean(differences),
            "bootstrap_95": [low, high],
        }
    return summary


def cell(run: dict[str, Any], never: str) -> str:
    """One run in the table; a run that did not learn also says what its held-out answers confused."""
    mistakes = [] if run["learned"] else demo.HeldOut.after_training(run).confusions()
    return (
        f"{'yes' if run['learned'] else 'NO'}, {run['steps_trained']}, {run['step_reaching_0.8'] or never}, "
        f"{run['greedy_accuracy_after']:.2f}"
        + (f" ({', '.join(mistakes[:2])})" if mistakes else "")
        + f", {run['train_seconds']:.0f} s ({run['train_cpu_seconds']:.0f} s CPU)"
    )


def markdown(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """One row per seed, one column per method: learned, the steps trained, the step the 20-step mean reward reaches
    0.8, the held-out greedy accuracy and the training seconds; then the summary lines."""
    never = f"never (> {summary['steps']})"
    methods = summary["methods"]
    lines = [
        "Each cell: learned, steps trained, step the 20-step mean reward reaches 0.8, held-out greedy accuracy, "
        "training time (and the CPU time of its process).",
        "",
        "| seed | " + " | ".join(method.upper() for method in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for result in results:
        lines.append(f"| {result['seed']} | " + " | ".join(cell(result["runs"][m], never) for m in methods) + " |")
    lines.append("")
    for method in methods:
        part = summary[method]
        lines.append(
            f"- {method.upper()}: {part['learned']} of {len(results)} seeds learned; median steps trained "
            f"{part['median_steps_trained']:g}, median step reaching 0.8 {part['median_step_reaching_0.8']:g}, "
            f"median held-out accuracy {part['median_accuracy']:.2f}, training {part['median_train_seconds']:.0f} s "
            f"median and {part['max_train_seconds']:.0f} s at most ({part['median_train_cpu_seconds']:.0f} s CPU "
            f"median; load average {part['load_average'][0]:.1f} to {part['load_average'][1]:.1f} at the runs' starts "
            "and ends)."
        )
    for method in compared_methods(methods):
        difference = summary[f"steps_difference_grpo_minus_{method}"]
        lines.append(
            f"- Steps to 0.8, GRPO minus {method.upper()}, paired by seed: mean {difference['mean']:+.1f} (bootstrap "
            f"95% interval {difference['bootstrap_95'][0]:+.1f} to {difference['bootstrap_95'][1]:+.1f}); per seed "
            f"{', '.join(f'{d:+d}' for d in difference['per_seed'])}."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        SweepArguments, prog="python benchmarks/demo_sweep.py", description=__doc__.split("\n")[0]
    )
    (args,) = parser.parse_args_into_dataclasses(argv)
    try:
        seeds = parse_seeds(args.seeds)
        methods = parse_methods(args.methods)
    except ValueError as error:
        parser.error(str(error))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    done = {}
    for seed in seeds:
        path = seed_file(args, seed)
        if path.is_file() and all(method in json.loads(path.read_text())["runs"] for method in methods):
            done[seed] = json.loads(path.read_text())
    todo = [seed for seed in seeds if seed not in done]
    print(f"Demo sweep: seeds {seeds} ({len(done)} already done), {args.steps} RL steps, methods {methods}.")
    if args.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            for result in pool.map(run_seed, [args] * len(todo), todo):
                done[result["seed"]] = result
    else:
        for seed in todo:
            done[seed] = run_seed(args, seed)
    results = [done[seed] for seed in seeds]
    summary = summarise(results, args)
    table = markdown(results, summary)
    (output_dir / "results.json").write_text(
        json.dumps({"arguments": dataclasses.asdict(args), "summary": summary, "results": results}, indent=2) + "\n"
    )
    (output_dir / "results.md").write_text(table)
    print(table + f"Sweep {time.perf_counter() - began:.0f} s. Results: {output_dir / 'results.md'}")
    return summary


if __name__ == "__main__":
    main()
