"""Long runs that survive: every weight restored, exact continuation after SIGKILL, atomic checkpoints, no NaN.

The kill tests run real processes (`tests/scripts/resumable_run.py`) and SIGKILL them right after (or while) a
checkpoint is written; a resumed run must end with exactly the weights of the same run never interrupted. Single
processes start from the warm interpreter (tests/processes.py), two-process runs under `accelerate launch`; a
configuration's uninterrupted run is shared by the tests that kill it at different moments.
"""

import json
import math
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from processes import TORCH_EXTENSIONS_DIR, ZERO3_CONFIG, free_port
from safetensors.torch import load_file
from test_trainer import final_parameters, length_reward, make_trainer, vppo_args

import vppo_trl.trainer as trainer_module
from vppo_trl import VPPOTrainer
from vppo_trl.longrun.resume import COMPLETE_MARKER, load_full_weights, newest_complete_checkpoint
from vppo_trl.method.core import (
    advantage_scales,
    kl_token_dependency,
    token_dependency,
    top_dependency_mask,
    trajectory_dependency,
)
from vppo_trl.testing import COLOURS, FAMILIES, build_tiny_vlm, make_colour_dataset

SCRIPT = Path(__file__).parent / "scripts" / "resumable_run.py"
# One thread per run: bit-for-bit comparisons across processes need the same reduction order.
RUN_ENV = {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR}
# Settings that change what is written to disk, not what is trained: runs differing only in these share a reference.
NOT_TRAINING = ("save_total_limit",)


@dataclass
class Run:
    """A started run of `resumable_run.py`: in a child of the warm interpreter, or under `accelerate launch`."""

    output_dir: Path
    wait: Callable[[], int]  # its exit code
    launched: bool


def start(warm_python, output_dir: Path, config: dict, *flags: str, launcher: list[str] | None = None) -> Run:
    arguments = [str(SCRIPT), str(output_dir), json.dumps(config), *flags]
    log_path = Path(f"{output_dir}.log")
    if launcher is None:
        process = warm_python.start(arguments, log_path, env=RUN_ENV)

        def wait() -> int:
            process.join(900)
            return process.exitcode

        return Run(output_dir, wait, launched=False)
    command = [*launcher, "--main_process_port", str(free_port()), *arguments]
    with open(log_path, "a") as log:
        popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **RUN_ENV})
    return Run(output_dir, lambda: popen.wait(timeout=900), launched=True)


def finish(run: Run, killed: bool = False) -> None:
    """Wait for a run; a killed one must have died by SIGKILL (its launcher, if any, then fails)."""
    returncode = run.wait()
    succeeded = (returncode != 0 if run.launched else returncode == -9) if killed else returncode == 0
    log = Path(f"{run.output_dir}.log").read_text()
    assert succeeded, f"exit {returncode} (killed={killed}):\n{log[-6000:]}"


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    folder = output_dir / "final"
    files = list(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {f"{file.name}:{key}": value for file in files for key, value in load_file(file).items()}


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, warm_python) -> Callable[[dict], Run]:
    """The uninterrupted single-process run of a training configuration, started once per module and shared by the
    kill tests of that configuration: `straight(config)` starts it (or returns it) so that it runs alongside the
    first test's interrupted run."""
    folder = tmp_path_factory.mktemp("straight")
    started: dict[str, Run] = {}

    def straight(config: dict) -> Run:
        training = {key: value for key, value in sorted(config.items()) if key not in NOT_TRAINING}
        key = json.dumps(training)
        if key not in started:
            started[key] = start(warm_python, folder / f"run{len(started)}", training)
        return started[key]

    return straight


