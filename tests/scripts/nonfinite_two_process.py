"""Run by `accelerate launch` in the distributed NaN-guard tests: a NaN loss on rank 1 only, at step 2 of 3.

    nonfinite_two_process.py OUTPUT_PATH [CONFIG_JSON]

CONFIG_JSON holds VPPOConfig overrides. After every optimizer step the full (gathered) weights are written to
OUTPUT_PATH.step{N}.safetensors by rank 0, and each rank writes its logs to OUTPUT_PATH.rank{R}.json. The NaN comes
from the loss itself, as from a corrupt sample; the guard is left as it is.
"""

import json
import math
import sys

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

import vppo_trl.method.trainer as trainer_module
from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import COLOURS, build_tiny_vlm, exit_cleanly, make_colour_dataset

NAN_STEP = 2
NAN_RANK = 1


def varied_reward(completions, **kwargs) -> list[float]:
    return [float(len(str(completion)) % 3) for completion in completions]


class SaveFullWeights(TrainerCallback):
    """Gather the full weights after each optimizer step (a collective under ZeRO-3) and save them on rank 0."""

    def __init__(self, output_path: str):
        self.output_path = output_path
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        weights = self.trainer.accelerator.get_state_dict(self.trainer.model_wrapped)
        if state.is_world_process_zero:
            weights = {name: value.detach().cpu().clone().contiguous() for name, value in weights.items()}
            save_file(weights, f"{self.output_path}.step{state.global_step}.safetensors")


def main(output_path: str, overrides: dict) -> None:
    original_compute_loss = trainer_module.VPPOTrainer._compute_loss
    calls = {"count": 0}

    def loss_nan_on_one_rank(self, model, inputs):
        calls["count"] += 1
        loss = original_compute_loss(self, model, inputs)
        if calls["count"] == NAN_STEP and self.accelerator.process_index == NAN_RANK:
            return loss * math.nan
        return loss

    trainer_module.VPPOTrainer._compute_loss = loss_nan_on_one_rank
    settings = dict(
        output_dir=output_path + ".out",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        max_steps=3,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=7,
    )
    settings.update(overrides)
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    save_weights = SaveFullWeights(output_path)
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=varied_reward,
        args=VPPOConfig(**settings),
        train_dataset=make_colour_dataset(16, seed=3),
        processing_class=processor,
        callbacks=[save_weights],
    )
    save_weights.trainer = trainer
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(f"{output_path}.rank{rank}.json", "w") as handle:
        json.dump({"logs": [entry for entry in trainer.state.log_history if "loss" in entry]}, handle)
    # Tear the process group down before the interpreter exits: a gloo thread left running can abort the exit.
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    exit_cleanly()
