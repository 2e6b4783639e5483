"""Row operations on GRPO generation batches, the dicts that `GRPOTrainer._generate_and_score_completions` returns.

A generation batch holds one row per completion, but not every value is a `[rows, ...]` tensor: images are stored
as the processor returns them (Qwen-VL: all the images' patch rows stacked, with `image_grid_thw` and `num_images`
telling which rows belong to which completion). TRL's `split_pixel_values_by_grid` turns them into one entry per
completion, which makes every value indexable by row; `unsplit_pixel_values_by_grid` turns them back. The functions
here build on that, for VPPO's passes on a subset of completions and for dynamic sampling's merging of rounds.
"""

from typing import Any

import torch
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

# Tensors aligned with the prompt (left-padded) or the completion (right-padded), with the value TRL pads them with
# (None: the tokenizer's pad token).
PROMPT_KEYS = {"prompt_ids": None, "prompt_mask": 0}
COMPLETION_KEYS = {
    "completion_ids": None,
    "completion_mask": 0,
    "old_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "importance_sampling_ratio": 1.0,
    "tool_mask": 1,
    "vppo_original_entropies": 0.0,  # passes.ENTROPIES_KEY
}
# Token type ids span prompt and completion, both padded with 0.
PROMPT_COMPLETION_KEYS = ("token_type_ids", "mm_token_type_ids")
# Everything `_get_per_token_logps_and_entropies` takes besides the token ids and attention mask.
MODEL_INPUT_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _take(value: Any, rows: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(rows, dtype=torch.long, device=value.device)]
    return [value[row] for row in rows]


def select_rows(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """
    The completions `rows` of a generation batch, as a generation batch.

    Batch-level scalars (`num_items_in_batch`) are left out: they describe the whole batch, not these rows.
    """
    split = split_pixel_values_by_grid(batch)
    selected = {
        key: _take(value, rows)
        for key, value in split.items()
        if value is not None and not (isinstance(value, torch.Tensor) and value.ndim == 0)
    }
    return unsplit_pixel_values_by_grid(selected)


def _pad_width(tensor: torch.Tensor, width: int, value: float, side: str) -> torch.Tensor:
    missing = width - tensor.size(1)
    if missing == 0:
        return tensor
    filler = tensor.new_full((tensor.size(0), missing, *tensor.shape[2:]), value)
    return torch.cat([filler, tensor] if side == "left" else [tensor, filler], dim=1)


def concatenate_rows(pieces: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack generation batches (or row selections of them), re-padding prompts on the left, completions right."""
    pieces = [split_pixel_values_by_grid(piece) for piece in pieces]
    keys = pieces[0].keys()
    if any(piece.keys() != keys for piece in pieces):
        raise ValueError(
            f"Cannot merge generation batches with different fields: {sorted({key for p in pieces for key in p})}."
        )
    prompt_width = max(piece["prompt_ids"].size(1) for piece in pieces)
    completion_width = max(piece["completion_ids"].size(1) for piece in pieces)
    merged = {}
    for key in keys:
        values = [piece[key] for piece in pieces]
        if key in PROMPT_KEYS:
            value = pad_token_id if PROMPT_KEYS[key] is None else PROMPT_KEYS[key]
            values = [_pad_width(v, prompt_width, value, "left") for v in values]
        elif key in COMPLETION_KEYS:
            value = pad_token_id if COMPLETION_KEYS[key] is None else COMPLETION_KEYS[key]
            width = max(v.size(1) for v in values)  # sequence-level importance ratios are [B, 1]
            values = [_pad_width(v, width, value, "right") for v in values]
        elif key in PROMPT_COMPLETION_KEYS:
            values = [
                torch.cat(
                    [
                        _pad_width(v[:, : piece["prompt_ids"].size(1)], prompt_width, 0, "left"),
                        _pad_width(v[:, piece["prompt_ids"].size(1) :], completion_width, 0, "right"),
                    ],
                    dim=1,
                )
                for v, piece in zip(values, pieces, strict=True)
            ]
        merged[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [x for v in values for x in v]
    return unsplit_pixel_values_by_grid(merged)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The forward-pass inputs of a generation batch: prompt and completion joined, with the image tensors."""
    inputs = {
        "input_ids": torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
        "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
    }
    inputs.update({key: batch[key] for key in MODEL_INPUT_KEYS if batch.get(key) is not None})
    return inputs
