"""Token perception during training: every `spotlight_steps` steps, the page of a few completions of the batch.

`VPPOConfig(spotlight_steps=N)` adds a [`SpotlightCallback`] to the trainer. On the steps it writes, the trainer hands
it what it measured for the batch (see `VPPOTrainer._shape_advantages`) and it keeps a copy of the token
dependencies, the TGF mask and the TAS scales of one prompt group, nothing recomputed, no extra forward pass. The
group is found by each completion's index in its generation batch, so it is whole after TRL's shuffle too. It writes
`output_dir/spotlight/step-N/` (`perception.html`, `perception.png`, `distributions.png`, `perception.json`) and logs
the pictures and the share of tokens above each dependency threshold to wandb and trackio when they are active.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import TrainerCallback

from ..method.batch_rows import select_rows
from ..method.core import trajectory_dependency
from ..method.passes import COMPLETION_INDEX_KEY
from .spotlight import TokenPerception, display_tokens, pixels_to_pil, write_spotlight
from .spotlight_page import shares_above

# A run of identical special tokens (the hundreds of `<|image_pad|>` of an image) is shown once, with its count.
REPEATED_SPECIAL = re.compile(r"(<\|[A-Za-z_]+\|>)\1+")


@dataclass
class SpotlightBatch:
    """What the page of one step shows, copied to the CPU from the batch the trainer just measured."""

    perceptions: list[TokenPerception]
    images: list[Image.Image]
    perturbed_images: list[Image.Image]
    prompt: str
    # Every measured token and completion of the process's batch, for the distributions.
    token_dependencies: list[float]
    trajectory_dependencies: list[float]


def prompt_text(tokenizer, prompt_ids: torch.Tensor) -> str:
    """The prompt with its special tokens, runs of image tokens collapsed (`<|image_pad|>×64`)."""
    text = tokenizer.decode(prompt_ids.tolist(), skip_special_tokens=False)
    return REPEATED_SPECIAL.sub(lambda match: f"{match.group(1)}×{len(match.group(0)) // len(match.group(1))}", text)


def first_measured_group(
    completion_index: torch.Tensor, measured: torch.Tensor, offset: int, group_size: int
) -> list[int]:
    """
    Rows of the prompt group of the first measured completion, in generation order, wherever TRL's shuffle put them.

    `completion_index` is each row's position in the process's generation batch, `offset` that batch's position in
    the global one: TRL's sampler puts the `group_size` completions of a prompt next to each other, from 0.
    """
    rows = measured.nonzero().squeeze(-1).tolist()
    if not rows:
        return []
    index = completion_index.tolist()
    rows.sort(key=lambda row: index[row])
    group = (offset + index[rows[0]]) // group_size
    return [row for row in rows if (offset + index[row]) // group_size == group]


@torch.no_grad()
def capture_spotlight(
    trainer,
    batch: dict[str, Any],
    dependency: torch.Tensor,
    mask: torch.Tensor,
    keep: torch.Tensor,
    measured: torch.Tensor,
    scales: torch.Tensor,
    advantages: torch.Tensor,
) -> SpotlightBatch | None:
    """
    Copy the first measured prompt group of `batch` (up to `spotlight_completions` completions) and the batch's
    dependency distributions; `None` when no completion of the batch was measured.
    """
    if "pixel_values" not in batch:
        return None
    completion_index = batch.get(COMPLETION_INDEX_KEY)
    if completion_index is None:
        completion_index = torch.arange(mask.size(0))
    offset = trainer.accelerator.process_index * mask.size(0)
    group = first_measured_group(completion_index, measured, offset, trainer.num_generations)
    if not group:
        return None
    first = group[0]
    group = group[: trainer.args.spotlight_completions]
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    perceptions = []
    for row in group:
        tokens_mask = mask[row].bool()
        ids = batch["completion_ids"][row][tokens_mask].tolist()
        tokens, special = display_tokens(tokenizer, ids)
        perceptions.append(
            TokenPerception(
                tokens=tokens,
                dependency=dependency[row][tokens_mask].float().tolist(),
                kept=keep[row][tokens_mask].tolist(),
                trajectory_dependency=trajectory_dependency(dependency[row : row + 1], mask[row : row + 1]).item(),
                completion=tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids,
                special=special,
                advantage=advantages[row].item(),
                advantage_scale=scales[row].item(),
            )
        )
    layout = trainer.shared.pixel_layout
    # The draw the dependencies were measured with (seeded by the completion's index, round and process), made again
    # for the one completion shown: no forward.
    shown = select_rows(batch, [first])
    original, perturbed = shown["pixel_values"], trainer._perturbed_pixel_values(shown)
    grid = shown.get("image_grid_thw")
    measured_tokens = mask.bool() & measured.unsqueeze(-1)
    return SpotlightBatch(
        perceptions=perceptions,
        images=pixels_to_pil(layout, original, grid),
        perturbed_images=pixels_to_pil(layout, perturbed, grid),
        prompt=prompt_text(tokenizer, batch["prompt_ids"][first][batch["prompt_mask"][first].bool()]),
        token_dependencies=dependency[measured_tokens].float().tolist(),
        trajectory_dependencies=trajectory_dependency(dependency, mask)[measured].float().tolist(),
    )


class SpotlightCallback(TrainerCallback):
    """Write (and log) the token perception of a few completions of the batch every `args.spotlight_steps` steps.

    A step whose batch has no measured completion (every advantage zero, with `skip_zero_advantage`) or that
    generated nothing (a generation batch spanning several steps) is written at the next step that has one.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.pending = False
        self.snapshot: SpotlightBatch | None = None

    def capture(self, *measured) -> None:
        """Called by the trainer with what it measured (see `VPPOTrainer._shape_advantages`)."""
        self.snapshot = capture_spotlight(self.trainer, *measured)

    def on_step_begin(self, args, state, control, **kwargs):
        if (state.global_step + 1) % args.spotlight_steps == 0:
            self.pending = True
        self.trainer.shared.spotlight_capture = self.capture if self.pending and state.is_world_process_zero else None

    def on_step_end(self, args, state, control, **kwargs):
        snapshot, self.snapshot = self.snapshot, None
        if snapshot is None:
            return
        self.pending, self.trainer.shared.spotlight_capture = False, None
        step_dir = Path(args.output_dir) / "spotlight" / f"step-{state.global_step}"
        title = f"Token perception at step {state.global_step}"
        paths = write_spotlight(
            step_dir, snapshot.perceptions, snapshot.images, snapshot.perturbed_images, snapshot.prompt,
            title=title, subtitle=self._subtitle(args),
        )  # fmt: skip
        self._log(args, state, paths, snapshot)

    def _subtitle(self, args) -> str:
        model_id = getattr(self.trainer.model.config, "_name_or_path", "") or type(self.trainer.model).__name__
        return (
            f"{model_id} · perturbation {args.perturbation}, estimator {args.dependency_estimator}, "
            f"token_filter_ratio {args.token_filter_ratio}, one draw (the one training used), one prompt group"
        )

    @staticmethod
    def _log(args, state, paths: dict[str, Path], snapshot: SpotlightBatch) -> None:
        """Log the pictures, the page and the share of tokens above each threshold to the active trackers."""
        shares = shares_above(snapshot.token_dependencies)
        metrics = {f"spotlight/tokens_above_{threshold:g}": share for threshold, share in shares.items()}
        page = paths["perception.html"].read_text(encoding="utf-8")
        report_to = args.report_to or []
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log(
                    {
                        **metrics,
                        "spotlight/page": wandb.Html(page),
                        "spotlight/perception": wandb.Image(str(paths["perception.png"])),
                        "spotlight/distributions": wandb.Image(str(paths["distributions.png"])),
                        "spotlight/token_dependency": wandb.Histogram(snapshot.token_dependencies),
                        "train/global_step": state.global_step,
                    }
                )
        if "trackio" in report_to:
            import trackio

            if trackio.context_vars.current_run.get() is not None:
                trackio.log(
                    {
                        **metrics,
                        "spotlight/page": trackio.Html(page, data_is_not_path=True),
                        "spotlight/perception": trackio.Image(str(paths["perception.png"])),
                        "spotlight/distributions": trackio.Image(str(paths["distributions.png"])),
                        "spotlight/token_dependency": trackio.Histogram(snapshot.token_dependencies),
                    },
                    step=state.global_step,
                )
