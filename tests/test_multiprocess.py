"""Two processes on CPU, with DDP and with DeepSpeed ZeRO-3: runs complete and every rank sees the same TAS batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "two_process_vppo.py"

ZERO3_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
  zero3_save_16bit_model: true
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""


# DeepSpeed compiles its CPU op once per folder (about a minute): share one folder between tests and runs.
TORCH_EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
    Path.home() / ".cache" / "vppo-trl-torch-extensions"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    tmp_path: Path,
    *launch_args: str,
    estimator: str = "k3",
    data: str = "colour",
    family: str = "qwen2_5_vl",
    guard: bool = False,
) -> list[dict]:
    output = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launch_args,
        "--num_processes", "2", "--main_process_port", str(free_port()),
        str(SCRIPT), str(output), estimator, data, family, "guard" if guard else "no_guard",
    ]  # fmt: skip
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return [json.loads((tmp_path / f"run.rank{rank}.json").read_text()) for rank in range(2)]


def check_ranks_agree(results: list[dict]) -> None:
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)
    assert all(r["global_step"] == 2 for r in results)
    first, second = results
    assert len(first["tas"]) == len(second["tas"]) == 2
    for view_0, view_1 in zip(first["tas"], second["tas"], strict=True):
        assert len(view_0["scales"]) == 16  # the whole generation batch, both processes
        assert view_0 == view_1
    assert any(scale != 1.0 for view in first["tas"] for scale in view["scales"])
    for log_0, log_1 in zip(first["logs"], second["logs"], strict=True):
        for key in ("vppo/advantage_scale_max", "vppo/beta_max", "vppo/token_fraction", "reward"):
            assert log_0[key] == log_1[key], key


@pytest.mark.slow
def test_two_processes_ddp(tmp_path):
    check_ranks_agree(launch(tmp_path, "--multi_gpu"))


@pytest.mark.slow
def test_two_processes_ddp_cold_start_guard_balances_the_whole_batch_alike_on_both(tmp_path):
    first, second = launch(tmp_path, "--multi_gpu", guard=True)
    check_ranks_agree([first, second])
    assert len(first["balanced"]) == 2 and first["balanced"] == second["balanced"]
    for view in first["balanced"]:
        assert len(view["balanced"]) == 16  # the whole generation batch, both processes
        advantages, valid, balanced = (torch.tensor(view[key]) for key in ("advantages", "valid", "balanced"))
        for side in (advantages > 0, advantages < 0):
            rows = side & valid
            assert rows.any()
            weights = advantages[rows].abs()
            assert (balanced[rows] * weights).sum().item() == pytest.approx(weights.sum().item(), rel=1e-5)
    assert any(scale != 1.0 for view in first["balanced"] for scale in view["balanced"])
    for log_0, log_1 in zip(first["logs"], second["logs"], strict=True):
        assert log_0["vppo/guard_openness"] == log_1["vppo/guard_openness"] == 1.0
        assert log_0.get("vppo/guard_sign_gap") == log_1.get("vppo/guard_sign_gap")


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["k3", "kl"])
def test_two_processes_zero3_with_uneven_skips(tmp_path, estimator):
    pytest.importorskip("deepspeed")
    config = tmp_path / "zero3.yaml"
    config.write_text(ZERO3_CONFIG)
    check_ranks_agree(launch(tmp_path, "--config_file", str(config), estimator=estimator))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])  # Qwen3-VL also feeds vision features to decoder layers
def test_two_processes_zero3_with_a_text_only_process_does_not_hang(tmp_path, family):
    """One process gets only text-only prompts while the other has images: both run the vision tower in step."""
    pytest.importorskip("deepspeed")
    config = tmp_path / "zero3.yaml"
    config.write_text(ZERO3_CONFIG)
    first, second = launch(tmp_path, "--config_file", str(config), data="alternating_text", family=family)
    assert first["global_step"] == second["global_step"] == 2
    assert all(count > 0 for count in first["images_per_step"]), first["images_per_step"]
    assert second["images_per_step"] == [0, 0]
