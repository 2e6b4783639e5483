"""Run by `accelerate launch` in the two-process tests: trains VPPO for two steps per job and records each rank's view.

    two_process_vppo.py OUTPUT_PATH JOBS_JSON

JOBS_JSON is a list of jobs, trained one after the other in the same processes (one launch checks several things):
each has a `name` and optionally `estimator` (k3), `data` (`colour` or `alternating_text`), `family` (qwen2_5_vl) and
`guard` (false). Each rank writes OUTPUT_PATH.{name}.rank{R}.json.
"""

import json
import sys

from datasets import Dataset
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import vppo_trl.method.shaping as shaping_module
import vppo_trl.trainer as trainer_module
from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import COLOURS, build_tiny_vlm, exit_cleanly, make_colour_dataset


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


class Recorder:
    """What each rank sees of one job, while in its `with` block: TAS's inputs and scales, the guard's balance, the
    images per step."""

    def __init__(self):
        self.tas, self.balanced, self.images_per_step = [], [], []

    def __enter__(self) -> "Recorder":
        original_scales = shaping_module.advantage_scales
        original_balance = shaping_module.sign_balanced_scales
        original_apply = trainer_module.VPPOTrainer._apply_visual_dependency
        self.originals = (original_scales, original_balance, original_apply)

        def recording_scales(dependency, valid, beta_min=0.9, beta_max=None, beta_max_cap=None):
            scales = original_scales(dependency, valid, beta_min, beta_max, beta_max_cap)
            self.tas.append({"dependency": dependency.tolist(), "valid": valid.tolist(), "scales": scales.tolist()})
            return scales

        def recording_balance(scales, advantages, valid):
            balanced = original_balance(scales, advantages, valid)
            record = {"advantages": advantages.tolist(), "valid": valid.tolist(), "balanced": balanced.tolist()}
            self.balanced.append(record)
            return balanced

        def recording_apply(trainer, batch):
            self.images_per_step.append(sum(batch.get("num_images") or []))
            return original_apply(trainer, batch)

        shaping_module.advantage_scales = recording_scales
        shaping_module.sign_balanced_scales = recording_balance
        trainer_module.VPPOTrainer._apply_visual_dependency = recording_apply
        return self

    def __exit__(self, *exc_info) -> None:
        scales, balance, apply = self.originals
        shaping_module.advantage_scales = scales
        shaping_module.sign_balanced_scales = balance
        trainer_module.VPPOTrainer._apply_visual_dependency = apply


def train_job(output_path: str, job: dict) -> None:
    estimator, data = job.get("estimator", "k3"), job.get("data", "colour")
    guard = job.get("guard", False)
    model, processor = build_tiny_vlm(job.get("family", "qwen2_5_vl"), extra_words=COLOURS)
    args = VPPOConfig(
        output_dir=f"{output_path}.{job['name']}.out",
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
    with Recorder() as recorder:
        trainer.train()
    rank = trainer.accelerator.process_index
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "tas": recorder.tas,
        "balanced": recorder.balanced,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "images_per_step": recorder.images_per_step,
    }
    with open(f"{output_path}.{job['name']}.rank{rank}.json", "w") as handle:
        json.dump(result, handle)
    # Transformers reads ZeRO-3 from the last training arguments made, which this trainer keeps alive: the next job's
    # model would be built partitioned (the test runs built theirs before any arguments existed).
    unset_hf_deepspeed_config()


if __name__ == "__main__":
    for job in json.loads(sys.argv[2]):
        train_job(sys.argv[1], job)
    exit_cleanly()
