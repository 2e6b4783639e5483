"""Shared by every test file: what a session builds once, and which tests the transformers 5.17.0 pass of CI runs.

Built once per session:
- `warm_python`: `python ...` commands (a script to SIGKILL, a benchmark run as its command line) start in processes
  forked from one that imported torch, transformers, TRL and vppo_trl once (tests/processes.py);
- `tiny_vlm(family, ...)`: `vppo_trl.testing.build_tiny_vlm`'s model and processor, built once per set of arguments,
  each call a deep copy (a test may train or change it);
- the tokenizers `build_tiny_vlm` trains (`trained_tokenizers_once`, automatic);
- `gpu_check_rehearsal`: the GPU check's CPU rehearsal (tests/test_gpu_check.py, tests/test_benchmark_smoke.py).

Plain `pytest` runs the fast tier (pyproject's `-m 'not slow'`) and ends by counting the slow tests it left out;
`pytest -m slow` runs those. The transformers 5.17.0 pass of `.ci/run` (both tiers) leaves out the tests marked
`transformers_independent`: what they check is computed by vppo_trl's own code from tensors, numbers and strings (no
processor or tokenizer, model class, generation, TRL trainer or checkpoint), so it cannot differ between transformers
versions. A test is marked explicitly, or by its module in `TRANSFORMERS_INDEPENDENT_MODULES`; a test file added
without either runs in both passes.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from processes import TORCH_EXTENSIONS_DIR, WarmPython

import vppo_trl.testing as testing

ROOT = Path(__file__).resolve().parents[1]

# Whole modules whose every test checks vppo_trl's pure functions (VPPO's math, its metrics, the rewards).
TRANSFORMERS_INDEPENDENT_MODULES = ("test_core.py", "test_metrics.py", "test_rewards.py")


def pytest_configure(config):
    # Every process a test starts compiles DeepSpeed's CPU op into the same folder: once per machine, not per test.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR)
    config.addinivalue_line(
        "markers",
        "transformers_independent: checks only vppo_trl's own computations (no processor, model class, generation, "
        "TRL trainer or checkpoint): CI's transformers 5.17.0 pass leaves it out",
    )


def pytest_terminal_summary(terminalreporter, config):
    """The fast tier (plain `pytest`, pyproject's `-m 'not slow'`) ends by naming what it left out, how to run it."""
    if config.option.markexpr != "not slow":
        return
    slow = [item for item in terminalreporter.stats.get("deselected", []) if item.get_closest_marker("slow")]
    if slow:
        tests = f"{len(slow)} slow test{'s' if len(slow) > 1 else ''}"
        terminalreporter.write_sep("-", f"the fast tier: {tests} left out; `pytest -m slow` runs them, CI both tiers")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in TRANSFORMERS_INDEPENDENT_MODULES:
            item.add_marker(pytest.mark.transformers_independent)


def _arguments_key(args: tuple, kwargs: dict) -> str:
    return repr((args, sorted(kwargs.items())))


@pytest.fixture(scope="session", autouse=True)
def trained_tokenizers_once():
    """`build_tiny_vlm` (and whatever calls `vppo_trl.testing.build_tokenizer` through the module) gets a deep copy of
    a tokenizer trained once per session for the same arguments: training one takes 0.1-0.3 s, a copy 0.01 s, and the
    copy saves the same files. Tests that imported `build_tokenizer` itself still call the real function."""
    train = testing.build_tokenizer
    trained = {}

    def build_tokenizer(*args, **kwargs):
        key = _arguments_key(args, kwargs)
        if key not in trained:
            trained[key] = train(*args, **kwargs)
        return copy.deepcopy(trained[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(testing, "build_tokenizer", build_tokenizer)
        yield


@pytest.fixture(scope="session")
def tiny_vlm():
    """`tiny_vlm(family, **kwargs)` returns what `vppo_trl.testing.build_tiny_vlm(family, **kwargs)` returns, built
    once per session for the same arguments: each call a deep copy of the model and processor, and torch's global
    random state left as a fresh build leaves it (`build_model` seeds it)."""
    built = {}

    def build(*args, **kwargs):
        key = _arguments_key(args, kwargs)
        if key not in built:
            model, processor = testing.build_tiny_vlm(*args, **kwargs)
            built[key] = (model, processor, torch.get_rng_state())
        model, processor, random_state = built[key]
        torch.set_rng_state(random_state)
        return copy.deepcopy(model), copy.deepcopy(processor)

    return build


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
