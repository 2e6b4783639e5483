"""Run by `accelerate launch` under ZeRO-3 in test_imageless_families.py: one process gets only text-only prompts while
the other has images; trains VPPO two steps on a tiny model of the given family and records what each rank saw. Then
what the model runs on a text-only input once training is over: after that run, and after a second one (a new model)
whose reward function fails inside training."""

import json
import sys

import torch
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from two_process_vppo import alternating_text_dataset  # the scripts folder is on sys.path

import vppo_trl.trainer as trainer_module
from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.longrun.imageless import VisionTowerSync
from vppo_trl.method.vision import vision_parts
from vppo_trl.testing import build_family, exit_cleanly


def alternating_reward(completions, **kwargs) -> list[float]:
    return [float(i % 2) for i in range(len(completions))]


def failing_reward(completions, **kwargs) -> list[float]:
    raise ConnectionError("the reward server is down")


def make_trainer(output_path: str, family: str, reward) -> VPPOTrainer:
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
    return VPPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=alternating_text_dataset(32),
        processing_class=processor,
    )


def after_training(trainer: VPPOTrainer) -> dict:
    """What the trained model runs on a text-only input, forward and `generate` (the same on both processes, so that
    ZeRO-3 gathers in step): the vision tower's runs, and VPPO's hooks left on any module."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = trainer.processing_class.tokenizer
    inputs = tokenizer(["Name a colour.", "What is two plus two?"], return_tensors="pt", padding=True)
    tower_runs = []
    counters = [tower.register_forward_hook(lambda *_: tower_runs.append(1)) for tower in vision_parts(model)[0]]
    model.eval()
    with torch.no_grad():
        model(**inputs)
        forward_runs = len(tower_runs)
        model.generate(
            **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    for counter in counters:
        counter.remove()
    vppo_hooks = [
        name
        for name, module in model.named_modules()
        for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
        if isinstance(getattr(hook, "__self__", None), VisionTowerSync)
    ]
    return {"forward_tower_runs": forward_runs, "generate_tower_runs": len(tower_runs) - forward_runs,
            "vppo_hooks": vppo_hooks}  # fmt: skip


def main(output_path: str, family: str) -> None:
    images_per_step = []
    original_apply = trainer_module.VPPOTrainer._apply_visual_dependency

    def recording_apply(self, batch):
        images_per_step.append(sum(batch.get("num_images") or []))
        return original_apply(self, batch)

    trainer_module.VPPOTrainer._apply_visual_dependency = recording_apply
    trainer = make_trainer(output_path, family, alternating_reward)
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
        "after_training": after_training(trainer),
    }
    # Transformers reads ZeRO-3 from the last training arguments made, which this trainer keeps alive: the next model
    # would be built partitioned.
    unset_hf_deepspeed_config()
    failing = make_trainer(output_path + ".failing", family, failing_reward)
    try:
        failing.train()
    except ConnectionError as error:
        result["error"] = str(error)
    result["after_error"] = after_training(failing)
    with open(f"{output_path}.rank{rank}.json", "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_cleanly()
