"""Row operations on GRPO generation batches, the dicts that `GRPOTrainer._generate_and_score_completions` returns.

A generation batch holds one row per completion, but not every value is a `[rows, ...]` tensor: images are stored
as the processor returns them (Qwen-VL: all the images' patch rows stacked, with `image_grid_thw` and `num_images`
telling which rows belong to which completion). TRL's `split_pixel_values_by_grid` turns them into one entry per
completion, which makes every value indexable by row; `unsplit_pixel_values_by_grid` turns them back. The functions
here build on that, for VPPO's passes on a subset of completions and for dynamic sampling's merging of rounds.

Several processors pad their image tensors to the largest image of the batch they are called on (LLaVA-NeXT and
OneVision: the tile count; Idefics3 and SmolVLM: the tile count, with `pixel_attention_mask`; Mistral 3: height and
width), always at the end of each dimension. Two batches processed apart, or some rows processed again, are therefore
padded differently: [`pad_image_tensors`] pads them to a common shape the way the processor pads.
"""

from collections.abc import Sequence
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


# The image tensors processors pad to the batch's largest image, with the value they pad with (all pad at the end of
# each dimension after the first): zero pixels, a zero attention mask, -1 patch positions.
IMAGE_PADDING = {"pixel_values": 0, "pixel_attention_mask": 0, "image_position_ids": -1}


def pad_trailing(tensor: torch.Tensor, shape: Sequence[int], value: float) -> torch.Tensor:
    """`tensor` padded with `value` at the end of each dimension after the first, to `shape` (those dimensions)."""
    missing = [target - size for size, target in zip(tensor.shape[1:], shape, strict=True)]
    if any(count < 0 for count in missing):
        raise ValueError(f"Cannot pad a tensor of shape {tuple(tensor.shape)} to {tuple(shape)}: it is larger.")
    if not any(missing):
        return tensor
    padding = [amount for count in reversed(missing) for amount in (0, count)]
    return torch.nn.functional.pad(tensor, padding, value=value)


def pad_image_tensors(key: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """
    `tensors` (values of image field `key` from batches processed apart) padded to their common shape as the processor
    pads its batch, so that they join along the first dimension; unchanged for fields no processor pads.
    """
    if key not in IMAGE_PADDING or len({tuple(tensor.shape[1:]) for tensor in tensors}) <= 1:
        return list(tensors)
    if len({tensor.ndim for tensor in tensors}) > 1:
        raise ValueError(f"Cannot join {key} of shapes {[tuple(tensor.shape) for tensor in tensors]}.")
    shape = [max(sizes) for sizes in zip(*(tensor.shape[1:] for tensor in tensors), strict=True)]
    return [pad_trailing(tensor, shape, IMAGE_PADDING[key]) for tensor in tensors]


def join_image_tensors(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The image tensors of processor calls on consecutive samples, as one call on all of them would give them."""
    if len(parts) == 1:
        return dict(parts[0])
    joined = {}
    for key, value in parts[0].items():
        values = [part[key] for part in parts]
        if isinstance(value, torch.Tensor):
            joined[key] = torch.cat(pad_image_tensors(key, values))
        else:
            joined[key] = [item for items in values for item in items]
    return joined


def pad_like(processed: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
    """`processed` image tensors (some rows of `batch` processed again) padded to `batch`'s, where they are smaller."""
    padded = dict(processed)
    for key, value in processed.items():
        original = batch.get(key)
        if (
            key in IMAGE_PADDING
            and isinstance(original, torch.Tensor)
            and value.ndim == original.ndim
            and all(size <= target for size, target in zip(value.shape[1:], original.shape[1:], strict=True))
        ):
            padded[key] = pad_trailing(value, original.shape[1:], IMAGE_PADDING[key])
    return padded


def split_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """
    TRL's `split_pixel_values_by_grid`, except for the per-prompt layout (Idefics3, SmolVLM: `[prompts, tiles, ...]`
    with a `pixel_attention_mask`, no `spatial_shapes`), whose tensors are indexed by row as they are: TRL tells it
    from the one-entry-per-image layout by counting, and rows that hold one image on average (two-image prompts beside
    text-only ones) are taken for the other layout.
    """
    if "pixel_attention_mask" in batch and "spatial_shapes" not in batch:
        return batch
    return split_pixel_values_by_grid(batch)


def _take(value: Any, rows: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(rows, dtype=torch.long, device=value.device)]
    return [value[row] for row in rows]


def select_rows(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """
    The completions `rows` of a generation batch, as a generation batch.

    Batch-level scalars (`num_items_in_batch`) are left out: they describe the whole batch, not these rows.
    """
    split = split_rows(batch)
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
    """
    Stack generation batches (or row selections of them), re-padding prompts on the left, completions right, and image
    tensors as the processor pads them (rounds of dynamic sampling are padded to their own largest image).
    """
    pieces = [split_rows(piece) for piece in pieces]
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
        if isinstance(values[0], torch.Tensor):
            merged[key] = torch.cat(pad_image_tensors(key, values))
        else:
            items = [item for value in values for item in value]
            if items and all(isinstance(item, torch.Tensor) for item in items):  # one image tensor per row
                items = pad_image_tensors(key, items)
            merged[key] = items
    return unsplit_pixel_values_by_grid(merged)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The forward-pass inputs of a generation batch: prompt and completion joined, with the image tensors."""
    inputs = {
        "input_ids": torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
        "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
    }
    inputs.update({key: batch[key] for key in MODEL_INPUT_KEYS if batch.get(key) is not None})
    return inputs
