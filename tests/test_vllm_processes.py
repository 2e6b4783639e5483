"""vLLM beyond one process: two processes each with a colocated engine (DDP, ZeRO-3 with a text-only process),
`vppo-trl eval --backend vllm`, the CPU recipe with vLLM, and server mode's refusal without CUDA.

The vLLM tests run in the vLLM venv (`.ci/vllm-env`, then `VENV/bin/python -m pytest -m vllm`) and are skipped
where vLLM is not importable; each launch starts one engine per process (about 30 s each on CPU)."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import TORCH_EXTENSIONS_DIR, ZERO3_CONFIG, free_port

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import make_colour_dataset, save_vllm_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "scripts" / "two_process_vllm.py"
requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
# vLLM's CPU engine: its KV cache in GiB (the default takes far more than a tiny model needs). DeepSpeed's CPU op is
# built against the torch that loads it: the vLLM venv's torch gets a folder of its own.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TORCH_EXTENSIONS_DIR": f"{TORCH_EXTENSIONS_DIR}-torch-{torch.__version__}"}


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


def launch(folder: Path, launch_args: list[str], data: str) -> list[dict]:
    """One `accelerate launch` of two processes training VPPO with vLLM colocated; each rank's record."""
    model_dir = save_vllm_model(folder / "model", "qwen2_5_vl")
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
    """DDP, the same images every step: an engine's image caches must not outlive a weight sync."""
    return launch(tmp_path_factory.mktemp("vllm_ddp"), ["--multi_gpu"], "repeated_images")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> list[dict]:
    """ZeRO-3: the engine is loaded from parameters gathered from both processes; rank 1 gets only text prompts."""
    pytest.importorskip("deepspeed")
    folder = tmp_path_factory.mktemp("vllm_zero3")
    (folder / "zero3.yaml").write_text(ZERO3_CONFIG)
    return launch(folder, ["--config_file", str(folder / "zero3.yaml")], "alternating_text")


UNPACKED = {"model.language_model.embed_tokens.weight", "model.language_model.norm.weight",
            "model.visual.patch_embed.proj.weight", "model.visual.merger.ln_q.weight"}  # fmt: skip
# The engine computes in bfloat16 (vLLM's CPU default for a float32 checkpoint), the trainer in float32
LOGP_MEAN_TOLERANCE, LOGP_MAX_TOLERANCE = 0.05, 0.15


def check_engines_follow_the_trainer(results: list[dict]) -> None:
    """Each rank's engine, after every weight sync, holds exactly the trainer's weights (in the engine's dtype), the
    trained ones from the second step on, and both ranks' engines hold the same weights."""
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)
    for result in results:
        assert result["global_step"] == 2
        first, second = result["syncs"]
        assert [first["step"], second["step"]] == [0, 1]
        for sync in result["syncs"]:
            # What the engine holds as the checkpoint has it: embeddings, norms, biases, the patch embedding (its
            # linear weights are packed for its CPU kernels, checked through its log-probs below)
            assert len(sync["matched"]) >= 20 and UNPACKED <= set(sync["matched"])
            assert sync["equal_to_trainer"] == sync["matched"]
        assert second["changed_since_first_sync"] == second["matched"]
    for sync_0, sync_1 in zip(results[0]["syncs"], results[1]["syncs"], strict=True):
        assert sync_0["engine_checksum"] == sync_1["engine_checksum"]
    for log_0, log_1 in zip(results[0]["logs"], results[1]["logs"], strict=True):
        assert log_0["reward"] == log_1["reward"] and log_0["vppo/token_fraction"] == log_1["vppo/token_fraction"]
        # The engine sampled from the trainer's current weights, packed linear layers included: its log-probs of
        # the sampled tokens are the trainer's up to the engine's arithmetic (stale weights: far apart)
        assert log_0["sampling/sampling_logp_difference/mean"] < LOGP_MEAN_TOLERANCE
        assert log_0["sampling/sampling_logp_difference/max"] < LOGP_MAX_TOLERANCE


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


# ----------------------------------------------------------------------------------------------------------------
# `vppo-trl eval --backend vllm`
# ----------------------------------------------------------------------------------------------------------------


