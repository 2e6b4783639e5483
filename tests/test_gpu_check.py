"""benchmarks/gpu_check: the GPU command's whole sequence on CPU with the tiny models, so that it cannot rot between
the rare moments a GPU is there; the real architectures checked on the meta device (no memory, no time).

No timing is asserted: what must hold is every part's own checks (weights compared, steps counted, fingerprints
matched), the sections every figure of benchmarks/README.md is read from, and the table. The run itself is conftest's
`gpu_check_rehearsal`, once per session (tests/test_benchmark_smoke.py reads its step_overhead run too).
"""

import importlib
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(module: str, monkeypatch: pytest.MonkeyPatch):
    """A part of the check, imported as `python -m benchmarks.gpu_check` does: from the repository root."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module(f"benchmarks.gpu_check.{module}")


@pytest.mark.slow
def test_every_part_passes_its_checks(gpu_check_rehearsal):
    result, _ = gpu_check_rehearsal
    for part in ("overhead", "lora", "qwen3", "zero3"):
        section = result[part]
        failed = [name for name, passed in section["checks"].items() if not passed]
        assert section["ok"] and not failed, (part, failed, section.get("error"))
        assert section["seconds"] > 0 and section["steps"] >= 1


@pytest.mark.slow
def test_sections_hold_the_figures_the_readme_explains(gpu_check_rehearsal):
    result, stdout = gpu_check_rehearsal
    for name in ("skip_off", "half_uniform"):
        figures = result["overhead"][name]
        for key in ("overhead_efficiency", "ratio", "peak_mem_ratio"):
            assert isinstance(figures[key], float) and math.isfinite(figures[key]), (name, key)
        assert Path(figures["summary_file"]).exists()  # the whole step_overhead summary, next to the JSON
    assert result["overhead"]["half_uniform"]["skipped_fraction"] == 0.5
    lora = result["lora"]
    assert lora["adapter_tensors_moved"] == lora["adapter_tensors"] > 0 and lora["base_tensors_changed"] == []
    assert lora["adapter_calls_in_perturbed_passes"] > 0 and lora["perturbed_passes"] == lora["steps"]
    assert all(0.0 < f < 1.0 for f in result["qwen3"]["perturbed_patch_rows_changed_fraction"])
    zero3 = result["zero3"]
    assert zero3["steps_first"] == [1, 2] and zero3["steps_resumed"] == [3]
    prints = zero3["fingerprints"]
    assert prints["resumed_begin"] == prints["first_end"] != prints["first_begin"]
    for section in (lora, result["qwen3"]):
        assert isinstance(section["peak_mem_bytes"], int) and section["peak_mem_bytes"] > 0
    assert result["run"]["command"][:3] == ["python", "-m", "benchmarks.gpu_check"]
    assert {"torch", "transformers", "trl"} <= set(result["run"]["versions"])
    # The table, one block per part.
    table = stdout[stdout.index(result["run"]["device"]) :]
    for part in ("overhead", "lora", "qwen3", "zero3"):
        assert f"ok   {part}" in table


def test_real_architectures_have_the_checkpoints_parameter_counts(monkeypatch):
    """3,754,622,976 and 8,767,123,696: Qwen2.5-VL-3B-Instruct's and Qwen3-VL-8B-Instruct's parameter counts."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    from vppo_trl.testing import build_tokenizer

    architectures = load("architectures", monkeypatch)
    tokenizer = build_tokenizer()
    for name, model_cls, count in (
        ("qwen2_5_vl_3b", Qwen2_5_VLForConditionalGeneration, 3_754_622_976),
        ("qwen3_vl_8b", Qwen3VLForConditionalGeneration, 8_767_123_696),
    ):
        config = architectures.architecture_config(name, tokenizer, None, None)
        with torch.device("meta"):
            model = model_cls._from_config(config, dtype=torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == count, name
    shallow = architectures.architecture_config("qwen3_vl_8b", tokenizer, 2, 10)
    assert shallow.vision_config.deepstack_visual_indexes == [8]


@pytest.mark.transformers_independent
def test_a_budget_shortens_the_parts_down_to_their_minimum(monkeypatch):
    settings = load("settings", monkeypatch)
    plan = settings.PartPlan(steps=4, setup_s=10.0, step_s=5.0)
    assert plan.expected_s == 30.0
    assert plan.within(100.0).steps == 4
    assert plan.within(22.0).steps == 2
    assert plan.within(1.0).steps == 1


def test_bad_arguments_are_refused_with_their_reason(monkeypatch, capsys):
    main = load("__main__", monkeypatch)
    with pytest.raises(SystemExit):
        main.parse(["--device", "cpu", "--preset", "real"])
    assert "--preset real builds 3-8B models in bf16: it needs --device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main.parse(["--parts", "overhead", "lora2"])
    assert "unknown part(s) ['lora2']" in capsys.readouterr().err
