"""The colour task: a white image with one coloured shape, the question, the dataset and the reward."""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from datasets import Dataset

# ---------------------------------------------------------------------------------------------------------------
# Colour task
# ---------------------------------------------------------------------------------------------------------------

COLOURS = ("red", "green", "blue", "yellow")
COLOUR_QUESTION = "What colour is the shape? Answer with one word."

_RGB = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20)}


def make_shape_image(colour: str, rng: random.Random, size: int = 56, shape: str | None = None) -> Image.Image:
    """White ``size``-px RGB image with one rectangle or ellipse of a jittered ``colour``, 50-80% of the side.

    Shapes this large are what a ~0.2M-parameter Qwen2.5-VL was seen to learn on CPU; smaller ones stayed at chance.
    """
    if colour not in _RGB:
        raise ValueError(f"Unknown colour {colour!r}; expected one of {COLOURS}")
    shape = shape or rng.choice(("rectangle", "ellipse"))
    if shape not in ("rectangle", "ellipse"):
        raise ValueError(f"Unknown shape {shape!r}; expected 'rectangle' or 'ellipse'")
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in _RGB[colour])
    width = rng.randint(math.ceil(0.5 * size), int(0.8 * size))
    height = rng.randint(math.ceil(0.5 * size), int(0.8 * size))
    left, top = rng.randint(0, size - width), rng.randint(0, size - height)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (left, top, left + width - 1, top + height - 1)
    if shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:
        draw.ellipse(box, fill=fill)
    return image


def make_colour_dataset(n: int, seed: int = 0, size: int = 56) -> Dataset:
    """``n`` rows of the colour task in TRL's conversational multimodal layout (``prompt``, ``images``, ``answer``).

    The prompt text never names the colour, so the reward can only be earned by looking at the image.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    rows: dict[str, list] = {"prompt": [], "images": [], "answer": []}
    for _ in range(n):
        colour = rng.choice(COLOURS)
        rows["prompt"].append(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": COLOUR_QUESTION}]}]
        )
        rows["images"].append([make_shape_image(colour, rng, size=size)])
        rows["answer"].append(colour)
    return Dataset.from_dict(rows)


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, list):  # structured content blocks
            content = "".join(block.get("text") or "" for block in content if isinstance(block, dict))
        parts.append(content or "")
    return "".join(parts)


def colour_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the completion, stripped and lower-cased, starts with the right colour word."""
    rewards = []
    for completion, colour in zip(completions, answer, strict=True):
        text = _completion_text(completion).strip().lower()
        word = text.split(maxsplit=1)[0].strip(".,;:!?\"'") if text else ""
        rewards.append(1.0 if word == colour.lower() else 0.0)
    return rewards
