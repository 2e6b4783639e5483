"""The CPU demo over seeds, VPPO alone or with GRPO: `python benchmarks/demo_sweep.py --seeds 1000-1019 --workers 2`.

For each seed it builds the demo's warm start once (`vppo_trl.tools.demo`, on `--task`), trains each method of
`--methods` from it with the same settings, data and seed (`vppo`, `grpo`, `vppo_guard`, VPPO with the cold-start
guard, and the paper's ablations `tgf_only` and `tas_only`; GRPO is `VPPOTrainer` with TGF and TAS off, so all have
dynamic sampling), and records per run: learned or not (the demo's verdict), the steps trained, the per-step rewards,
the first step at which the 20-step mean reward reaches 0.8, the held-out greedy accuracy (and per colour, with what
each colour was mistaken for), the training time and CPU time, the machine's load average (1 minute) when the run
started and ended, and a census of the trained policy's token perception (`perception_census`: the share of tokens
that depend on the image). It then prints the table and the summary: runs learned, the median step and the median and
slowest training time; with `grpo` among the methods, for each other method the mean paired differences with GRPO
(steps to 0.8, GRPO minus the method; held-out accuracy and final reward, the method minus GRPO) with bootstrap 95%
intervals over seeds. A run that never reaches 0.8 counts as `steps + 1` in the steps statistics (censored: the
difference is then a bound).

`--registration FILE` runs a registered comparison: the seeds and settings come from the file, committed before the
comparison's first run (`benchmarks/registrations/`), and a flag that disagrees with it is refused.

Writes `<output-dir>/seed<N>.json` per seed (a method already in a seed's file is not run again; one added later trains
from the same, deterministic warm start), `results.json`, `results.md` (the table, as in the README) and `curves.png`
(each method's 20-step mean reward over the seeds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.learning_report import paired_bootstrap, spread  # noqa: E402
from vppo_trl.testing import COLOURS  # noqa: E402
from vppo_trl.tools import demo  # noqa: E402

# Images and sampled completions of the token-perception census of each trained policy and warm start.
CENSUS_IMAGES = 4
CENSUS_COMPLETIONS = 8
# A token "depends on the image" when its k3 dependency reaches this: the colour token of a policy that reads the
# colour sits at 0.1 to 1, a free word at 1e-4 to 1e-2 (docs/demo.md).
DEPENDENT_TOKEN = 0.05


@dataclass
class SweepArguments:
    """Flags of the demo sweep; the training settings default to the demo's own."""

    seeds: str = field(default="0-9", metadata={"help": "Seeds: a range `0-9`, a list `0,3,5` or both `0-2,7`."})
    task: str = field(
        default=demo.DemoArguments.task,
        metadata={"help": "The demo's task (its --task).", "choices": tuple(demo.TASKS)},
    )
    steps: int = field(default=demo.DemoArguments.steps, metadata={"help": "RL steps of every run."})
    stop_reward: float = field(
        default=demo.DemoArguments.stop_reward,
        metadata={"help": "Stop a run once its 20-step mean reward reaches this (above 1: every run trains --steps)."},
    )
    warm_start_steps: int = field(
        default=demo.DemoArguments.warm_start_steps, metadata={"help": "Supervised warm-start steps per seed."}
    )
    output_dir: str = field(default="runs/demo_sweep", metadata={"help": "Where the per-seed results are written."})
    spotlight: bool = field(
        default=True,
        metadata={
            "help": "Write the token perception of each trained model (seed<N>/spotlight/ for VPPO, "
            "seed<N>/<method>_spotlight/ for the others)."
        },
    )
    methods: str = field(
        default="vppo",
        metadata={
            "help": f"Comma-separated methods, among {', '.join(demo.TRAINING_METHODS)}; with grpo among them, each "
            "other method is compared with it."
        },
    )
    workers: int = field(default=1, metadata={"help": "Seeds trained in parallel (one process each)."})
    registration: str | None = field(
        default=None,
        metadata={
            "help": "A registered comparison's JSON file: its `seeds` and `settings` (these flags' values) are used, "
            "and a flag given with another value is refused."
        },
    )
    quick: bool = field(default=False, metadata={"help": "The demo's --quick runs, to check that the sweep runs."})

    def __post_init__(self):
        if self.quick:
            quick = demo.DemoArguments(quick=True)
            self.steps, self.warm_start_steps = quick.steps, quick.warm_start_steps

    bootstrap_samples: int = field(default=10_000, metadata={"help": "Resamples of the bootstrap interval."})


