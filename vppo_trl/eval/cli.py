"""`vppo-trl eval ...`, `vppo-trl eval --regrade --output-dir DIR` and `vppo-trl eval compare A B ...`."""

import argparse
import sys

from ..data import INSTRUCTION_SUFFIX, ON_BAD_ROW_CHOICES, PAPER_MAX_PIXELS, PAPER_MIN_PIXELS
from .benchmarks import BENCHMARKS


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _eval_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a vision-language model like the VPPO paper: k samples per problem with the training "
        "prompt, graded by the training reward. Writes results.json, results.md, results.png and samples.jsonl.",
        epilog=f"Benchmarks: {', '.join(BENCHMARKS)} (or 'all'). Compare runs: `{prog} compare A/results.json "
        "B/results.json`.",
    )
    add = parser.add_argument
    add("--model", help="Hub model id or local folder (a VPPO checkpoint, a base model...).")
    add("--adapter", help="LoRA adapter folder, merged into the model (HF backend).")
    add("--benchmarks", default="", help="Comma-separated benchmark names, or 'all'.")
    add("--data-root", help="The `data` folder of the paper's evaluation data (chamber111/VPPO-Eval).")
    add("--data", action="append", default=[], help="Local file or folder in the training data layout; repeatable.")
    add("--output-dir", required=True, help="Folder of the run's outputs; an unfinished run there is resumed.")
    add("--k", type=int, default=8, help="Samples per problem (the paper: 8).")
    add("--temperature", type=float, default=1.0, help="Sampling temperature (the paper: 1.0).")
    add("--top-p", type=float, default=1.0, help="Nucleus sampling (default %(default)s).")
    add("--max-new-tokens", type=int, default=2048, help="Longest completion (the 7B paper run: 2048).")
    add("--batch-size", type=int, default=8, help="Problems generated together (x k sequences).")
    add("--seed", type=int, default=0, help="Sampling seed; each chunk of problems derives its own.")
    add(
        "--min-pixels",
        type=_optional_int,
        default=PAPER_MIN_PIXELS,
        help="Smaller images are scaled up to this many pixels (default: the paper's %(default)s; 'none').",
    )
    add(
        "--max-pixels",
        type=_optional_int,
        default=PAPER_MAX_PIXELS,
        help="Larger images are scaled down to this many pixels (default: the paper's %(default)s; 'none').",
    )
    add("--instruction-suffix", default=INSTRUCTION_SUFFIX, help="Appended to every problem ('' for none).")
    add("--max-problems", type=int, help="Evaluate the first N problems of each benchmark (quick runs).")
    add("--on-bad-row", choices=ON_BAD_ROW_CHOICES, default="raise", help="Stop at invalid rows, or skip them.")
    add("--backend", choices=("hf", "vllm"), default="hf", help="Generation engine (default %(default)s).")
    add("--device", help="Device of the HF backend (default: the accelerate process's device).")
    add("--dtype", default="auto", help="Model dtype: auto, bfloat16, float16, float32.")
    add("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per model copy.")
    add("--gpu-memory-utilization", type=float, default=0.9, help="vLLM: share of GPU memory it may take.")
    add("--max-model-len", type=int, help="vLLM: context length (prompt + completion).")
    add("--regrade", action="store_true", help="Grade the samples of --output-dir again, without generating.")
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
    from .run import EvalConfig, compare, compare_table, evaluate, process_state, regrade, results_table

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
    args = parser.parse_args(argv)
    try:
        if args.regrade:
            results = regrade(args.output_dir)
        else:
            options = {key: value for key, value in vars(args).items() if key != "regrade"}
            options["benchmarks"] = [name for name in options["benchmarks"].split(",") if name.strip()]
            results = evaluate(EvalConfig(**options))
    except (ValueError, OSError, RuntimeError) as error:  # OSError: missing files, no Hub connection
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if process_state().is_main_process:  # under `accelerate launch`, one report
        print(results_table(results))
        print(f"Wrote {args.output_dir}/results.json, results.md, results.png and samples.jsonl")
