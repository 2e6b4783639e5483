"""One launch of part 4, run by `accelerate launch` on every process: the 7B paper recipe's settings under ZeRO-3
for a few steps with a checkpoint, or (`resume`) the same run resumed from that checkpoint.

    accelerate launch --config_file recipes/accelerate/zero3.yaml -m benchmarks.gpu_check.zero3_worker SPEC_JSON

Every process fingerprints the gathered weights when training begins and ends; rank 0 writes what it saw to the
spec's `result` file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from vppo_trl.testing import exit_cleanly

# AdamW at 1e-4 moves every bf16 weight in one step; the recipe's 1e-6 would leave most of them bit for bit
# unchanged in a few steps, and a resume that loads nothing could not be told from one that loads the checkpoint.
LEARNING_RATE = 1e-4


def gathered_fingerprint(model) -> str:
    """The fingerprint of the whole model, its ZeRO-3 shards gathered (a collective: every process calls it)."""
    import deepspeed

    from benchmarks.step_overhead.workload import fingerprint

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return fingerprint(model)


def probe_callback(record: dict[str, Any]):
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        """The weights as training begins (after a resume has loaded its checkpoint) and ends, and each step."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            record["begin_global_step"] = state.global_step
            record["begin_fingerprint"] = gathered_fingerprint(model)

        def on_step_end(self, args, state, control, **kwargs):
            record["steps_seen"].append(state.global_step)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            record["end_fingerprint"] = gathered_fingerprint(model)

    return Probe()


def main(spec: dict[str, Any]) -> None:
    import torch

    from benchmarks.step_overhead.harness import max_rss_bytes

    from .architectures import build_policy
    from .recipe import build_recipe_trainer, recipe_args

    overrides = {
        "per_device_train_batch_size": 8,
        "generation_batch_size": 8,
        "max_completion_length": spec["completion_length"],
        "learning_rate": LEARNING_RATE,
        "save_strategy": "steps",
        "save_steps": spec["save_steps"],
        "seed": spec["seed"],
    }
    # The training arguments first: they tell transformers that ZeRO-3 is on before the model exists.
    training_args, model_args = recipe_args(
        "qwen2_5_vl_7b_paper.yaml", spec["device"], spec["output_dir"], spec["max_steps"], overrides
    )
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(training_args.device)
        torch.cuda.reset_peak_memory_stats()
    model, processor = build_policy(
        "qwen2_5_vl_7b",
        tiny=spec["tiny"],
        device=spec["device"],
        dtype="float32" if spec["tiny"] else model_args.dtype,
        image_size=spec["image_size"],
        seed=spec["seed"],
        text_layers=spec["text_layers"],
        vision_layers=spec["vision_layers"],
        attn_implementation=None if spec["tiny"] else model_args.attn_implementation,
    )
    record: dict[str, Any] = {"phase": spec["phase"], "steps_seen": []}
    record["parameters"] = sum(p.numel() for p in model.parameters())
    trainer = build_recipe_trainer(
        training_args, model_args, model, processor, spec["image_size"], callbacks=[probe_callback(record)]
    )
    checkpoint = str(Path(spec["output_dir"]) / f"checkpoint-{spec['save_steps']}") if spec["resume"] else None
    trainer.train(resume_from_checkpoint=checkpoint)
    record["global_step"] = trainer.state.global_step
    # A resumed run's history starts with the checkpoint's: its own entries are those after the step it began at.
    history = [entry for entry in trainer.state.log_history if entry.get("step", 0) > record["begin_global_step"]]
    record["losses"] = [entry["loss"] for entry in history if "loss" in entry]
    record["world_size"] = trainer.accelerator.num_processes
    record["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated()) if cuda else max_rss_bytes()
    if trainer.accelerator.is_main_process:
        Path(spec["result"]).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    exit_cleanly()