def apply_registration(args: SweepArguments) -> dict[str, Any]:
    """Set the registered seeds and settings on `args`; a flag that disagrees with them raises ValueError."""
    path = Path(args.registration)
    if not path.is_file():
        raise ValueError(f"--registration: no file {path}")
    registration = json.loads(path.read_text())
    registered = {"seeds": registration["seeds"], **registration["settings"]}
    defaults = {item.name: item.default for item in dataclasses.fields(SweepArguments)}
    for name, value in registered.items():
        if name not in defaults:
            raise ValueError(f"--registration: {path} registers {name!r}, which is not a flag of the sweep")
        given = getattr(args, name)
        if given != defaults[name] and given != value:
            raise ValueError(f"--registration: --{name} {given} disagrees with {path}, which registers {value}")
        setattr(args, name, value)
    return registration


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
        task=args.task,
        stop_reward=args.stop_reward,
        output_dir=str(folder),
        spotlight=False,
        quick=args.quick,
    )


def perception_census(model, processor, settings: demo.DemoArguments) -> dict[str, float]:
    """
    Where the policy's dependence on the image sits, over `CENSUS_IMAGES` held-out images x `CENSUS_COMPLETIONS`
    completions sampled as in training: the share of completion tokens (with <|im_end|>) whose k3 dependency reaches
    `DEPENDENT_TOKEN`, the share that are the colour word (the one token the reward reads), that token's share of the
    summed dependency, and the mean dependency of the colour word and of the other tokens.
    """
    from vppo_trl.tools.spotlight import sample_perceptions

    rows = demo.make_question_dataset(CENSUS_IMAGES, seed=settings.seed + 5, balanced=True)
    was_training = model.training
    model.eval()
    colour, other = [], []
    for index, row in enumerate(rows):
        perceptions = sample_perceptions(
            model, processor, demo.QUESTION, row["images"], num_completions=CENSUS_COMPLETIONS,
            max_new_tokens=settings.demo_task.max_completion_length, seed=settings.seed + index,
        )  # fmt: skip
        for item in perceptions:
            words = [token.strip(" .").lower() for token in item.tokens]
            first = next((position for position, word in enumerate(words) if word in COLOURS), None)
            colour.extend(item.dependency[position] for position in range(len(words)) if position == first)
            other.extend(value for position, value in enumerate(item.dependency) if position != first)
    model.train(was_training)
    every = colour + other
    return {
        "tokens": len(every),
        "dependent_token_share": sum(value >= DEPENDENT_TOKEN for value in every) / len(every),
        "colour_token_share": len(colour) / len(every),
        "colour_dependency_share": sum(colour) / max(sum(every), 1e-12),
        "colour_dependency_mean": statistics.fmean(colour) if colour else None,
        "other_dependency_mean": statistics.fmean(other) if other else None,
    }


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
        if "warm_start_census" not in result:
            census = perception_census(demo.load_policy(start.folder, start.masked), start.processor, settings)
            result["warm_start_census"] = census
        for method in todo:
            load_before = os.getloadavg()[0]
            trainer, summary = demo.timed_training(method, settings, start, folder / method, verbose=False)
            load_after = os.getloadavg()[0]
            census = perception_census(trainer.model, start.processor, settings)
            result["runs"][method] = {**summary, "load_average": [load_before, load_after], "census": census}
            if args.spotlight:
                demo.spotlight_trained_model(
                    trainer.model, start.processor, settings, trainer.state.global_step, method=method
                )
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


# The paired read-outs against GRPO: name, how one run gives it, and whether GRPO's value is subtracted from the
# method's (higher is better) or the method's from GRPO's (steps: fewer is better). Positive favours the method.
PAIRED_READOUTS = {
    "steps_to_0.8": ("steps to a 20-step mean reward of 0.8, GRPO minus the method", False),
    "held_out_accuracy": ("held-out greedy accuracy when the run ends, the method minus GRPO", True),
    "final_reward": ("mean reward of the last 20 steps, the method minus GRPO", True),
}


def readout(run: dict[str, Any], name: str, steps: int) -> float:
    if name == "steps_to_0.8":
        return censored_steps(run, steps)
    return run["greedy_accuracy_after"] if name == "held_out_accuracy" else run["end_reward"]


def spotlight_folder(args: SweepArguments, seed: int, method: str) -> Path:
    """Where the sweep wrote the spotlight of `method`'s model of `seed` (`demo.spotlight_trained_model`)."""
    return Path(args.output_dir) / f"seed{seed}" / ("spotlight" if method == "vppo" else f"{method}_spotlight")


