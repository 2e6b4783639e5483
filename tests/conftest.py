"""Shared by every test file: what a session builds once, and which tests the transformers 5.17.0 pass of CI runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from processes import TORCH_EXTENSIONS_DIR, WarmPython

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def warm_python():
    """Start `python ...` commands (scripts to SIGKILL, benchmarks run as their command line) in processes forked from
    one that imported torch, transformers, TRL and vppo_trl once for the session (tests/processes.py)."""
    warm = WarmPython()
    yield warm
    warm.close()


@pytest.fixture(scope="session")
def gpu_check_rehearsal(tmp_path_factory, warm_python) -> tuple[dict, str]:
    """`python -m benchmarks.gpu_check --device cpu --preset tiny`, once per session: its JSON and its output.

    tests/test_gpu_check.py checks every part; tests/test_benchmark_smoke.py reads the step_overhead run of its
    `overhead` part (the whole summary `python -m benchmarks.step_overhead --json` writes, next to the check's JSON).
    """
    out = tmp_path_factory.mktemp("gpu_check") / "tiny.json"
    arguments = ["-m", "benchmarks.gpu_check", "--device", "cpu", "--preset", "tiny", "--json", str(out)]
    arguments += ["--budget-s", "3600"]  # the parts at their full size, however loaded the machine
    log = out.with_suffix(".log")
    exit_code = warm_python.run(arguments, log, env={"TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR}, cwd=ROOT)
    output = log.read_text()
    assert exit_code == 0, output[-8000:]
    return json.loads(out.read_text()), output