def interrupted_and_resumed(
    tmp_path: Path, warm_python, straight: Run, config: dict, kill_at: int, launcher=None
) -> None:
    """The same run uninterrupted and SIGKILLed right after checkpoint `kill_at`, then resumed: same final weights."""
    interrupted = tmp_path / "interrupted"
    killed = start(warm_python, interrupted, config, "--kill-at", str(kill_at), launcher=launcher)
    finish(straight)
    finish(killed, killed=True)
    assert not (interrupted / "final").exists()
    assert newest_complete_checkpoint(interrupted) == str(interrupted / f"checkpoint-{kill_at}")
    finish(start(warm_python, interrupted, config, "--resume", launcher=launcher))
    assert_same_weights(final_weights(straight.output_dir), final_weights(interrupted))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "kill_at"),
    [
        ({}, 3),  # VPPO's defaults (on-policy: original-image log-probs from the loss forward)
        ({"dynamic_sampling": True, "dynamic_sampling_reward": "half_uniform_reward"}, 3),
        ({"num_iterations": 2}, 3),  # killed half-way through a generation batch: its completions are restored
        ({"dependency_estimator": "kl"}, 3),
        ({"lora": True}, 3),
        ({"rows": 8, "max_steps": 7}, 5),  # 4 steps per epoch: resumed in the second epoch, reshuffled identically
    ],
    ids=["defaults", "dynamic_sampling", "num_iterations_2", "kl", "lora", "second_epoch"],
)
def test_sigkill_after_checkpoint_then_resume_is_exact(tmp_path, warm_python, straight_runs, config, kill_at):
    interrupted_and_resumed(tmp_path, warm_python, straight_runs(config), config, kill_at)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_two_process_sigkill_then_resume_is_exact(tmp_path, warm_python, backend):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    if backend == "zero3":
        pytest.importorskip("deepspeed")
        accelerate_config = tmp_path / "zero3.yaml"
        accelerate_config.write_text(ZERO3_CONFIG)
        launcher += ["--config_file", str(accelerate_config)]
    else:
        if Version(transformers.__version__) < Version("5.18"):
            pytest.skip(
                "transformers < 5.18 loads the optimizer of a multi-process CPU run with map_location='cpu:0', which "
                "torch cannot restore (fixed upstream since); GPU runs are not concerned"
            )
        launcher += ["--multi_gpu"]
    config = {"max_steps": 4}
    straight = start(warm_python, tmp_path / "straight", config, launcher=launcher)
    interrupted_and_resumed(tmp_path, warm_python, straight, config, 2, launcher=launcher)