def chain_form(args: SweepArguments, seeds: list[int], method: str) -> dict[str, float] | None:
    """
    What became of the chain in `method`'s trained policies, read from the 8 completions of each seed's spotlight:
    the share of completions that still give at least `CHAIN_LENGTH` free words before their first "The shape is",
    the colour words per completion (the answer needs 1), and the distinct free words per completion (12 words drawn
    uniformly from 14 give 8.2 on average; a chain that repeats one word gives 1). None when a seed's spotlight is
    missing.
    """
    completions = []
    for seed in seeds:
        path = spotlight_folder(args, seed, method) / "perception.json"
        if not path.is_file():
            return None
        completions += [item["completion"] for item in json.loads(path.read_text())["completions"]]
    kept, colours, distinct = 0, [], []
    for text in completions:
        said = demo.CHAIN_SENTENCE.search(text)
        before = text[: said.start()].split() if said else text.split()
        free = [word for word in before if word in demo.CHAIN_WORDS]
        kept += said is not None and len(free) >= demo.CHAIN_LENGTH
        colours.append(sum(word.strip(".").lower() in COLOURS for word in text.split()))
        distinct.append(len(set(free)))
    return {
        "completions": len(completions),
        "chain_kept": kept / len(completions),
        "colour_words": statistics.fmean(colours),
        "distinct_free_words": statistics.fmean(distinct),
    }


