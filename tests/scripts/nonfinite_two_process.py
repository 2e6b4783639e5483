"""Run by `accelerate launch` in the distributed non-finite guard tests: NaN losses and NaN gradients on some ranks.

    nonfinite_two_process.py OUTPUT_PATH [CONFIG_JSON]

CONFIG_JSON holds VPPOConfig overrides, and optionally `"text_only_odd_prompts": true` (every other prompt without an
image: with two processes, rank 1 trains text-only batches, so its vision tower takes no part in its forward). The
faults, by optimizer step (one micro-batch per step), with `max_consecutive_nonfinite_steps=2`:

- step 2: the loss is NaN on rank 1 only (a corrupt sample);
- step 4: the loss is finite on both ranks, but rank 0's backward gives NaN gradients (a bf16 backward overflow);
- steps 6 and 7: the loss is NaN on rank 0: two skipped steps in a row stop training at step 7. At step 6 the NaN is
  a constant added to the loss, so its gradients are finite and only the guard can skip the step (under DeepSpeed,
  ZeRO's own check sees nothing).

After every optimizer step the full (gathered) weights are written to OUTPUT_PATH.step{N}.safetensors by rank 0, and
each rank writes its logs, the learning rate after every step and the error that stopped it to
OUTPUT_PATH.rank{R}.json. The guard is left as it is.
"""

import json
import math
import sys

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import TrainerCallback

import vppo_trl.trainer as trainer_module
from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import COLOURS, build_tiny_vlm, exit_cleanly, make_colour_dataset

MAX_STEPS = 8
NAN_LOSS = {2: 1, 7: 0}  # optimizer step: the rank whose loss is NaN
NAN_CONSTANT = {6: 0}  # optimizer step: the rank whose loss gets a NaN constant (finite gradients)
NAN_GRADIENTS = {4: 0}  # optimizer step: the rank whose backward gives NaN gradients
STOP_STEP = 7


class NaNGradient(torch.autograd.Function):
    """The identity forward, NaN gradients backward: a finite loss whose backward overflows."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def inject_faults(
    compute_loss, nan_loss: dict[int, int], nan_gradients: dict[int, int], nan_constant: dict[int, int] | None = None
):
    """`_compute_loss` with the faults of `nan_loss`, `nan_gradients` and `nan_constant` (call number: rank)
    injected."""
    nan_constant = nan_constant or {}
    calls = {"count": 0, "with_images": []}

    def faulty_compute_loss(self, model, inputs):
        calls["count"] += 1
        calls["with_images"].append(inputs.get("pixel_values") is not None)
        loss = compute_loss(self, model, inputs)
        rank = self.accelerator.process_index
        if nan_loss.get(calls["count"]) == rank:
            return loss * math.nan
        if nan_gradients.get(calls["count"]) == rank:
            return NaNGradient.apply(loss)
        if nan_constant.get(calls["count"]) == rank:
            return loss + math.nan
        return loss

    faulty_compute_loss.calls = calls
    return faulty_compute_loss


def varied_reward(completions, **kwargs) -> list[float]:
    return [float(len(str(completion)) % 3) for completion in completions]


class SaveFullWeights(TrainerCallback):
    """Gather the full weights after each optimizer step (a collective under ZeRO-3) and save them on rank 0; note the
    learning rate the next step will use (index 0: before the first)."""

    def __init__(self, output_path: str):
        self.output_path = output_path
        self.trainer = None
        self.learning_rates = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.learning_rates.append(self.trainer.lr_scheduler.get_last_lr()[0])

    def on_step_end(self, args, state, control, **kwargs):
        self.learning_rates.append(self.trainer.lr_scheduler.get_last_lr()[0])
        weights = self.trainer.accelerator.get_state_dict(self.trainer.model_wrapped)
        if state.is_world_process_zero:
            weights = {name: value.detach().cpu().clone().contiguous() for name, value in weights.items()}
            save_file(weights, f"{self.output_path}.step{state.global_step}.safetensors")


def main(output_path: str, overrides: dict) -> None:
    faulty = inject_faults(trainer_module.VPPOTrainer._compute_loss, NAN_LOSS, NAN_GRADIENTS, NAN_CONSTANT)
    trainer_module.VPPOTrainer._compute_loss = faulty
    text_only_odd_prompts = overrides.pop("text_only_odd_prompts", False)
    settings = dict(
        output_dir=output_path + ".out",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        max_steps=MAX_STEPS,
        max_consecutive_nonfinite_steps=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=7,
    )
    settings.update(overrides)
    dataset = make_colour_dataset(2 * MAX_STEPS, seed=3)
    if text_only_odd_prompts:
        rows = [dict(row) for row in dataset]
        for row in rows[1::2]:
            row["prompt"] = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
            row["images"] = []
        dataset = Dataset.from_list(rows)
        settings["shuffle_dataset"] = False  # rank 0 trains prompts 0, 2, 4, ..., rank 1 prompts 1, 3, 5, ...
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    save_weights = SaveFullWeights(output_path)
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=varied_reward,
        args=VPPOConfig(**settings),
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[save_weights],
    )
    save_weights.trainer = trainer
    error = None
    try:
        trainer.train()
    except RuntimeError as stopped:
        error = str(stopped)
    rank = trainer.accelerator.process_index
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "logs": logs,
        "error": error,
        "batches_with_images": faulty.calls["with_images"],
        "learning_rates": save_weights.learning_rates,
    }
    with open(f"{output_path}.rank{rank}.json", "w") as handle:
        json.dump(record, handle)
    # Tear the process group down before the interpreter exits: a gloo thread left running can abort the exit.
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    exit_cleanly()
