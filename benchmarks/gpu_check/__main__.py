"""`python -m benchmarks.gpu_check`: run the parts in order, write each one's section as it ends, print the table."""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from vppo_trl.command_line import CommandLineParser

from .settings import DEFAULT_BUDGET_S, PLANS, GpuCheckArguments


def parse(argv: list[str] | None) -> GpuCheckArguments:
    parser = CommandLineParser(GpuCheckArguments, prog="python -m benchmarks.gpu_check")
    (args,) = parser.parse_dataclasses(argv)
    return args


def run_meta(args: GpuCheckArguments, argv: list[str], budget_s: float) -> dict[str, Any]:
    import torch

    from benchmarks.step_overhead.harness import cpu_name, git_state, versions

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU: {cpu_name()}"
    return {
        "command": ["python", "-m", "benchmarks.gpu_check", *argv],
        "device": device,
        "gpus": torch.cuda.device_count() if args.device == "cuda" else 0,
        "cpu_count": os.cpu_count(),
        "versions": versions(),
        "git": git_state(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": budget_s,
        "load_average_start": os.getloadavg(),
    }


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Replace the file in one rename, so that a run cut while writing leaves the previous complete version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1, default=str) + "\n")
    partial.replace(path)


def run_part(name: str, args: GpuCheckArguments, plan, out_dir: Path, log_dir: Path) -> dict[str, Any]:
    from .parts import PART_FUNCTIONS

    started = time.monotonic()
    try:
        section = PART_FUNCTIONS[name](args, plan, out_dir, log_dir)
    except Exception as error:  # one part failing must not cost the others' figures
        traceback.print_exc()
        section = {"ok": False, "error": f"{type(error).__name__}: {error}"[-4000:]}
    timing = {"seconds": time.monotonic() - started, "expected_s": plan.expected_s, "steps": plan.steps}
    return {**section, **timing}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    budget_s = args.budget_s or DEFAULT_BUDGET_S[args.preset]
    plans = PLANS[args.preset]
    started = time.monotonic()
    results: dict[str, Any] = {"run": run_meta(args, argv, budget_s)}
    out_dir = args.json_path.parent
    write_json(args.json_path, results)
    with tempfile.TemporaryDirectory(prefix="gpu_check_logs_") as tmp:
        log_dir = Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for index, name in enumerate(args.parts):
            # The time left, shared among the parts still to run in proportion to their expected times.
            left = budget_s - (time.monotonic() - started)
            pending = sum(plans[part].expected_s for part in args.parts[index:])
            plan = plans[name].within(left * plans[name].expected_s / pending)
            print(f"gpu_check: {name} ({plan.steps} steps, about {plan.expected_s:.0f} s)", flush=True)
            results[name] = run_part(name, args, plan, out_dir, log_dir)
            results["run"]["wall_s"] = time.monotonic() - started
            results["run"]["load_average_end"] = os.getloadavg()
            write_json(args.json_path, results)
    from .report import print_table

    print_table(results)
    return 0 if all(results[name]["ok"] for name in args.parts) else 1


if __name__ == "__main__":
    sys.exit(main())