def run_eval(model_dir: Path, data_root: Path, output: Path, backend: str) -> list[dict]:
    """`vppo-trl eval` as a user runs it, greedy; its samples."""
    command = [
        sys.executable, "-m", "vppo_trl.cli", "eval", "--model", str(model_dir), "--benchmarks", "geo3k,mmmu_pro",
        "--data-root", str(data_root), "--output-dir", str(output), "--backend", backend, "--k", "1",
        "--temperature", "0", "--max-new-tokens", "8", "--min-pixels", "none", "--max-pixels", "3136",
        "--dtype", "float32", "--max-model-len", "1024",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **VLLM_ENV})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    assert "| Geo3k | 4 |" in completed.stdout and "| MMMU-Pro | 4 |" in completed.stdout
    return [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]


@requires_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_eval_with_the_vllm_backend_generates_what_the_hf_backend_does(tmp_path):
    """Greedy decoding of the same float32 model: vLLM (its prompt rendering, image inputs, sampling settings) gives
    the completions `model.generate` gives."""
    from test_eval import write_paper_data

    model_dir = save_vllm_model(tmp_path / "model", "qwen2_5_vl")
    data_root = write_paper_data(tmp_path, {"hiyouga_geometry3k": "open", "MMMU_MMMU_Pro": "letter"}, count=4)
    by_vllm = run_eval(model_dir, data_root, tmp_path / "vllm", "vllm")
    by_hf = run_eval(model_dir, data_root, tmp_path / "hf", "hf")
    key = lambda sample: (sample["benchmark"], sample["problem_id"], sample["sample"])  # noqa: E731
    assert sorted(map(key, by_vllm)) == sorted(map(key, by_hf)) and len(by_vllm) == 8
    assert all(sample["length"] > 0 for sample in by_vllm)
    assert {key(sample): sample["length"] for sample in by_vllm} == {key(sample): sample["length"] for sample in by_hf}
    # The same tokens; a completion ending inside a multi-byte character decodes with a trailing U+FFFD in
    # transformers, while vLLM's detokenizer holds the incomplete bytes back
    texts = [{key(sample): sample["completion"].rstrip("\ufffd") for sample in run} for run in (by_vllm, by_hf)]
    assert texts[0] == texts[1]


# ----------------------------------------------------------------------------------------------------------------
# recipes/cpu_vllm.yaml, as its header says to run it
# ----------------------------------------------------------------------------------------------------------------


def header_command(recipe: Path, program: str) -> list[str]:
    """The `#   [ENV=VALUE ...] vppo-trl PROGRAM ...` line of a recipe's header, as an argv."""
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#   ")]
    return next(line[4:].split() for line in header if f"vppo-trl {program}" in line)


@requires_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_cpu_vllm_recipe_trains_as_its_header_says(tmp_path):
    recipe = ROOT / "recipes" / "cpu_vllm.yaml"
    python = [sys.executable, "-m", "vppo_trl.cli"]
    env = {name: value for name, value in os.environ.items() if name != "VLLM_CPU_KVCACHE_SPACE"}
    env["MASTER_PORT"] = str(free_port())  # the engine's process group of one: not the default 29500 others may hold
    tiny = header_command(recipe, "tiny")
    assert tiny[0] == "vppo-trl"
    subprocess.run([*python, *tiny[1:]], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    train = header_command(recipe, "train")
    assert train[-4:] == ["vppo-trl", "train", "--config", "recipes/cpu_vllm.yaml"]
    env.update(assignment.split("=", 1) for assignment in train[:-4])
    completed = subprocess.run(
        [*python, "train", "--config", str(recipe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    # The logged windows (every 5 of the 10 steps), as the console shows them
    logs = [ast.literal_eval(line) for line in completed.stdout.splitlines() if line.startswith("{'loss'")]
    assert len(logs) == 2
    for log in logs:
        assert 0 < float(log["vppo/token_fraction"]) < 1  # VPPO's perturbed pass ran on vLLM's rollouts
        # TRL logs this only for vLLM's samples: the engine followed the trainer (see the multi-process tests)
        assert float(log["sampling/sampling_logp_difference/mean"]) < LOGP_MEAN_TOLERANCE
    assert (tmp_path / "runs" / "cpu-vllm" / "model.safetensors").is_file()
