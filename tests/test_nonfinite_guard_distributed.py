"""A NaN or infinite loss, or NaN or infinite gradients, skip their optimizer step on every process, never move a
weight and hold the learning-rate schedule: two processes under DDP (with and without unused parameters), ZeRO-2 and
ZeRO-3, one process with bf16 and with an fp16 loss scaler; the stop rule counts optimizer steps. DeepSpeed settings
the guard cannot cover are refused."""

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts.nonfinite_two_process import NAN_CONSTANT, NAN_GRADIENTS, NAN_LOSS, STOP_STEP, inject_faults
from test_multiprocess import TORCH_EXTENSIONS_DIR, ZERO3_CONFIG, free_port
from test_trainer import final_parameters, make_trainer
from transformers import TrainerCallback

import vppo_trl.trainer as trainer_module
from vppo_trl.longrun.guards import GUARDED_STEP, check_deepspeed_config

SCRIPT = Path(__file__).parent / "scripts" / "nonfinite_two_process.py"

DEEPSPEED_CONFIG_FILE = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {path}
  zero3_init_flag: false
num_machines: 1
num_processes: 2
use_cpu: true
"""
AUTO_BATCH = dict.fromkeys(
    ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"], "auto"
)
# DeepSpeed's own configs, each with what it asks of the Trainer.
DEEPSPEED_CONFIGS = {
    # The optimizer built by DeepSpeed (torch's AdamW, so nothing is compiled), not by the Trainer.
    "zero3_deepspeed_optimizer": (
        {
            "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
            },
            "gradient_clipping": "auto",
            **AUTO_BATCH,
        },
        {},
    ),
    # No gradient norm: DeepSpeed itself then never notices non-finite gradients and would apply them.
    "zero2_unchecked_gradients": (
        {"zero_optimization": {"stage": 2, "compute_grad_norm": False}, "gradient_clipping": 0.0, **AUTO_BATCH},
        {"max_grad_norm": 0.0},
    ),
}


def launch_args(tmp_path: Path, backend: str) -> tuple[list[str], dict]:
    """The launcher's arguments for `backend`, and the VPPOConfig overrides it needs."""
    if backend == "ddp":
        return ["--multi_gpu"], {}
    if backend == "ddp_unused_parameters":
        # The Trainer's choice for PEFT models or without gradient checkpointing; rank 1's batches are text-only, so
        # its vision tower, trainable, takes no part in its forward.
        return ["--multi_gpu"], {"ddp_find_unused_parameters": True, "text_only_odd_prompts": True}
    pytest.importorskip("deepspeed")
    config = tmp_path / "accelerate.yaml"
    overrides = {}
    if backend in DEEPSPEED_CONFIGS:
        deepspeed_config, overrides = DEEPSPEED_CONFIGS[backend]
        (tmp_path / "deepspeed.json").write_text(json.dumps(deepspeed_config))
        config.write_text(DEEPSPEED_CONFIG_FILE.format(path=tmp_path / "deepspeed.json"))
    else:
        config.write_text(ZERO3_CONFIG.replace("zero_stage: 3", f"zero_stage: {backend.removeprefix('zero')}"))
    return ["--config_file", str(config)], overrides


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    ["ddp", "ddp_unused_parameters", "zero2", "zero3", "zero3_deepspeed_optimizer", "zero2_unchecked_gradients"],
)
def test_nonfinite_losses_and_gradients_leave_the_full_weights_unchanged_then_stop_the_run(tmp_path, backend):
    """One run per backend: a NaN loss on one process (step 2), NaN gradients under a finite loss on one process
    (step 4), then NaN losses two steps in a row (6, with finite gradients, and 7), with
    max_consecutive_nonfinite_steps=2 (see the script)."""
    output = tmp_path / "run"
    arguments, overrides = launch_args(tmp_path, backend)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *arguments,
        "--num_processes", "2", "--main_process_port", str(free_port()),
        str(SCRIPT), str(output), json.dumps(overrides),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log[-6000:]
    assert (
        "Step 2: the training loss is NaN or infinite on 1 of 2 process(es) (here: nan); "
        "this optimizer step is skipped" in log
    )
    assert log.count("this optimizer step is skipped") == 2, log[-6000:]  # once per process; later ones are counted

    weights = {step: load_file(f"{output}.step{step}.safetensors") for step in range(1, STOP_STEP)}
    assert not Path(f"{output}.step{STOP_STEP}.safetensors").exists()
    assert all(weights[step].keys() == weights[1].keys() for step in weights)
    for step in range(2, STOP_STEP):
        moved = [name for name in weights[step] if not torch.equal(weights[step - 1][name], weights[step][name])]
        if step in NAN_LOSS or step in NAN_GRADIENTS or step in NAN_CONSTANT:
            assert not moved, (
                f"the skipped step {step} changed {len(moved)} of {len(weights[step])} tensors: {moved[:3]}"
            )
        else:
            assert len(moved) >= 20, (step, moved)  # the step after a skipped one trains again
        assert all(torch.isfinite(value).all() for value in weights[step].values()), step

    for rank in range(2):
        record = json.loads((tmp_path / f"run.rank{rank}.json").read_text())
        assert [entry["vppo/nonfinite_loss_skipped"] for entry in record["logs"]] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        # The learning-rate schedule (linear decay) holds on the skipped steps 2, 4 and 6, whoever skipped them.
        assert_schedule_holds_on({2, 4, 6}, record["learning_rates"])
        assert record["error"].startswith(
            f"Step {STOP_STEP}: the training loss was NaN or infinite 2 times in a row: 2 optimizer steps in a row "
            "were skipped (max_consecutive_nonfinite_steps=2; 4 skipped in this run)."
        ), record["error"]
        if backend == "ddp_unused_parameters":
            assert set(record["batches_with_images"]) == {rank == 0}


