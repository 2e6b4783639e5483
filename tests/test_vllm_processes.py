"""vLLM beyond one process: two processes each with a colocated engine (DDP, ZeRO-3 with a text-only process),
`vppo-trl eval --backend vllm`, the CPU recipe with vLLM, and server mode's refusal without CUDA.

The vLLM tests run in the vLLM venv (`.ci/vllm-env`, then `VENV/bin/python -m pytest -m vllm`) and are skipped
where vLLM is not importable; each launch starts one engine per process (about 30 s each on CPU)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import TORCH_EXTENSIONS_DIR, ZERO3_CONFIG, free_port

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import COLOURS, build_tiny_vlm, make_colour_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "scripts" / "two_process_vllm.py"
requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
# vLLM's CPU engine: its KV cache in GiB (the default takes far more than a tiny model needs).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR}


def test_server_mode_without_cuda_is_refused_naming_the_reason_and_colocate(tiny_vlm, tmp_path):
    model, processor = tiny_vlm("qwen2_5_vl")
    args = VPPOConfig(output_dir=str(tmp_path), use_cpu=True, use_vllm=True, vllm_mode="server", report_to="none")
    with pytest.raises(ValueError) as error:
        VPPOTrainer(
            model=model,
            reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
            args=args,
            train_dataset=make_colour_dataset(4),
            processing_class=processor,
        )
    message = str(error.value)
    assert "vllm_mode='server' needs a CUDA device" in message and "'cpu'" in message
    assert "NCCL" in message and "vllm_mode='colocate'" in message


# ----------------------------------------------------------------------------------------------------------------
# Two processes, one colocated engine each
# ----------------------------------------------------------------------------------------------------------------


def save_vllm_model(folder: Path) -> Path:
    """A tiny Qwen2.5-VL whose heads vLLM's CPU attention serves (32 wide), saved with its processor."""
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def launch(folder: Path, launch_args: list[str], data: str) -> list[dict]:
    """One `accelerate launch` of two processes training VPPO with vLLM colocated; each rank's record."""
    model_dir = save_vllm_model(folder / "model")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launch_args,
        "--num_processes", "2", "--main_process_port", str(free_port()),
        str(SCRIPT), str(folder / "run"), str(model_dir), data,
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env={**os.environ, **VLLM_ENV}, cwd=folder
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return [json.loads((folder / f"run.rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("vllm_ddp"), ["--multi_gpu"], "colour")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> list[dict]:
    """ZeRO-3: the engine is loaded from parameters gathered from both processes; rank 1 gets only text prompts."""
    pytest.importorskip("deepspeed")
    folder = tmp_path_factory.mktemp("vllm_zero3")
    (folder / "zero3.yaml").write_text(ZERO3_CONFIG)
    return launch(folder, ["--config_file", str(folder / "zero3.yaml")], "alternating_text")


def check_engines_follow_the_trainer(results: list[dict]) -> None:
    """Each rank's engine, after every weight sync, holds exactly the trainer's weights (in the engine's dtype), the
    trained ones from the second step on, and both ranks' engines hold the same weights."""
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)
    for result in results:
        assert result["global_step"] == 2
        first, second = result["syncs"]
        assert [first["step"], second["step"]] == [0, 1]
        for sync in result["syncs"]:
            # vLLM fuses q/k/v and gate/up; every other tensor is compared one to one
            assert len(sync["matched"]) >= result["syncs"][0]["trainer_parameters"] // 2
            assert sync["equal_to_trainer"] == sync["matched"]
        assert second["changed_since_first_sync"] == second["matched"]
    for sync_0, sync_1 in zip(results[0]["syncs"], results[1]["syncs"], strict=True):
        assert sync_0["engine_checksum"] == sync_1["engine_checksum"]
    for log_0, log_1 in zip(results[0]["logs"], results[1]["logs"], strict=True):
        assert log_0["reward"] == log_1["reward"] and log_0["vppo/token_fraction"] == log_1["vppo/token_fraction"]


@requires_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_two_processes_ddp_each_with_a_colocated_engine(ddp_run):
    check_engines_follow_the_trainer(ddp_run)
    assert all(count > 0 for result in ddp_run for count in result["images_per_step"])
    assert any(scale != 1.0 for view in ddp_run[0]["tas"] for scale in view["scales"])


@requires_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_two_processes_zero3_with_a_text_only_process_and_colocated_engines(zero3_run):
    check_engines_follow_the_trainer(zero3_run)
    first, second = zero3_run
    assert all(count > 0 for count in first["images_per_step"]), first["images_per_step"]
    assert second["images_per_step"] == [0, 0]