def summarise(results: list[dict[str, Any]], args: SweepArguments) -> dict[str, Any]:
    methods = parse_methods(args.methods)
    summary: dict[str, Any] = {"seeds": [r["seed"] for r in results], "steps": args.steps, "methods": methods}
    for method in methods:
        runs = [r["runs"][method] for r in results]
        summary[method] = {
            "learned": sum(run["learned"] for run in runs),
            "reached_0.8": sum(run["step_reaching_0.8"] is not None for run in runs),
            "accuracy": spread([run["greedy_accuracy_after"] for run in runs]),
            "final_reward": spread([run["end_reward"] for run in runs]),
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
    if args.task == "chain" and args.spotlight:
        summary["chain_form"] = {method: chain_form(args, summary["seeds"], method) for method in methods}
    summary["paired"] = {}
    for method in compared_methods(methods):
        summary["paired"][method] = {}
        for name, (_, method_minus_grpo) in PAIRED_READOUTS.items():
            differences = [
                readout(r["runs"][method], name, args.steps) - readout(r["runs"]["grpo"], name, args.steps)
                for r in results
            ]
            if not method_minus_grpo:
                differences = [-difference for difference in differences]
            summary["paired"][method][name] = paired_bootstrap(differences, args.bootstrap_samples)
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
        accuracy, reward = part["accuracy"], part["final_reward"]
        lines.append(
            f"- {method.upper()}: {part['learned']} of {len(results)} seeds learned, {part['reached_0.8']} reached "
            f"0.8; held-out accuracy {accuracy['mean']:.2f} on average ({accuracy['min']:.2f}-{accuracy['max']:.2f}, "
            f"standard deviation {accuracy['std']:.2f}), mean reward of the last {demo.REWARD_WINDOW} steps "
            f"{reward['mean']:.2f} ({reward['min']:.2f}-{reward['max']:.2f}, {reward['std']:.2f}); median steps "
            "trained "
            f"{part['median_steps_trained']:g}, median step reaching 0.8 {part['median_step_reaching_0.8']:g}, "
            f"median held-out accuracy {part['median_accuracy']:.2f}, training {part['median_train_seconds']:.0f} s "
            f"median and {part['max_train_seconds']:.0f} s at most ({part['median_train_cpu_seconds']:.0f} s CPU "
            f"median; load average {part['load_average'][0]:.1f} to {part['load_average'][1]:.1f} at the runs' starts "
            "and ends)."
        )
    lines += census_lines(results, methods)
    if summary.get("chain_form") and all(summary["chain_form"].values()):
        lines += [
            "",
            "What became of the chain (the 8 completions of each seed's spotlight, a held-out image): the share that "
            f"give at least {demo.CHAIN_LENGTH} free words before their first `The shape is`, the colour words per "
            "completion, and the distinct free words per completion.",
            "",
            "| policy | chain kept | colour words | distinct free words |",
            "|---|---|---|---|",
        ]
        for method, form in summary["chain_form"].items():
            lines.append(
                f"| after {method.upper()} | {form['chain_kept']:.2f} | {form['colour_words']:.2f} | "
                f"{form['distinct_free_words']:.1f} |"
            )
    if compared_methods(methods):
        lines += [
            "",
            "Paired by seed against GRPO: mean difference [bootstrap 95% interval], seeds in the method's favour / "
            "against / tied. Positive favours the method.",
            "",
            "| method | " + " | ".join(description for description, _ in PAIRED_READOUTS.values()) + " |",
            "|---|" + "---|" * len(PAIRED_READOUTS),
        ]
        for method in compared_methods(methods):
            cells = []
            for name, difference in summary["paired"][method].items():
                digits = 1 if name == "steps_to_0.8" else 3
                ties = difference["seeds"] - difference["wins"] - difference["losses"]
                cells.append(
                    f"{difference['mean']:+.{digits}f} [{difference['low']:+.{digits}f}, "
                    f"{difference['high']:+.{digits}f}], {difference['wins']} / {difference['losses']} / {ties}"
                )
            lines.append(f"| {method.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def census_lines(results: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """The token-perception census of the warm starts and of each method's trained policies, means over seeds."""

    def row(name: str, censuses: list[dict[str, Any]]) -> str:
        def mean(key: str) -> float:
            values = [census[key] for census in censuses if census.get(key) is not None]
            return statistics.fmean(values) if values else float("nan")

        return (
            f"| {name} | {mean('colour_token_share'):.3f} | {mean('dependent_token_share'):.3f} | "
            f"{mean('colour_dependency_share'):.2f} | {mean('colour_dependency_mean'):.3g} | "
            f"{mean('other_dependency_mean'):.3g} |"
        )

    lines = [
        "",
        f"Token perception ({CENSUS_IMAGES} held-out images x {CENSUS_COMPLETIONS} sampled completions per policy, "
        "mean over seeds): the share of completion tokens that are the colour word, the share whose k3 dependency "
        f"reaches {DEPENDENT_TOKEN}, the colour word's share of the summed dependency, and the mean dependency of "
        "the colour word and of the other tokens.",
        "",
        "| policy | colour-word tokens | tokens >= "
        f"{DEPENDENT_TOKEN} | colour word's share of dependency | colour word | other tokens |",
        "|---|---|---|---|---|---|",
        row("warm start", [r["warm_start_census"] for r in results]),
    ]
    lines += [row(f"after {method.upper()}", [r["runs"][method]["census"] for r in results]) for method in methods]
    return lines


def plot_curves(results: list[dict[str, Any]], methods: list[str], path: Path, title: str) -> None:
    """Each method's 20-step mean reward against the step: mean over seeds, with the seeds' min-max band. A run that
    stopped early (its mean reached --stop_reward) is carried at its last value."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5))
    axis = figure.subplots()
    for method in methods:
        curves = [demo.moving_means(r["runs"][method]["rewards"]) for r in results]
        length = max(len(curve) for curve in curves)
        steps = range(1, length + 1)
        columns = [[curve[min(index, len(curve) - 1)] for curve in curves] for index in range(length)]
        line = axis.plot(steps, [statistics.fmean(column) for column in columns], linewidth=2, label=method.upper())
        axis.fill_between(
            steps, [min(c) for c in columns], [max(c) for c in columns], color=line[0].get_color(), alpha=0.12
        )
    axis.axhline(demo.CHANCE_REWARD, color="grey", linestyle="--", linewidth=1, label="chance (1/4)")
    axis.axhline(demo.LEARNED_REWARD, color="grey", linestyle=":", linewidth=1, label=f"{demo.LEARNED_REWARD}")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("step")
    axis.set_ylabel(f"reward, {demo.REWARD_WINDOW}-step mean")
    axis.set_title(f"{title}: mean over {len(results)} seeds, min-max band")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        SweepArguments, prog="python benchmarks/demo_sweep.py", description=__doc__.split("\n")[0]
    )
    (args,) = parser.parse_args_into_dataclasses(argv)
    try:
        registration = apply_registration(args) if args.registration else None
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
    print(
        f"Demo sweep: seeds {seeds} ({len(done)} already done), task {args.task}, {args.steps} RL steps, methods "
        f"{methods}" + (f", registered in {args.registration}." if registration else ".")
    )
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
    plot_curves(results, methods, output_dir / "curves.png", f"{args.task} task, seeds {args.seeds}")
    print(table + f"Sweep {time.perf_counter() - began:.0f} s. Results: {output_dir / 'results.md'}")
    return summary


if __name__ == "__main__":
    main()
