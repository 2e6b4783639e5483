"""benchmarks/learning.py in its smoke mode: every task and method runs, and the summary, table and plot hold them all.

Which method learns faster is the benchmark's finding (benchmarks/LEARNING.md), not something a test can assert.
"""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "learning.py"
GUARD_METHODS = ("vppo_guard", "vppo_guard_level")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("learning_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, warm_python) -> Path:
    """`python benchmarks/learning.py --smoke` with every method and one prompt (8 completions) per step: enough for
    every figure this test reads; the benchmark's own 4 prompts per step are for learning, not for plumbing."""
    out = tmp_path_factory.mktemp("learning")
    methods = [*load_benchmark().DEFAULT_METHODS, *GUARD_METHODS, "vppo_official_tas"]
    arguments = [str(SCRIPT), "--smoke", "--prompts-per-step", "1", "--workers", "1", "--methods", *methods]
    arguments += ["--output-dir", str(out)]
    log = out / "smoke.log"
    exit_code = warm_python.run(arguments, log, cwd=ROOT, timeout=600)
    assert exit_code == 0, log.read_text()[-6000:]
    return out


@pytest.mark.slow
def test_smoke_writes_every_run_summary_table_and_plot(smoke):
    benchmark = load_benchmark()
    assert set(benchmark.DEFAULT_METHODS) == {"grpo", "vppo", "tgf_only", "tas_only", "random"}
    methods = {*benchmark.DEFAULT_METHODS, *GUARD_METHODS, "vppo_official_tas"}
    runs = {path.stem for path in (smoke / "runs").glob("*.json")}
    assert runs == {f"{task}_{method}_seed0" for task in benchmark.TASKS for method in methods}
    for name in runs:
        log = json.loads((smoke / "runs" / f"{name}.json").read_text())["log"]
        assert [row["step"] for row in log] == [1, 2]
        assert all(0.0 <= row["reward"] <= 1.0 for row in log)
        openness = [row["vppo/guard_openness"] for row in log]
        if name.split("_seed")[0].split("_", 1)[1] in GUARD_METHODS:
            assert all(value is not None and 0.0 <= value <= 1.0 for value in openness), name
        else:
            assert openness == [None, None], name  # no guard, no guard metrics

    summary = json.loads((smoke / "summary.json").read_text())
    assert set(summary["results"]) == set(benchmark.TASKS)
    for task, results in summary["results"].items():
        assert set(results) == methods, task
        for method, entry in results.items():
            assert entry["seeds"] == [0]
            assert 0.0 <= entry["final_reward"]["mean"] <= 1.0
            if method in ("grpo", "tas_only"):  # no TGF: every token is kept, no share to report
                assert "colour_kept_all" not in entry and "tokens_kept_all" not in entry

    table = (smoke / "LEARNING_RESULTS.md").read_text()
    for task in benchmark.TASKS:
        assert f"Task `{task}`" in table
    for method in methods:
        assert f"| {method} |" in table
    with Image.open(smoke / "learning.png") as image:
        assert image.format == "PNG" and image.size[0] > 600
        image.verify()


@pytest.mark.transformers_independent
def test_first_colour_reward_ignores_fillers():
    reward = load_benchmark().first_colour_reward
    completions = [[{"role": "assistant", "content": text}] for text in ("so the is now red", "yes blue red", "okay")]
    assert reward(completions, answer=["red", "red", "red"]) == [1.0, 0.0, 0.0]


@pytest.mark.transformers_independent
def test_steps_to_threshold_reads_the_moving_average():
    benchmark = load_benchmark()
    assert benchmark.steps_to_threshold([0.0, 1.0, 1.0, 1.0], window=2, threshold=0.75) == 3
    assert benchmark.steps_to_threshold([0.0, 0.5], window=2, threshold=0.75) is None


@pytest.mark.transformers_independent
def test_paired_bootstrap_of_per_seed_differences():
    benchmark = load_benchmark()
    constant = benchmark.paired_bootstrap([0.1, 0.1, 0.1])
    assert constant["mean"] == pytest.approx(0.1)
    assert (constant["low"], constant["high"]) == pytest.approx((0.1, 0.1))
    mixed = benchmark.paired_bootstrap([-0.2, 0.0, 0.1, 0.3, 0.05])
    assert mixed["low"] < mixed["mean"] < mixed["high"]
    assert -0.2 <= mixed["low"] and mixed["high"] <= 0.3
    assert (mixed["wins"], mixed["losses"], mixed["seeds"]) == (3, 1, 5)


@pytest.mark.transformers_independent
def test_paired_differences_pair_runs_by_seed():
    benchmark = load_benchmark()

    def run(method, seed, reward):
        return {"task": "colour", "method": method, "seed": seed, "log": [{"reward": reward}] * 3}

    results = [run("grpo", 0, 0.5), run("grpo", 1, 0.25), run("vppo_guard", 1, 0.5), run("vppo_guard", 0, 0.75)]
    results.append(run("vppo_guard", 2, 1.0))  # no GRPO run of seed 2: left out
    paired = benchmark.paired_differences(results, window=2)
    assert list(paired["colour"]) == ["vppo_guard - grpo"]
    assert paired["colour"]["vppo_guard - grpo"]["differences"] == [0.25, 0.25]


@pytest.mark.transformers_independent
def test_colour_kept_is_read_where_the_guard_statistic_reaches_full():
    benchmark = load_benchmark()
    log = [
        {"vppo/guard_dependency": 0.01, "learning/colour_kept": 0.2},
        {"vppo/guard_dependency": 0.5, "learning/colour_kept": 1.0},
        {"vppo/dependency_selected_mean": 0.3, "learning/colour_kept": 0.8},
        # a run without the guard logs every key, its guard metrics as None
        {"vppo/guard_dependency": None, "vppo/dependency_selected_mean": 0.3, "learning/colour_kept": 0.6},
    ]
    assert benchmark.colour_kept_where_dependencies_carry_signal(log) == pytest.approx(0.8)
    assert benchmark.colour_kept_where_dependencies_carry_signal(log[:1]) is None
