"""A VPPO run that can be SIGKILLed right after a checkpoint and resumed; used by the resume tests.

    python resumable_run.py OUTPUT_DIR CONFIG_JSON [--kill-at STEP | --kill-while-saving STEP] [--resume]

CONFIG_JSON holds VPPOConfig overrides plus `family` (tiny model family), `lora` (bool) and `rows` (training
rows). The final weights are saved with `trainer.save_model` to OUTPUT_DIR/final (rank 0 writes them; under ZeRO-3
they are gathered first).
"""

import argparse
import json
import os
import signal

from transformers import TrainerCallback

import vppo_trl.longrun.resume as checkpoints_module
from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import COLOURS, build_tiny_vlm, exit_cleanly, make_colour_dataset


def half_uniform_reward(completions, answer, **kwargs) -> list[float]:
    """Uniform groups (no learning signal) for red and green shapes, varied rewards for the others."""
    return [1.0 if a in ("red", "green") else float(len(str(c)) % 3) for c, a in zip(completions, answer, strict=True)]


class KillAfterSave(TrainerCallback):
    """SIGKILL this process as soon as the checkpoint of `step` is written, like a preempted job."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("config", help="JSON: VPPOConfig overrides, plus 'family', 'lora' and 'rows'.")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument(
        "--kill-while-saving", type=int, default=None, help="SIGKILL before STEP's checkpoint is marked"
    )
    parser.add_argument("--resume", action="store_true")
    cli = parser.parse_args()
    if cli.kill_while_saving is not None:
        mark_complete = checkpoints_module.mark_complete

        def killed_before_marking(checkpoint, global_step):
            if global_step == cli.kill_while_saving:
                os.kill(os.getpid(), signal.SIGKILL)
            mark_complete(checkpoint, global_step)

        checkpoints_module.mark_complete = killed_before_marking
    overrides = json.loads(cli.config)
    family = overrides.pop("family", "qwen2_5_vl")
    lora = overrides.pop("lora", False)
    rows = overrides.pop("rows", 32)
    settings = dict(
        output_dir=cli.output_dir,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=5,
        max_steps=5,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        seed=5,
    )
    settings.update(overrides)
    model, processor = build_tiny_vlm(family, extra_words=COLOURS)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=half_uniform_reward,
        args=VPPOConfig(**settings),
        train_dataset=make_colour_dataset(rows, seed=3),
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[KillAfterSave(cli.kill_at)] if cli.kill_at is not None else None,
    )
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    trainer.save_model(os.path.join(cli.output_dir, "final"))


if __name__ == "__main__":
    main()
    exit_cleanly()
