"""A NaN loss skips its whole step: the full weights stay bit-identical under DDP, ZeRO-2 and ZeRO-3, two processes."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_multiprocess import TORCH_EXTENSIONS_DIR, ZERO3_CONFIG, free_port
from test_trainer import final_parameters, make_trainer
from transformers import TrainerCallback

import vppo_trl.method.trainer as trainer_module

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
    "backend", ["ddp", "zero2", "zero3", "zero3_deepspeed_optimizer", "zero2_unchecked_gradients"]
)
def test_nan_loss_on_one_process_leaves_the_full_weights_unchanged(tmp_path, backend):
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

    weights = {step: load_file(f"{output}.step{step}.safetensors") for step in (1, 2, 3)}
    assert weights[1].keys() == weights[2].keys() == weights[3].keys()
    moved = [name for name in weights[1] if not torch.equal(weights[1][name], weights[2][name])]
    assert not moved, f"the skipped step 2 changed {len(moved)} of {len(weights[1])} tensors, e.g. {moved[:3]}"
    assert all(torch.isfinite(value).all() for value in weights[2].values())
    moved_again = [name for name in weights[2] if not torch.equal(weights[2][name], weights[3][name])]
    assert len(moved_again) >= 20, moved_again  # step 3 trains again

    for rank in range(2):
        logs = json.loads((tmp_path / f"run.rank{rank}.json").read_text())["logs"]
        assert [entry["vppo/nonfinite_loss_skipped"] for entry in logs] == [0.0, 1.0, 0.0]


def test_nan_in_one_micro_batch_skips_its_whole_accumulated_step(tmp_path, monkeypatch):
    """The NaN micro-batch opens step 2; the finite one after it must not bring the step back."""
    trainer = make_trainer(tmp_path, max_steps=3, gradient_accumulation_steps=2)
    original = trainer_module.VPPOTrainer._compute_loss
    calls = {"count": 0}

    def loss_nan_at_call_3(self, model, inputs):
        calls["count"] += 1
        loss = original(self, model, inputs)
        return loss * math.nan if calls["count"] == 3 else loss

    class Snapshot(TrainerCallback):
        def __init__(self):
            self.weights, self.optimizer_states = {}, {}

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.weights[state.global_step] = final_parameters(trainer)
            self.optimizer_states[state.global_step] = copy.deepcopy(optimizer.state_dict()["state"])

    snapshot = Snapshot()
    trainer.add_callback(snapshot)
    monkeypatch.setattr(trainer_module.VPPOTrainer, "_compute_loss", loss_nan_at_call_3)
    with pytest.warns(
        UserWarning, match=r"Step 2: the training loss is NaN or infinite on 1 of 1 process\(es\) \(here: nan\)"
    ):
        trainer.train()
    weights, states = snapshot.weights, snapshot.optimizer_states
    assert all(torch.equal(weights[1][name], weights[2][name]) for name in weights[1])
    assert sum(not torch.equal(weights[2][name], weights[3][name]) for name in weights[2]) >= 20
    for index, state in states[1].items():  # Adam's step count and moments are untouched too
        for key, value in state.items():
            assert torch.equal(value, states[2][index][key]), (index, key)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["vppo/nonfinite_loss_skipped"] for entry in logs] == [0.0, 0.5, 0.0]
