"""Row operations on GRPO generation batches: selection, concatenation, forward inputs, on real Qwen-VL batches."""

import random

import pytest
import torch
from datasets import Dataset
from test_trainer import COLOUR_QUESTION, generation_batch, length_reward, vppo_args

from vppo_trl import VPPOTrainer
from vppo_trl.method.batch_rows import concatenate_rows, model_inputs, select_rows
from vppo_trl.method.perturbations import process_images
from vppo_trl.testing import (
    COLOURS,
    build_model,
    build_processor,
    build_tokenizer,
    cached_family,
    family_available,
    make_shape_image,
)


def mixed_batch(tmp_path) -> tuple[VPPOTrainer, dict]:
    """Prompts with one image, two images of two sizes, and none: every layout a row selection must slice."""
    rng = random.Random(0)

    def prompt(count):
        text = {"type": "text", "text": COLOUR_QUESTION}
        return [{"role": "user", "content": [{"type": "image"}] * count + [text]}]

    two = [make_shape_image("blue", rng, size=112), make_shape_image("green", rng, size=56)]
    dataset = Dataset.from_list(
        [
            {"prompt": prompt(1), "images": [make_shape_image("red", rng)]},
            {"prompt": prompt(2), "images": two},
            {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}], "images": []},
        ]
    )
    tokenizer = build_tokenizer(COLOURS)
    trainer = VPPOTrainer(
        model=build_model("qwen2_5_vl", tokenizer),
        reward_funcs=length_reward,
        args=vppo_args(tmp_path, per_device_train_batch_size=6, num_generations=2, shuffle_dataset=False),
        train_dataset=dataset,
        processing_class=build_processor("qwen2_5_vl", tokenizer, image_size=112),
    )
    return trainer, generation_batch(trainer, dataset, prompts=3)


def test_select_rows_slices_every_layout_and_concatenation_puts_it_back(tmp_path):
    trainer, batch = mixed_batch(tmp_path)
    assert batch["num_images"] == [1, 1, 2, 2, 0, 0]
    picked = select_rows(batch, [5, 2])
    assert picked["num_images"] == [0, 2]
    assert picked["image_grid_thw"].tolist() == batch["image_grid_thw"][[2, 3]].tolist()
    rows_per_image = batch["image_grid_thw"].prod(-1).tolist()
    start = rows_per_image[0] + rows_per_image[1]  # the pixel rows of completion 2 follow those of 0 and 1
    torch.testing.assert_close(picked["pixel_values"], batch["pixel_values"][start : start + sum(rows_per_image[2:4])])
    assert "num_items_in_batch" not in picked
    for key in ("prompt_ids", "completion_ids", "completion_mask", "advantages", "mm_token_type_ids"):
        torch.testing.assert_close(picked[key], batch[key][[5, 2]], msg=key)

    merged = concatenate_rows([select_rows(batch, [0, 1, 2]), select_rows(batch, [3, 4, 5])], pad_token_id=0)
    for key, value in batch.items():
        if key != "num_items_in_batch":
            assert (value.tolist() if isinstance(value, torch.Tensor) else value) == (
                merged[key].tolist() if isinstance(merged[key], torch.Tensor) else merged[key]
            ), key


def test_forward_on_selected_rows_gives_those_rows_log_probs(tmp_path):
    trainer, batch = mixed_batch(tmp_path)
    width = batch["completion_ids"].size(1)
    with torch.no_grad():
        everything = trainer._sampled_token_logps(model_inputs(batch), width)
        some = trainer._sampled_token_logps(model_inputs(select_rows(batch, [4, 1, 3])), width)
    torch.testing.assert_close(some, everything[[4, 1, 3]], rtol=1e-5, atol=1e-5)


def test_concatenate_rows_repads_prompts_left_and_completions_right():
    pieces = [
        {
            "prompt_ids": torch.tensor([[5, 6]]),
            "prompt_mask": torch.tensor([[1, 1]]),
            "completion_ids": torch.tensor([[7]]),
            "completion_mask": torch.tensor([[1]]),
            "mm_token_type_ids": torch.tensor([[1, 0, 0]]),
            "advantages": torch.tensor([1.0]),
            "num_images": [1],
        },
        {
            "prompt_ids": torch.tensor([[8]]),
            "prompt_mask": torch.tensor([[1]]),
            "completion_ids": torch.tensor([[9, 10]]),
            "completion_mask": torch.tensor([[1, 1]]),
            "mm_token_type_ids": torch.tensor([[1, 0, 0]]),
            "advantages": torch.tensor([-1.0]),
            "num_images": [0],
        },
    ]
    merged = concatenate_rows(pieces, pad_token_id=0)
    assert merged["prompt_ids"].tolist() == [[5, 6], [0, 8]]
    assert merged["prompt_mask"].tolist() == [[1, 1], [0, 1]]
    assert merged["completion_ids"].tolist() == [[7, 0], [9, 10]]
    assert merged["completion_mask"].tolist() == [[1, 0], [1, 1]]
    assert merged["mm_token_type_ids"].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert merged["advantages"].tolist() == [1.0, -1.0]
    assert merged["num_images"] == [1, 0]


def processed_rows(processor, images_per_row: list[list]) -> dict:
    """A generation batch's rows as far as images go: token ids of one position, the processor's image tensors."""
    rows = len(images_per_row)
    ids = torch.ones(rows, 1, dtype=torch.long)
    tokens = {"prompt_ids": ids, "prompt_mask": ids, "completion_ids": ids, "completion_mask": ids}
    counts = [len(images) for images in images_per_row]
    return {**tokens, "num_images": counts, **process_images(processor, images_per_row)}


# The processors that pad to the largest image (tile count, or height and width) of the call.
PADDING_FAMILIES = ["llava_next", "llava_onevision", "idefics3", "smolvlm", "mistral3"]


@pytest.mark.parametrize("family", PADDING_FAMILIES)
def test_rounds_padded_apart_join_as_one_processor_call_pads_them(family):
    """Two rounds of dynamic sampling, one with a square image (the most tiles, the largest) and one with wide strips
    only, join into what the processor gives for all their rows at once: each round's padding redone to the common
    shape."""
    if family_available(family):
        pytest.skip(family_available(family))
    _, processor = cached_family(family)
    rng = random.Random(0)
    square = make_shape_image("red", rng, size=56)
    tall = make_shape_image("green", rng).resize((21, 56))
    wide = make_shape_image("blue", rng).resize((56, 21))
    rows = [[square], [tall], [wide], [wide]]
    merged = concatenate_rows([processed_rows(processor, rows[:2]), processed_rows(processor, rows[2:])], 0)
    together = processed_rows(processor, rows)
    for key, value in together.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(merged[key], value, rtol=0, atol=0, msg=key)


def test_per_prompt_tiles_are_selected_by_row_when_the_rows_hold_one_image_on_average():
    """Idefics3 keeps one entry of tiles per prompt: a two-image prompt beside a text-only one is two rows of two
    images, which TRL's split takes for one entry per image."""
    if family_available("idefics3"):
        pytest.skip(family_available("idefics3"))
    _, processor = cached_family("idefics3")
    rng = random.Random(0)
    batch = processed_rows(processor, [[make_shape_image("red", rng), make_shape_image("blue", rng, size=28)], []])
    picked = select_rows(batch, [1, 0])
    for key in ("pixel_values", "pixel_attention_mask"):
        torch.testing.assert_close(picked[key], batch[key][[1, 0]], rtol=0, atol=0, msg=key)
    assert picked["num_images"] == [0, 2]