def make_faulty_trainer(tmp_path, monkeypatch, nan_loss=(), nan_gradients=(), nan_constant=(), **overrides):
    """A one-process trainer whose loss is NaN at the `nan_loss` calls of `_compute_loss`, whose backward gives NaN
    gradients at the `nan_gradients` calls, and whose loss gets a NaN constant (finite gradients) at `nan_constant`."""
    trainer = make_trainer(tmp_path, **overrides)
    faulty = inject_faults(
        trainer_module.VPPOTrainer._compute_loss,
        dict.fromkeys(nan_loss, 0),
        dict.fromkeys(nan_gradients, 0),
        dict.fromkeys(nan_constant, 0),
    )
    monkeypatch.setattr(trainer_module.VPPOTrainer, "_compute_loss", faulty)
    return trainer


class Snapshot(TrainerCallback):
    """The weights, the optimizer's state and the learning rate the next step will use, after every optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.weights, self.optimizer_states = {0: final_parameters(trainer)}, {}
        self.learning_rates = {}

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.learning_rates[0] = lr_scheduler.get_last_lr()[0]

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.weights[state.global_step] = final_parameters(self.trainer)
        self.optimizer_states[state.global_step] = copy.deepcopy(optimizer.state_dict()["state"])
        self.learning_rates[state.global_step] = lr_scheduler.get_last_lr()[0]

    def moved(self, step: int) -> int:
        """How many tensors optimizer step `step` changed."""
        before, after = self.weights[step - 1], self.weights[step]
        return sum(not torch.equal(before[name], after[name]) for name in before)


def assert_schedule_holds_on(skipped: set[int], learning_rates: list[float]) -> None:
    """`learning_rates[k]`: the learning rate after optimizer step k (0: before the first), on a decaying schedule.
    A skipped step leaves it where it was; an applied step moves it on."""
    for step in range(1, len(learning_rates)):
        if step in skipped:
            assert learning_rates[step] == learning_rates[step - 1], (step, learning_rates)
        else:
            assert learning_rates[step] < learning_rates[step - 1], (step, learning_rates)


def skipped_log(trainer) -> list[float]:
    return [entry["vppo/nonfinite_loss_skipped"] for entry in trainer.state.log_history if "loss" in entry]


def test_nan_in_one_micro_batch_skips_its_whole_accumulated_step(tmp_path, monkeypatch):
    """The NaN micro-batch opens step 2; the finite one after it must not bring the step back."""
    trainer = make_faulty_trainer(tmp_path, monkeypatch, nan_loss=[3], max_steps=3, gradient_accumulation_steps=2)
    snapshot = Snapshot(trainer)
    trainer.add_callback(snapshot)
    with pytest.warns(
        UserWarning, match=r"Step 2: the training loss is NaN or infinite on 1 of 1 process\(es\) \(here: nan\)"
    ):
        trainer.train()
    weights, states = snapshot.weights, snapshot.optimizer_states
    assert snapshot.moved(2) == 0
    assert snapshot.moved(3) >= 20
    for index, state in states[1].items():  # Adam's step count and moments are untouched too
        for key, value in state.items():
            assert torch.equal(value, states[2][index][key]), (index, key)
    assert all(torch.isfinite(value).all() for value in weights[3].values())
    assert skipped_log(trainer) == [0.0, 1.0, 0.0]  # one value per optimizer step
    assert_schedule_holds_on({2}, [snapshot.learning_rates[step] for step in range(4)])
    assert_optimizer_given_back(trainer)


def assert_optimizer_given_back(trainer) -> None:
    """Training over: the optimizer (the user's, with `optimizers=`) steps as it did before the guard wrapped it, and
    accelerate no longer reports a skipped step."""
    assert not getattr(trainer.optimizer.optimizer.step, GUARDED_STEP, False)
    assert not trainer.accelerator.optimizer_step_was_skipped


@pytest.mark.slow
def test_stop_rule_counts_optimizer_steps_not_micro_batches(tmp_path, monkeypatch):
    """Every micro-batch of steps 2 on is NaN, 3 micro-batches per step, 2 skipped steps allowed in a row: the run
    stops at step 3, after two whole skipped steps, not inside step 2 after two micro-batches."""
    trainer = make_faulty_trainer(
        tmp_path, monkeypatch, nan_loss=range(4, 100), max_steps=5, gradient_accumulation_steps=3,
        per_device_train_batch_size=4, max_consecutive_nonfinite_steps=2,
    )  # fmt: skip
    snapshot = Snapshot(trainer)
    trainer.add_callback(snapshot)
    with (
        pytest.warns(UserWarning, match=r"^Step 2: the training loss is NaN or infinite on 1 of 1 process"),
        pytest.raises(RuntimeError, match=r"^Step 3: the training loss was NaN or infinite 2 times in a row"),
    ):
        trainer.train()
    assert sorted(snapshot.weights) == [0, 1, 2]  # step 3 raised before it ended
    assert snapshot.moved(1) >= 20 and snapshot.moved(2) == 0
    assert all(torch.equal(value, snapshot.weights[2][name]) for name, value in final_parameters(trainer).items())
    assert_optimizer_given_back(trainer)  # also after the error, raised inside the skipped step 3


@pytest.mark.slow
def test_one_nan_micro_batch_per_step_stops_the_run_and_is_reported_once(tmp_path, monkeypatch):
    """A NaN in the first of 2 micro-batches of every step from step 2 on: each of those steps is skipped, the finite
    micro-batch after the NaN does not reset the count, and the console says it once, then sums it up in the error."""
    trainer = make_faulty_trainer(
        tmp_path, monkeypatch, nan_loss=range(3, 100, 2), max_steps=8, gradient_accumulation_steps=2,
        per_device_train_batch_size=4, max_consecutive_nonfinite_steps=3,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"^Step 4: the training loss was NaN or infinite 3 times in a row"):
            trainer.train()
    reports = [str(warning.message) for warning in caught if "NaN or infinite" in str(warning.message)]
    assert len(reports) == 1 and reports[0].startswith("Step 2: the training loss is NaN or infinite"), reports
    assert skipped_log(trainer) == [0.0, 1.0, 1.0]


def test_finite_loss_with_nan_gradients_skips_the_step_and_no_checkpoint_holds_nan(tmp_path, monkeypatch):
    """A bf16 backward overflow: the loss is finite, its gradients are not (one process, no DeepSpeed)."""
    trainer = make_faulty_trainer(
        tmp_path, monkeypatch, nan_gradients=[2], max_steps=3, bf16=True, save_strategy="steps", save_steps=1
    )
    snapshot = Snapshot(trainer)
    trainer.add_callback(snapshot)
    with pytest.warns(UserWarning, match=r"Step 2: the gradients are NaN or infinite, the training loss finite"):
        trainer.train()
    assert snapshot.moved(2) == 0 and snapshot.moved(3) >= 20
    saved = load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in saved.values())
    assert skipped_log(trainer) == [0.0, 1.0, 0.0]
    assert_schedule_holds_on({2}, [snapshot.learning_rates[step] for step in range(4)])


@pytest.mark.parametrize("fault", ["nan_loss", "nan_constant", "nan_gradients"])
def test_fp16_loss_scaler_skips_a_nonfinite_step(tmp_path, monkeypatch, fault):
    """
    LoRA on one fp16 GPU runs accelerate's GradScaler path: `AcceleratedOptimizer.step` hands the scaler the step it
    captured when it prepared the optimizer. On CPU accelerate makes no scaler for fp16, so torch's CPU GradScaler is
    given to the accelerator before training: the scaled backward, the scaler's own check of the unscaled gradients,
    its skip and accelerate's step swap all run as on a GPU; the forward runs in float32 (no fp16 autocast on CPU).

    `nan_loss`: a NaN loss (NaN gradients, which the scaler finds itself); `nan_constant`: a NaN loss whose gradients
    are finite (only the guard can skip it); `nan_gradients`: a finite loss with NaN gradients (the scaler skips and
    lowers its scale: its own business, not counted).
    """
    trainer = make_faulty_trainer(tmp_path, monkeypatch, **{fault: [2]}, max_steps=3, bf16=False, max_grad_norm=0.0)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    snapshot = Snapshot(trainer)
    trainer.add_callback(snapshot)
    skipped_by_accelerate = []

    class StepWasSkipped(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            skipped_by_accelerate.append(trainer.accelerator.optimizer_step_was_skipped)

    trainer.add_callback(StepWasSkipped())
    counted = fault != "nan_gradients"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    reports = [str(warning.message) for warning in caught if "NaN or infinite" in str(warning.message)]
    # The guard reports the step it skipped; a step the scaler skipped on its own is the scaler's business
    assert [report.split(";")[0] for report in reports] == (
        ["Step 2: the training loss is NaN or infinite on 1 of 1 process(es) (here: nan)"] if counted else []
    )
    assert snapshot.moved(1) >= 20 and snapshot.moved(2) == 0 and snapshot.moved(3) >= 20
    for index, state in snapshot.optimizer_states[1].items():
        for key, value in state.items():
            assert torch.equal(value, snapshot.optimizer_states[2][index][key]), (index, key)
    if counted:  # the guard withheld the step: accelerate sees it skipped, and the learning-rate schedule holds
        assert skipped_by_accelerate == [False, True, False]
        assert_schedule_holds_on({2}, [snapshot.learning_rates[step] for step in range(4)])
    # Otherwise the fused AdamW (the Trainer's default) skips inside its own kernel, where accelerate cannot see it.
    assert skipped_log(trainer) == [0.0, float(counted), 0.0]
    halved = fault != "nan_constant"  # the scaler saw non-finite gradients and lowered its scale
    assert trainer.accelerator.scaler.get_scale() == 2.0**10 / (2 if halved else 1)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.4}}},
            r"^DeepSpeed ZeRO-3 with a partial optimizer offload \(offload_optimizer.ratio=0.4\) .* backup_optimizer.*"
            r"Offload the whole optimizer \(ratio 1.0, the default\) or none of it.$",
        ),
        (
            {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}},
            r"^DeepSpeed without ZeRO \(zero_optimization.stage 0\) in fp32 checks no gradient .* Use ZeRO stage 1, "
            r"2 or 3, or train without DeepSpeed \(DDP\)",
        ),
    ],
    ids=["zero3_partial_offload", "stage0_fp32"],
)
def test_deepspeed_settings_the_guard_cannot_cover_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        check_deepspeed_config(config)


@pytest.mark.parametrize(
    "config",
    [
        {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},  # all of it offloaded
        {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none", "ratio": 0.4}}},
        {"zero_optimization": {"stage": 0}, "fp16": {"enabled": True}},  # DeepSpeed's fp16 checks its gradients
        {"zero_optimization": {"stage": 0}, "bf16": {"enabled": "true"}},
        {"zero_optimization": {"stage": 2}},
    ],
)
def test_deepspeed_settings_the_guard_covers_are_accepted(config):
    check_deepspeed_config(config)