@pytest.mark.slow
def test_kill_while_saving_resumes_from_the_newest_complete_checkpoint(tmp_path, warm_python, straight_runs):
    config = {"save_total_limit": 1}
    straight, interrupted = straight_runs(config), tmp_path / "interrupted"
    killed = start(warm_python, interrupted, config, "--kill-while-saving", "3")
    finish(straight)
    finish(killed, killed=True)
    # checkpoint-3 was written up to its completion marker; rotation (save_total_limit=1) had not yet removed 2.
    assert (interrupted / "checkpoint-3" / "model.safetensors").exists()
    assert not (interrupted / "checkpoint-3" / COMPLETE_MARKER).exists()
    assert newest_complete_checkpoint(interrupted) == str(interrupted / "checkpoint-2")
    finish(start(warm_python, interrupted, config, "--resume"))
    assert_same_weights(final_weights(straight.output_dir), final_weights(interrupted))
    assert sorted(path.name for path in interrupted.glob("checkpoint-*")) == ["checkpoint-5"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_restores_every_weight(tmp_path, tiny_vlm, family, lora):
    """A run resumed at its last checkpoint trains no step: its weights must be the checkpoint's, every tensor."""
    peft = None
    if lora:
        from peft import LoraConfig

        # The adapter and a fully trained module next to it (modules_to_save).
        peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])

    def trainer(max_steps):
        model, processor = tiny_vlm(family, extra_words=COLOURS)  # the same initial weights, built once
        return VPPOTrainer(
            model=model,
            reward_funcs=length_reward,
            args=vppo_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2),
            train_dataset=make_colour_dataset(16, seed=1),
            processing_class=processor,
            peft_config=peft,
        )

    trained = trainer(2)
    trained.train()
    initial = final_parameters(trainer(2))
    resumed = trainer(2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    expected, actual = final_parameters(trained), final_parameters(resumed)
    assert expected.keys() == actual.keys()
    changed = [name for name in expected if not torch.equal(expected[name], initial[name])]
    assert len(changed) >= (2 if lora else 20)  # training moved these: a resume that misses them cannot pass
    assert not [name for name in expected if not torch.equal(expected[name], actual[name])]


def test_checkpoint_that_does_not_match_the_model_is_an_error_naming_the_keys(tmp_path):
    model, _ = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    weights["visual.extra.weight"] = torch.zeros(1)
    del weights["lm_head.weight"]
    with pytest.raises(ValueError, match=r"1 model weights are not in it \(lm_head\.weight\).*visual\.extra\.weight"):
        load_full_weights(model, weights, str(tmp_path / "checkpoint-7"))


def test_resume_true_skips_an_incomplete_checkpoint_and_an_explicit_one_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    trainer.train()
    (tmp_path / "out" / "checkpoint-2" / COMPLETE_MARKER).unlink()  # as if killed while saving step 2
    assert newest_complete_checkpoint(tmp_path / "out") == str(tmp_path / "out" / "checkpoint-1")
    resumed = make_trainer(tmp_path, save_strategy="no", max_steps=2)
    with pytest.raises(ValueError, match=r"checkpoint-2 is incomplete .* The newest complete one is .*checkpoint-1"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2


@pytest.mark.slow
def test_failing_hub_push_keeps_training_and_checkpoints(tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    class OfflineHub:
        def create_repo(self, *args, **kwargs):
            return type("RepoUrl", (), {"repo_id": "user/vppo-test"})()

        def upload_folder(self, *args, **kwargs):
            raise ConnectionError("the Hub cannot be reached")

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: OfflineHub(), raising=False)
    monkeypatch.setattr(hf_trainer, "create_repo", OfflineHub().create_repo, raising=False)
    trainer = make_trainer(
        tmp_path, save_strategy="steps", save_steps=1, max_steps=3, push_to_hub=True, hub_model_id="vppo-test"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.state.global_step == 3
    assert all((tmp_path / "out" / f"checkpoint-{step}" / COMPLETE_MARKER).exists() for step in (1, 2, 3))
    # Reported once, counted per step, summed up at the end: not one warning per checkpoint
    reports = [str(warning.message) for warning in caught if "Hub" in str(warning.message)]
    assert len(reports) == 2, reports
    assert re.match(
        r"Pushing .*checkpoint-1 to the Hub failed \(ConnectionError: the Hub cannot be reached\)", reports[0]
    )
    assert reports[1].startswith("3 checkpoint pushes to the Hub failed in this run")
    assert sum(entry.get("hub/push_failures", 0.0) for entry in trainer.state.log_history) == 3


@pytest.mark.transformers_independent
def test_non_finite_log_probs_never_give_nan_dependencies_masks_or_scales():
    mask = torch.ones(3, 4)
    logps = torch.tensor([[-1.0, math.nan, -math.inf, -2.0], [-1.0, -1.0, -1.0, -1.0], [math.nan] * 4])
    perturbed = torch.tensor([[-1.5, -1.0, -1.0, math.inf], [math.nan, -math.inf, -1.0, -3.0], [-1.0] * 4])
    for dependency in (
        token_dependency(logps, perturbed, mask),
        kl_token_dependency(logps.unsqueeze(-1).expand(3, 4, 5), perturbed.unsqueeze(-1).expand(3, 4, 5), mask),
    ):
        assert torch.isfinite(dependency).all()
        scales = advantage_scales(trajectory_dependency(dependency, mask), torch.ones(3, dtype=torch.bool))
        assert torch.isfinite(scales).all()
        assert top_dependency_mask(dependency, mask, 0.4).sum(-1).tolist() == [2, 2, 2]


def test_nonfinite_loss_skips_the_step_then_stops_after_the_limit(tmp_path, monkeypatch):
    trainer = make_trainer(
        tmp_path, max_steps=6, save_strategy="steps", save_steps=1, max_consecutive_nonfinite_steps=3
    )
    original = trainer_module.VPPOTrainer._compute_loss
    calls = {"count": 0}
    snapshots = {}

    def loss_nan_from_call_2(self, model, inputs):
        calls["count"] += 1
        loss = original(self, model, inputs)
        snapshots[calls["count"]] = final_parameters(self)
        return loss * math.nan if calls["count"] >= 2 else loss

    monkeypatch.setattr(trainer_module.VPPOTrainer, "_compute_loss", loss_nan_from_call_2)
    with pytest.warns(
        UserWarning,
        match=r"Step 2: the training loss is NaN or infinite on 1 of 1 process\(es\) \(here: nan\); "
        r"this optimizer step is skipped",
    ):
        with pytest.raises(RuntimeError, match=r"Step 4: the training loss was NaN or infinite 3 times in a row"):
            trainer.train()
    # The skipped steps changed nothing and put no NaN anywhere; the checkpoints written before are intact.
    for name, value in final_parameters(trainer).items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, snapshots[2][name], rtol=0, atol=0, msg=name)
    assert (tmp_path / "out" / "checkpoint-3" / COMPLETE_MARKER).exists()
    skipped = [entry["vppo/nonfinite_loss_skipped"] for entry in trainer.state.log_history if "loss" in entry]
    assert skipped[:3] == [0.0, 1.0, 1.0]


def test_weights_file_written_by_plain_save_pretrained_reloads(tmp_path):
    """The conversion that resume applies is exactly the inverse of what save_pretrained writes."""
    for family in FAMILIES:
        model, _ = build_tiny_vlm(family, extra_words=COLOURS)
        model.save_pretrained(tmp_path / family)
        other, _ = build_tiny_vlm(family, extra_words=COLOURS, seed=1)
        load_full_weights(other, load_file(tmp_path / family / "model.safetensors"), family)
        for name, value in model.state_dict().items():
            assert torch.equal(other.state_dict()[name], value), (family, name)
