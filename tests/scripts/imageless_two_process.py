"""Run by `accelerate launch` under ZeRO-3 in test_imageless_families.py: one process gets only text-only prompts while
the other has images; trains VPPO two steps on a tiny model of the given family and records what each rank saw."""

import json
import sys

from two_process_vppo import alternating_text_dataset  # the scripts folder is on sys.path

import vppo_trl.trainer as trainer_module
from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import build_family, exit_cleanly


def alternating_reward(completions, **kwargs) -> list[float]:
    return [float(i % 2) for i in range(len(completions))]


def main(output_path: str, family: str) -> None:
    images_per_step = []
    original_apply = trainer_module.VPPOTrainer._apply_visual_dependency

    def recording_apply(self, batch):
        images_per_step.append(sum(batch.get("num_images") or []))
        return original_apply(self, batch)

    trainer_module.VPPOTrainer._apply_visual_dependency = recording_apply
    model, processor = build_family(family)
    args = VPPOConfig(
        output_dir=output_path + ".out",
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=3,
        max_steps=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=11,
        shuffle_dataset=False,
        skip_zero_advantage=False,
    )
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=alternating_reward,
        args=args,
        train_dataset=alternating_text_dataset(32),
        processing_class=processor,
    )
    syncs = len(trainer._vision_syncs)
    trainer.train()
    rank = trainer.accelerator.process_index
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "vision_syncs": syncs,
        "images_per_step": images_per_step,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
    }
    with open(f"{output_path}.rank{rank}.json", "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_cleanly()
