"""A recipe's own settings, parsed by the training script's parser, on a check-sized run: the colour task, short
fixed-length completions, HF generation, a few steps, nothing written to trackers or the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.step_overhead.workload import make_reward

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"


def recipe_args(recipe: str, device: str, output_dir: str, steps: int, overrides: dict[str, Any]):
    """`(VPPOConfig, ModelConfig)` of `recipes/<recipe>`, with what a check on one device must change.

    `overrides` are further recipe keys (e.g. the batch, the completion length). Model, data and reward keys of the
    recipe are parsed too (an unknown or ill-typed key fails here, as it would for a user) but not used.
    """
    from vppo_trl.train import make_parser

    values = {
        "output_dir": output_dir,
        "max_steps": steps,
        "gradient_accumulation_steps": 1,
        "use_vllm": False,  # vLLM cannot be brought to a bare GPU image; HF generation instead
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "push_to_hub": False,
        "logging_steps": 1,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "bf16": device == "cuda",
        "use_cpu": device == "cpu",
        "dynamic_sampling_reward": "total",  # the check's one reward stands in for the recipe's accuracy
        **overrides,
    }
    argv = ["--config", str(RECIPES / recipe)]
    for key, value in values.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    _, training_args, model_args = make_parser("gpu_check").parse_args_and_config(argv)
    return training_args, model_args


def fixed_length_generation(training_args, processor) -> None:
    """Completions of exactly `max_completion_length` tokens (EOS masked until then), vision tokens never sampled."""
    from vppo_trl.testing import suppressed_token_ids

    training_args.generation_kwargs = {
        "min_new_tokens": training_args.max_completion_length,
        "suppress_tokens": suppressed_token_ids(processor),
    }


def colour_data(rows: int, seed: int, image_size: int):
    """The colour task with each row's index, for step_overhead's reward (every group has mixed rewards)."""
    from vppo_trl.testing import make_colour_dataset

    dataset = make_colour_dataset(max(rows, 8), seed=seed, size=image_size)
    return dataset.add_column("prompt_index", list(range(len(dataset))))


def build_recipe_trainer(
    training_args, model_args, model, processor, image_size: int, callbacks: list | None = None, **kwargs
):
    """VPPOTrainer on the colour task with the recipe's settings (LoRA when the recipe has `use_peft`)."""
    from trl import get_peft_config

    from vppo_trl import VPPOTrainer

    fixed_length_generation(training_args, processor)
    prompts_per_step = training_args.per_device_train_batch_size // training_args.num_generations
    rows = prompts_per_step * (training_args.max_steps + 1)
    return VPPOTrainer(
        model=model,
        reward_funcs=make_reward(0.0),
        args=training_args,
        train_dataset=colour_data(rows, training_args.seed, image_size),
        processing_class=processor,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
        **kwargs,
    )
