"""benchmarks/step_overhead end to end on CPU (tiny model, 2 measured steps): the JSON is complete and typed.

No timing is asserted: the figures depend on the machine and its load. What must hold is that both trainers ran,
interleaved, from the same weights, with fixed-length completions, and that every reported key is there. The run is
the first one of the GPU check's CPU rehearsal (conftest's `gpu_check_rehearsal`), which drives step_overhead as its
command line does (`run_benchmark`, `summarise`) and writes the same JSON: its two workers start once per session.
"""

import importlib
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(module: str, monkeypatch: pytest.MonkeyPatch):
    """A part of the benchmark package, imported as `python -m benchmarks.step_overhead` does: from the root."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module(f"benchmarks.step_overhead.{module}")


def is_time(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value >= 0.0


@pytest.fixture(scope="module")
def result(gpu_check_rehearsal) -> dict:
    """The step_overhead run (GRPO and VPPO interleaved, VPPO measuring every row) of the GPU check's CPU rehearsal:
    `python -m benchmarks.step_overhead --device cpu --model tiny --steps 2 --warmup 1 ... --no-skip-zero-advantage`,
    the JSON that command writes."""
    check, _ = gpu_check_rehearsal
    return json.loads(Path(check["overhead"]["skip_off"]["summary_file"]).read_text())


@pytest.mark.slow
def test_json_has_every_key_with_sane_types(result):
    """Every figure benchmarks/README.md and RESULTS.md read, with its type."""
    assert result["complete"] is True
    for key in (
        "grpo_step_s",
        "vppo_step_s",
        "grpo_generation_s",
        "vppo_generation_s",
        "grpo_train_side_s",
        "vppo_train_side_s",
        "perturbed_pass_s",
        "forward_pass_s",
        "perturbation_s",
        "apply_visual_dependency_s",
        "visual_dependency_s",
    ):
        assert is_time(result[key]), (key, result[key])
    # Differences and ratios of noisy times: finite, of either sign.
    for key in (
        "ratio",
        "train_side_overhead_s",
        "overhead_efficiency",
        "overhead_efficiency_paired_median",
        "apply_efficiency",
        "peak_mem_ratio",
    ):
        assert isinstance(result[key], float) and math.isfinite(result[key]), (key, result[key])
    for key in ("grpo_peak_mem_bytes", "vppo_peak_mem_bytes", "vppo_dependency_phase_peak_mem_bytes"):
        assert isinstance(result[key], int) and result[key] > 0, key
    assert isinstance(result["skipped_fraction"], float) and 0.0 <= result["skipped_fraction"] <= 1.0
    assert result["skipped_fraction_per_step"] == [0.0, 0.0]
    assert {"torch", "transformers", "trl"} <= set(result["versions"])
    assert result["settings"]["model"] == "tiny" and result["settings"]["steps"] == 2
    assert result["command"][:3] == ["python", "-m", "benchmarks.step_overhead"]
    assert isinstance(result["device_name"], str) and isinstance(result["date"], str)
    assert isinstance(result["git"]["commit"], str) and isinstance(result["git"]["package_modified"], list)


@pytest.mark.slow
def test_both_trainers_ran_every_step_from_the_same_weights(result):
    assert result["weights_identical"] is True
    assert result["completion_lengths_fixed"] is True
    for role in ("grpo", "vppo"):
        records = result["raw"][role]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert [r["warmup"] for r in records] == [True, False, False]
        assert all(is_time(r["step_s"]) and is_time(r["generation_s"]) for r in records)
    # On-policy HF generation: TRL computes no old log-probs, and k3 takes the original-image log-probs from the loss's
    # own forward, so the perturbed pass is VPPO's only extra forward.
    assert result["grpo_nograd_forwards_per_step"] == 0
    assert result["original_forwards_per_step"] == 0 and result["original_forward_s"] is None
    assert result["perturbed_forwards_per_step"] == 1
    assert result["skipped_fraction"] == 0.0


@pytest.mark.transformers_independent
def test_uniform_prompt_share_is_exact_per_run_of_prompts(monkeypatch):
    uniform_prompt = load("workload", monkeypatch).uniform_prompt
    for share in (0.0, 0.25, 0.5, 1.0):
        flags = [uniform_prompt(i, share) for i in range(16)]
        assert sum(flags) == int(16 * share)
    # Two prompts per step at share 0.5: exactly one uniform group in every step.
    assert all(sum(uniform_prompt(i, 0.5) for i in (2 * s, 2 * s + 1)) == 1 for s in range(8))


def test_7b_arch_config_is_qwen25_vl_7b(monkeypatch):
    """Built on the meta device: no memory, no time. 8,292,166,656 is Qwen2.5-VL-7B-Instruct's parameter count."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vppo_trl.testing import build_tokenizer

    config = load("workload", monkeypatch).qwen25_vl_7b_arch_config(build_tokenizer())
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656
    assert config.text_config.vocab_size == 152064
    assert config.vision_config.fullatt_block_indexes == [7, 15, 23, 31]


def test_perturbation_space_benchmark_runs(tmp_path, warm_python):
    """benchmarks/perturbation_space.py on two tiny batches: both routes timed, the layout recorded."""
    script = ROOT / "benchmarks" / "perturbation_space.py"
    out = tmp_path / "spaces.json"
    arguments = [str(script), "--sizes", "60x90,30x30", "--prompts", "1", "--generations", "2"]
    arguments += ["--reps", "1", "--json", str(out)]
    exit_code = warm_python.run(arguments, tmp_path / "spaces.log", cwd=ROOT, timeout=300)
    assert exit_code == 0, (tmp_path / "spaces.log").read_text()[-6000:]
    result = json.loads(out.read_text())
    assert [row["loaded_size"] for row in result["results"]] == [[60, 90], [30, 30]]
    for row in result["results"]:
        assert row["images"] == 2 and len(row["grid_thw"]) == 3
        for key in ("processor_on_originals_s", "original_image_s", "pixel_values_s"):
            assert is_time(row[key]), (key, row[key])
