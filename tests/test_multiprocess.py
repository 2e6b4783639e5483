"""Two processes on CPU, with DDP and with DeepSpeed ZeRO-3: runs complete and every rank sees the same TAS batch.

One launch per backend trains every job of that backend in turn (tests/scripts/two_process_vppo.py): a launch costs
far more (interpreters, imports, process groups) than two tiny training steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import TORCH_EXTENSIONS_DIR, ZERO3_CONFIG, free_port  # noqa: F401 - also imported from here

SCRIPT = Path(__file__).parent / "scripts" / "two_process_vppo.py"
GLOO_EXIT_SCRIPT = Path(__file__).parent / "scripts" / "gloo_exit.py"
TEXT_ONLY_FAMILIES = ("qwen2_5_vl", "qwen3_vl")  # Qwen3-VL also feeds vision features to decoder layers


def launch(folder: Path, launch_args: list[str], jobs: list[dict]) -> dict[str, list[dict]]:
    """One `accelerate launch` of two processes training every job in turn; each job's results, rank by rank."""
    output = folder / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launch_args,
        "--num_processes", "2", "--main_process_port", str(free_port()),
        str(SCRIPT), str(output), json.dumps(jobs),
    ]  # fmt: skip
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return {
        job["name"]: [json.loads((folder / f"run.{job['name']}.rank{rank}.json").read_text()) for rank in range(2)]
        for job in jobs
    }


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """DDP, one launch: VPPO as it is, then with the cold-start guard."""
    jobs = [{"name": "plain"}, {"name": "guard", "guard": True}]
    return launch(tmp_path_factory.mktemp("ddp"), ["--multi_gpu"], jobs)


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """DeepSpeed ZeRO-3, one launch: both estimators with uneven skips, then one process given only text-only prompts
    while the other has images, for both families."""
    pytest.importorskip("deepspeed")
    folder = tmp_path_factory.mktemp("zero3")
    config = folder / "zero3.yaml"
    config.write_text(ZERO3_CONFIG)
    jobs = [{"name": "k3"}, {"name": "kl", "estimator": "kl"}]
    jobs += [{"name": f"text_{family}", "data": "alternating_text", "family": family} for family in TEXT_ONLY_FAMILIES]
    return launch(folder, ["--config_file", str(config)], jobs)


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
def test_two_processes_ddp(ddp_runs):
    check_ranks_agree(ddp_runs["plain"])


@pytest.mark.slow
def test_two_processes_ddp_cold_start_guard_balances_the_whole_batch_alike_on_both(ddp_runs):
    first, second = ddp_runs["guard"]
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
def test_two_processes_zero3_with_uneven_skips(zero3_runs, estimator):
    check_ranks_agree(zero3_runs[estimator])


@pytest.mark.slow
@pytest.mark.parametrize("family", TEXT_ONLY_FAMILIES)
def test_two_processes_zero3_with_a_text_only_process_does_not_hang(zero3_runs, family):
    """One process gets only text-only prompts while the other has images: both run the vision tower in step."""
    first, second = zero3_runs[f"text_{family}"]
    assert first["global_step"] == second["global_step"] == 2
    assert all(count > 0 for count in first["images_per_step"]), first["images_per_step"]
    assert second["images_per_step"] == [0, 0]


@pytest.mark.slow
def test_a_script_ends_cleanly_while_gloo_workers_still_hold_tensors():
    """The once-seen SIGABRT after a two-process run had finished: gloo's worker threads, kept alive by a reference
    to their process group, released tensors while the interpreter finalised. `exit_cleanly` ends the process first.
    (Ended the old way, the same script aborts in about half the launches: tests/scripts/gloo_exit.py.)"""
    # Fresh interpreters, not the warm ones: the abort happens in the interpreter's finalisation, which the fork
    # server's children never run.
    port = str(free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(GLOO_EXIT_SCRIPT), "clean"],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
