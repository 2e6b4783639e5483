"""`vppo-trl eval ...`, `vppo-trl eval --regrade --output-dir DIR` and `vppo-trl eval compare A B ...`."""

import argparse
import sys
from dataclasses import dataclass, field

from ...command_line import CommandLineParser
from .benchmarks import BENCHMARKS


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


@dataclass
class EvalCommand:
    """What `vppo-trl eval` does besides an evaluation run's settings ([`EvalConfig`])."""

    regrade: bool = field(
        default=False, metadata={"help": "Grade the samples of --output-dir again, without generating."}
    )


def _eval_parser(prog: str) -> CommandLineParser:
    """The flags of `EvalConfig`'s fields (its defaults and help), and `--regrade`."""
    from .run import EvalConfig

    parser = CommandLineParser(
        (EvalConfig, EvalCommand),
        prog=prog,
        description="Evaluate a vision-language model like the VPPO paper: k samples per problem with the training "
        "prompt, graded by the training reward. Writes results.json, results.md, results.png and samples.jsonl.",
        epilog=f"Benchmarks: {', '.join(BENCHMARKS)} (or 'all'). Compare runs: `{prog} compare A/results.json "
        "B/results.json`.",
    )
    actions = {action.dest: action for action in parser._actions}
    actions["output_dir"].required = True  # a run's folder is never guessed
    for name in ("min_pixels", "max_pixels"):
        actions[name].type = _optional_int  # 'none' lifts the limit
    return parser


def _compare_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{prog} compare",
        description="Compare evaluation runs with the first one: differences in avg@k per benchmark and in the mean, "
        "with paired bootstrap 95%% intervals over problems. Writes compare.md, compare.json and compare.png.",
    )
    parser.add_argument("results", nargs="+", help="results.json files (or their folders), the baseline first.")
    parser.add_argument("--labels", help="Comma-separated names of the runs (default: their folder names).")
    parser.add_argument("--output-dir", default="eval_compare")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None, prog: str = "vppo-trl eval") -> None:
    """Parse the command line and run; bad input ends with a one-line error, not a traceback."""
    from .run import compare, compare_table, evaluate, process_state, regrade, results_table

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        parser = _compare_parser(prog)
        args = parser.parse_args(argv[1:])
        try:
            labels = args.labels.split(",") if args.labels else None
            report = compare(args.results, labels, args.output_dir, resamples=args.resamples, seed=args.seed)
        except (ValueError, FileNotFoundError) as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        print(compare_table(report))
        print(f"Wrote {args.output_dir}/compare.md, compare.json and compare.png")
        return
    parser = _eval_parser(prog)
    config, command = parser.parse_dataclasses(argv)
    try:
        results = regrade(config.output_dir) if command.regrade else evaluate(config)
    except (ValueError, OSError, RuntimeError) as error:  # OSError: missing files, no Hub connection
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if process_state().is_main_process:  # under `accelerate launch`, one report
        print(results_table(results))
        print(f"Wrote {config.output_dir}/results.json, results.md, results.png and samples.jsonl")
