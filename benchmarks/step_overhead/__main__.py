"""``python -m benchmarks.step_overhead``: the driver, or (with the hidden ``--worker-*`` options) one worker."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from .harness import run_benchmark
from .report import print_summary, summarise
from .settings import Settings, parse_args, resolve_settings


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker_role:
        from .measure import run_worker  # torch, transformers and trl: workers only

        run_worker(args.worker_role, Settings(**json.loads(args.worker_settings)), args.worker_fds)
        return
    settings = resolve_settings(args)

    def write(summary: dict[str, Any]) -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=1) + "\n")

    def progress(run: dict[str, Any]) -> None:
        if any(not r["warmup"] for r in run["records"]["vppo"]):
            write(summarise(settings, run, argv))  # "complete": false until the end

    with tempfile.TemporaryDirectory(prefix="step_overhead_") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        run = run_benchmark(settings, log_dir, progress)
    summary = summarise(settings, run, argv)
    write(summary)
    print_summary(summary)


if __name__ == "__main__":
    main()
