"""Two processes under DeepSpeed ZeRO-3 on CPU, one with only text-only prompts: no hang for families other than
Qwen-VL (Gemma 3, and InternVL with its processor's tiling), one launch per family. The same launch checks that the
model is handed back without VPPO's hooks, after a run and after a run that fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_multiprocess import TORCH_EXTENSIONS_DIR, ZERO3_CONFIG, free_port  # the tests folder is on sys.path

from vppo_trl.testing import family_available

SCRIPT = Path(__file__).parent / "scripts" / "imageless_two_process.py"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "internvl"])
def test_zero3_with_a_text_only_process_does_not_hang(tmp_path, family):
    pytest.importorskip("deepspeed")
    if family_available(family):
        pytest.skip(family_available(family))
    config = tmp_path / "zero3.yaml"
    config.write_text(ZERO3_CONFIG)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", "2", "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path / "run"), family,
    ]  # fmt: skip
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    first, second = (json.loads((tmp_path / f"run.rank{rank}.json").read_text()) for rank in range(2))
    assert first["world_size"] == 2 and first["global_step"] == second["global_step"] == 2
    assert first["vision_syncs"] == second["vision_syncs"] == 1  # the hook is on, on both
    assert all(count > 0 for count in first["images_per_step"]), first["images_per_step"]
    assert second["images_per_step"] == [0, 0]  # this process never had an image, and kept in step
    for log_0, log_1 in zip(first["logs"], second["logs"], strict=True):
        assert log_0["vppo/dependency_mean"] == log_1["vppo/dependency_mean"]
    assert first["logs"][-1]["vppo/dependency_mean"] > 0  # the image process measured its images
    # Training over, normally or by an error inside it: a text-only forward or `generate` runs no vision tower.
    plain = {"forward_tower_runs": 0, "generate_tower_runs": 0, "vppo_hooks": []}
    for rank in (first, second):
        assert rank["error"] == "the reward server is down"
        assert rank["after_training"] == rank["after_error"] == plain
