"""The model and data of recipes/cpu_demo.yaml, written to a folder (`vppo-trl tiny`)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .colour_task import COLOUR_QUESTION, COLOURS, make_shape_image
from .tiny_qwen import build_tiny_vlm

if TYPE_CHECKING:
    pass

# ---------------------------------------------------------------------------------------------------------------
# The model and data of recipes/cpu_demo.yaml
# ---------------------------------------------------------------------------------------------------------------

TINY_MODEL_DIR = "tiny-qwen2.5-vl"
TINY_DATASET_FILE = "tiny-colour.parquet"


def save_tiny_workspace(
    output_dir: str | os.PathLike, num_rows: int = 256, seed: int = 0, head_dim: int = 16
) -> dict[str, Path]:
    """Write what ``recipes/cpu_demo.yaml`` (and, with ``head_dim=32``, ``recipes/cpu_vllm.yaml``) trains on to
    ``output_dir``: a tiny random Qwen2.5-VL with its processor (``tiny-qwen2.5-vl/``) and ``num_rows`` rows of the
    colour task (``tiny-colour.parquet``: ``problem``, ``images``, ``answer``). Returns both paths."""
    from datasets import Dataset

    folder = Path(output_dir)
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, seed=seed, head_dim=head_dim)
    paths = {"model": folder / TINY_MODEL_DIR, "dataset": folder / TINY_DATASET_FILE}
    model.save_pretrained(paths["model"])
    processor.save_pretrained(paths["model"])
    rng = random.Random(seed)
    answers = [rng.choice(COLOURS) for _ in range(num_rows)]
    rows = {"problem": [COLOUR_QUESTION] * num_rows, "images": [[make_shape_image(c, rng)] for c in answers]}
    Dataset.from_dict({**rows, "answer": answers}).to_parquet(paths["dataset"])
    return paths


@dataclass
class TinyWorkspaceArguments:
    """Flags of `vppo-trl tiny`."""

    output_dir: str = field(default=".", metadata={"help": "Folder to write tiny-qwen2.5-vl/ and the parquet to."})
    num_rows: int = field(default=256, metadata={"help": "Rows of the colour dataset."})
    seed: int = field(default=0, metadata={"help": "Seed of the model's weights and of the images."})
    head_dim: int = field(
        default=16,
        metadata={
            "help": "Width of the attention heads; 32 for recipes/cpu_vllm.yaml (vLLM's CPU attention needs it)."
        },
    )


def tiny_main(argv: list[str] | None = None, prog: str = "vppo-trl tiny") -> dict[str, Path]:
    """`vppo-trl tiny`: build the model and data of recipes/cpu_demo.yaml locally (nothing is downloaded)."""
    from ..command_line import CommandLineParser

    parser = CommandLineParser(
        TinyWorkspaceArguments,
        prog=prog,
        description="Write the tiny Qwen2.5-VL and colour dataset that recipes/cpu_demo.yaml trains on.",
    )
    (args,) = parser.parse_dataclasses(argv)
    if args.num_rows < 1:
        parser.error(f"--num-rows must be >= 1, got {args.num_rows}")
    paths = save_tiny_workspace(args.output_dir, args.num_rows, args.seed, args.head_dim)
    print(f"Wrote {paths['model']}/ and {paths['dataset']} ({args.num_rows} rows).")
    return paths


# ---------------------------------------------------------------------------------------------------------------
