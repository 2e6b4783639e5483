"""The runs of the learning benchmark (`benchmarks/learning.py`): the methods, the tasks, the warm starts, training.

Each run trains one method from the warm start of one task and seed and writes its per-step log to
`<output-dir>/runs/<task>_<method>_seed<seed>.json`; `learning.py` sends the runs to worker processes.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from vppo_trl.testing import (
    COLOURS,
    build_model,
    build_processor,
    build_tokenizer,
    colour_reward,
    make_colour_dataset,
    suppressed_token_ids,
)
from vppo_trl.tools import demo

METHODS: dict[str, dict[str, Any]] = {
    "grpo": {"token_filter_ratio": 1.0, "advantage_shaping": False},
    "vppo": {},
    "tgf_only": {"advantage_shaping": False},
    "tas_only": {"token_filter_ratio": 1.0},
    "random": {"token_filter_criterion": "random"},
    "entropy": {"token_filter_criterion": "entropy"},
    "vppo_guard": {"cold_start_guard": True},
    "vppo_guard_level": {"cold_start_guard": True, "cold_start_guard_balance": False},
    "vppo_official_tas": {"skip_zero_advantage": False},
}
# Methods whose TAS statistics include the zero-advantage completions, as the official code's (see RecordingTrainer).
OFFICIAL_TAS_METHODS = ("vppo_official_tas",)
DEFAULT_METHODS = ("grpo", "vppo", "tgf_only", "tas_only", "random")
TASKS = ("colour", "filler")
FILLERS = ("so", "the", "answer", "is", "now", "well", "yes", "okay")
NUM_FILLERS = 4
# Completion tokens: the answer and <|im_end|>, with room for nothing else (the demo's 4 for the one-word task).
MAX_COMPLETION_LENGTH = {"colour": 4, "filler": NUM_FILLERS + 2}
# The warm start's AdamW rate, every parameter alike: the CPU demo's until its warm start changed (issue 15), kept so
# that the sweeps of LEARNING.md start from the same kind of policy (60 steps give a loss of about ln(4)/2 = 0.69).
WARM_START_LR = 3e-3


def warm_start_answer(task: str, seen_share: float):
    """
    Warm-start target: the image's colour with probability `seen_share`, else a colour drawn at random, preceded in
    the filler task by free filler words. With `seen_share=0` the warm start teaches the format only (the demo's).
    """

    def make_answer(rng: random.Random, colour: str) -> str:
        said = colour if rng.random() < seen_share else rng.choice(COLOURS)
        fillers = [rng.choice(FILLERS) for _ in range(NUM_FILLERS)] if task == "filler" else []
        return " ".join([*fillers, said])

    return make_answer


def first_colour_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the first colour word of the completion is the right one: filler words neither earn nor cost."""
    rewards = []
    for completion, colour in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else "".join(message["content"] for message in completion)
        words = [word.strip(".,;:!?\"'").lower() for word in text.split()]
        said = next((word for word in words if word in COLOURS), None)
        rewards.append(1.0 if said == colour else 0.0)
    return rewards


def warm_start_dir(output_dir: Path, task: str, seed: int) -> Path:
    return output_dir / "warm_start" / f"{task}_seed{seed}"


def build_warm_start(output_dir: Path, task: str, seed: int, steps: int, seen_share: float) -> dict[str, Any]:
    """The demo's model, tokenizer and format-only warm start for `task`, saved for every method of this seed."""
    extra_words = COLOURS if task == "colour" else COLOURS + FILLERS
    tokenizer = build_tokenizer(extra_words, vocab_size=demo.VOCAB_SIZE)
    tokenizer.padding_side = "left"
    processor = build_processor("qwen2_5_vl", tokenizer)
    model = build_model("qwen2_5_vl", tokenizer, seed=seed)
    make_answer = warm_start_answer(task, seen_share)
    loss = demo.warm_start(
        model, processor, steps, seed=seed + 1, make_answer=make_answer, learning_rate=WARM_START_LR
    )
    path = warm_start_dir(output_dir, task, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return {"task": task, "seed": seed, "loss": loss}


def make_recording_trainer_class():
    from vppo_trl import VPPOTrainer
    from vppo_trl.method.core import sign_scale_gap
    from vppo_trl.trainer import loss_mask

    class RecordingTrainer(VPPOTrainer):
        """VPPOTrainer that also logs where the colour token is and what TGF does with it (metrics only)."""

        colour_ids: torch.Tensor
        official_tas_statistics = False

        def _shape_advantages(self, batch, dependency, measured, shapeable, with_image, entropies=None):
            # The official code's TAS statistics: per process and micro-batch (here both are the whole generation
            # batch: one process, steps_per_generation 1) and over every completion, zero advantages included (all
            # measured, as skip_zero_advantage is off). Zero-advantage completions keep their zero advantage.
            statistics_rows = measured if self.official_tas_statistics else shapeable
            advantages = batch["advantages"].clone()
            super()._shape_advantages(batch, dependency, measured, statistics_rows, with_image, entropies=entropies)
            mask = loss_mask(batch).bool()
            self._log_scales_by_sign(advantages, batch["advantages"], shapeable)
            colour = torch.isin(batch["completion_ids"], self.colour_ids.to(mask.device)) & mask
            # The first colour word is the one the reward reads; later ones (rare) count as other tokens.
            first = colour & (colour.cumsum(-1) == 1)
            rows = measured & first.any(-1)
            metrics = self._metrics["train"]
            if rows.any():
                other = mask & ~first & rows.unsqueeze(-1)
                metrics["learning/colour_dependency"].append(dependency[first & rows.unsqueeze(-1)].mean().item())
                if other.any():
                    metrics["learning/other_dependency"].append(dependency[other].mean().item())
            trained = shapeable & first.any(-1)
            if batch["advantages"].dim() == 2 and trained.any():
                kept = batch["advantages"] != 0  # TGF-kept tokens of the completions with a policy gradient
                metrics["learning/colour_kept"].append(kept[first & trained.unsqueeze(-1)].float().mean().item())
                metrics["learning/tokens_kept"].append(
                    (kept[trained] & mask[trained]).sum().item() / mask[trained].sum().item()
                )

        def _log_scales_by_sign(self, advantages, shaped, shapeable) -> None:
            """
            The TAS scales applied, read back from the shaped advantages: their gap between the two sides of the
            advantage's sign (`sign_scale_gap`, after the guard's balance if any) and the mean shaped advantage (0 for
            GRPO, whose group advantages sum to 0). A scale that follows the sign tilts the update towards pushing
            every sampled answer down (or up).
            """
            rows = shapeable & (advantages != 0)
            if not rows.any():
                return
            scaled = shaped.abs().amax(-1) if shaped.dim() == 2 else shaped.abs()
            scales = torch.where(rows, scaled / advantages.abs().clamp(min=1e-12), torch.ones_like(scaled))
            metrics = self._metrics["train"]
            gap = sign_scale_gap(scales, advantages, rows)
            if gap is not None:
                metrics["learning/scale_gap"].append(gap)
            metrics["learning/net_advantage"].append((scales * advantages)[rows].mean().item())

    return RecordingTrainer


def train_one(
    output_dir: Path, task: str, method: str, seed: int, steps: int, prompts_per_step: int
) -> dict[str, Any]:
    """Train one method from the warm start of (`task`, `seed`); returns and writes its per-step log."""
    torch.set_num_threads(1)
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    from vppo_trl import VPPOConfig

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore", FutureWarning)
    set_seed(seed)
    path = warm_start_dir(output_dir, task, seed)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    masked = suppressed_token_ids(processor)
    demo.mask_tokens(policy, masked)
    run_dir = output_dir / "trainer" / f"{task}_{method}_seed{seed}"
    config = VPPOConfig(
        output_dir=str(run_dir),
        max_steps=steps,
        per_device_train_batch_size=prompts_per_step * demo.NUM_GENERATIONS,
        num_generations=demo.NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH[task],
        temperature=1.0,
        beta=0.0,
        gradient_checkpointing=False,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        **METHODS[method],
    )
    train_dataset = make_colour_dataset(steps * prompts_per_step, seed=seed + 3)
    vision = list(policy.model.visual.parameters())
    vision_ids = {id(p) for p in vision}
    optimizer = torch.optim.AdamW(
        [
            {"params": vision, "lr": config.learning_rate * demo.VISION_LR_MULTIPLIER},
            {"params": [p for p in policy.parameters() if p.requires_grad and id(p) not in vision_ids]},
        ],
        lr=config.learning_rate,
        weight_decay=0.0,
    )
    trainer = make_recording_trainer_class()(
        model=policy,
        reward_funcs=colour_reward if task == "colour" else first_colour_reward,
        args=config,
        train_dataset=train_dataset,
        processing_class=processor,
        optimizers=(optimizer, None),
    )
    trainer.official_tas_statistics = method in OFFICIAL_TAS_METHODS
    tokenizer = processor.tokenizer
    trainer.colour_ids = torch.tensor(
        [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))[0] for c in COLOURS for text in (c, " " + c)]
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    keys = ("reward", "vppo/token_fraction", "vppo/dependency_selected_mean", "vppo/dependency_rejected_mean")
    keys += ("vppo/advantage_scale_max", "vppo/guard_openness", "vppo/guard_dependency", "vppo/guard_filter_ratio")
    keys += ("vppo/guard_sign_gap",)
    keys += ("learning/colour_dependency", "learning/other_dependency", "learning/colour_kept", "learning/tokens_kept")
    keys += ("learning/scale_gap", "learning/net_advantage", "entropy")
    log = [{key: entry.get(key) for key in ("step", *keys)} for entry in demo.step_logs(trainer.state.log_history)]
    result = {"task": task, "method": method, "seed": seed, "steps": steps, "train_seconds": seconds, "log": log}
    runs = output_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / f"{task}_{method}_seed{seed}.json").write_text(json.dumps(result) + "\n")
    return result
