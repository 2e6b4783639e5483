"""Peak host memory of the `original_image` pass: one processor call on the whole batch, or a micro-batch at a time.

With `perturbation_space="original_image"` (the default) VPPO perturbs each measured completion's images as the data
delivers them and runs the model's processor on them again. The 7B recipe (recipes/qwen2_5_vl_7b_paper.yaml) measures
up to 384 completions a process per generation batch (3,072 over 8 processes), 8 of a prompt, each image scaled to at
most 1,003,520 pixels when loaded. This script builds such a batch (synthetic images at the pixel limit, four aspect
ratios, each prompt's image decoded apart for each of its completions, as a dataset delivers them), runs the pass with
the real Qwen2.5-VL processor classes (`Qwen2_5_VLProcessor`, `Qwen2VLImageProcessor` with the checkpoint's settings)
on the CPU, and reads the process's peak resident memory (`resource.getrusage`), in a fresh subprocess per variant:

- `before`: the code of commit 0bf704c (`--before`), exported with `git archive`: one processor call on every
  measured completion, each completion's images converted to tensors (a group's copies too);
- `after`: this checkout, as VPPOTrainer calls it (`samples_per_call=per_device_train_batch_size`, each distinct image
  converted once, each call's pixels written into the result).

Both run `perturb_batch_images`, the function VPPOTrainer's perturbed pass calls, on the same batch.

Usage::

    python benchmarks/processor_memory.py --prompts 8 --json processor_memory.json

The defaults are the 7B recipe's shapes (48 prompts x 8 completions a process); the output alone (float32 patch rows,
about 24 MB an image at the limit) then takes 9.2 GB. See benchmarks/RESULTS.md for figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

VARIANTS = ("before", "after")
# The last commit before the original_image pass was chunked.
BEFORE = "0bf704c"
# Width x height of the loaded images: the recipe's upper pixel limit (1,003,520) at four aspect ratios.
SIZES = ((1120, 896), (896, 1120), (1400, 700), (700, 1400))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48, help="prompts measured per process (the recipe: 48)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (the recipe's G: 8)")
    parser.add_argument("--per-device-train-batch-size", type=int, default=4, help="the recipe's: 4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--before", default=BEFORE, help="the commit whose code the `before` variant runs")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one variant, in this process
    return parser.parse_args(argv)


def rss_bytes() -> int:
    """The process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (`ru_maxrss` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_processor():
    """Qwen2.5-VL's processor classes with the checkpoint's image settings (14-px patches, 2x2 merge, CLIP norm)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from vppo_trl.testing import build_tokenizer

    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=build_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),
    )


def batch_images(prompts: int, generations: int) -> list[Image.Image]:
    """Each prompt's image, `generations` times, each copy its own object (a dataset decodes it per completion)."""
    rng = np.random.default_rng(0)
    images = []
    for prompt in range(prompts):
        width, height = SIZES[prompt % len(SIZES)]
        image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        images.extend(image.copy() for _ in range(generations))
    return images


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Peak memory and time of one `original_image` pass of `variant`'s code, in this (fresh) process."""
    from vppo_trl.method.passes import IMAGES_KEY, perturb_batch_images
    from vppo_trl.method.perturbations import PixelLayout

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    processor = build_processor()
    images = batch_images(args.prompts, args.generations)
    # The batch's layout: each prompt's grid, from its image processed once; its pixel_values, which the trainer's
    # batch holds anyway, a stand-in of the right shape that takes no memory.
    grids = [
        processor.image_processor(images=[images[prompt * args.generations]], return_tensors="pt")["image_grid_thw"]
        for prompt in range(args.prompts)
    ]
    grid = torch.cat(grids).repeat_interleave(args.generations, dim=0)
    row = processor.image_processor.temporal_patch_size * processor.image_processor.patch_size**2 * 3
    batch = {
        "pixel_values": torch.zeros(1, row).expand(int(grid.prod(-1).sum()), row),
        "image_grid_thw": grid,
        IMAGES_KEY: [[image] for image in images],
    }
    settings = SimpleNamespace(perturbation="patch_blackening", perturbation_patch_size=14, perturbation_prob=0.5,
                               perturbation_noise_std=189.0, perturbation_blur_radius=6.0)  # fmt: skip
    layout = PixelLayout.from_image_processor(processor.image_processor)
    chunking = {"samples_per_call": args.per_device_train_batch_size} if variant == "after" else {}
    gc.collect()
    setup_rss = rss_bytes()
    start = time.perf_counter()
    pixel_values = perturb_batch_images(batch, settings, layout, processor, list(range(len(images))), **chunking)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    output_bytes = pixel_values.numel() * pixel_values.element_size()
    return {
        "variant": variant,
        "images": len(images),
        "setup_rss_gb": setup_rss / 1e9,
        "peak_rss_gb": peak / 1e9,
        "output_gb": output_bytes / 1e9,
        "above_setup_gb": (peak - setup_rss) / 1e9,
        "above_setup_and_output_gb": (peak - setup_rss - output_bytes) / 1e9,
        "seconds": seconds,
    }


def code_before(commit: str) -> str:
    """A copy of `vppo_trl` at `commit` (the code before chunking), in a temporary folder, for the `before` child."""
    folder = tempfile.mkdtemp(prefix="vppo-before-")
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", commit, "vppo_trl"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return []
    results = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"Unknown variant {variant!r}; choose from {VARIANTS}.")
        command = [sys.executable, __file__, "--child", variant, *(argv if argv is not None else sys.argv[1:])]
        environment = dict(os.environ)
        if variant == "before":
            environment["PYTHONPATH"] = os.pathsep.join(
                filter(None, [code_before(args.before), os.environ.get("PYTHONPATH")])
            )
        completed = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"{variant:>6}: {result['images']} images, peak RSS {result['peak_rss_gb']:.2f} GB (setup "
            f"{result['setup_rss_gb']:.2f} GB, output {result['output_gb']:.2f} GB, rest "
            f"{result['above_setup_and_output_gb']:.2f} GB), {result['seconds']:.1f} s",
            flush=True,
        )
    if args.json:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()}
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "args": vars(args), "results": results}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
