"""Run by `accelerate launch` in the two-process tests: trains VPPO for two steps and records each rank's TAS view."""

import json
import sys

import torch
from datasets import Dataset

import vppo_trl.method.trainer as trainer_module
from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import COLOURS, build_tiny_vlm, make_colour_dataset


def half_uniform_reward(completions, answer, **kwargs) -> list[float]:
    """Uniform groups for red and green shapes (skipped), varied rewards for the others."""
    return [1.0 if a in ("red", "green") else float(len(str(c)) % 3) for c, a in zip(completions, answer, strict=True)]


def alternating_text_dataset(rows: int) -> Dataset:
    """Rows in pairs: two with an image, then two text-only; unshuffled, so one process gets only text each step."""
    images = make_colour_dataset(rows // 2, seed=3)
    records = []
    for start in range(0, rows // 2, 2):
        records += [dict(images[start + offset]) for offset in range(2)]
        text = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
        records += [{"prompt": text, "images": [], "answer": "red"}] * 2
    return Dataset.from_list(records)


def main(output_path: str, estimator: str, data: str, family: str, guard: bool) -> None:
    records = []
    original_scales = trainer_module.advantage_scales

    def recording_scales(dependency, valid, beta_min=0.9, beta_max=None, beta_max_cap=None):
        scales = original_scales(dependency, valid, beta_min, beta_max, beta_max_cap)
        records.append({"dependency": dependency.tolist(), "valid": valid.tolist(), "scales": scales.tolist()})
        return scales

    trainer_module.advantage_scales = recording_scales
    balanced_records = []
    original_balance = trainer_module.sign_balanced_scales

    def recording_balance(scales, advantages, valid):
        balanced = original_balance(scales, advantages, valid)
        balanced_records.append(
            {"advantages": advantages.tolist(), "valid": valid.tolist(), "balanced": balanced.tolist()}
        )
        return balanced

    trainer_module.sign_balanced_scales = recording_balance
    images_per_step = []
    original_apply = trainer_module.VPPOTrainer._apply_visual_dependency

    def recording_apply(self, batch):
        images_per_step.append(sum(batch.get("num_images") or []))
        return original_apply(self, batch)

    trainer_module.VPPOTrainer._apply_visual_dependency = recording_apply
    model, processor = build_tiny_vlm(family, extra_words=COLOURS)
    args = VPPOConfig(
        output_dir=output_path + ".out",
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=5,
        max_steps=2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=11,
        dependency_estimator=estimator,
        shuffle_dataset=data == "colour",
        # The guard with thresholds this random model's dependencies pass, so that it opens and its balance acts.
        cold_start_guard=guard,
        cold_start_guard_floor=1e-9,
        cold_start_guard_full=1e-8,
    )
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=half_uniform_reward,
        args=args,
        train_dataset=make_colour_dataset(32, seed=3) if data == "colour" else alternating_text_dataset(32),
        processing_class=processor,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "tas": records,
        "balanced": balanced_records,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "images_per_step": images_per_step,
    }
    with open(f"{output_path}.rank{rank}.json", "w") as handle:
        json.dump(result, handle)
    # Tear the process group down before the interpreter exits: a gloo thread left running can abort the exit.
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    output, estimator, data, family, guard = (sys.argv[1:] + [None] * 4)[:5]
    main(output, estimator or "k3", data or "colour", family or "qwen2_5_vl", guard == "guard")
