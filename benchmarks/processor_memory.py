"""Peak host memory of the `original_image` pass: one processor call on the whole batch, or a micro-batch at a time.

With `perturbation_space="original_image"` (the default) VPPO perturbs each measured completion's images as the data
delivers them and runs the model's processor on them again. The 7B recipe (recipes/qwen2_5_vl_7b_paper.yaml) measures
up to 384 completions a process per generation batch (3,072 over 8 processes), 8 of a prompt, each image scaled to at
most 1,003,520 pixels when loaded. This script builds such a batch (synthetic images at the pixel limit, four aspect
ratios, each prompt's image decoded apart for each of its completions, as a dataset delivers them), runs the pass with
the real Qwen2.5-VL processor classes (`Qwen2_5_VLProcessor`, `Qwen2VLImageProcessor` with the checkpoint's settings)
on the CPU, and reads the process's peak resident memory (`resource.getrusage`), in a fresh subprocess per variant:

- `before`: the code before chunking (one processor call on every measured completion, each completion's images
  converted to tensors, also a group's copies), reproduced here by converting every image and passing no
  `samples_per_call`;
- `after`: the library as VPPOTrainer calls it (`samples_per_call=per_device_train_batch_size`, each distinct image
  converted once).

Usage::

    python benchmarks/processor_memory.py --prompts 8 --json processor_memory.json

The defaults are the 7B recipe's shapes (48 prompts x 8 completions a process); the output alone (float32 patch rows,
about 24 MB an image at the limit) then takes 9.2 GB. See benchmarks/RESULTS.md for figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import torch
from PIL import Image

VARIANTS = ("before", "after")
# Width x height of the loaded images: the recipe's upper pixel limit (1,003,520) at four aspect ratios.
SIZES = ((1120, 896), (896, 1120), (1400, 700), (700, 1400))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48, help="prompts measured per process (the recipe: 48)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (the recipe's G: 8)")
    parser.add_argument("--per-device-train-batch-size", type=int, default=4, help="the recipe's: 4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
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
    """Peak memory and time of one pass of `variant`, in this (fresh) process."""
    from vppo_trl.method import perturbations

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    processor = build_processor()
    images = batch_images(args.prompts, args.generations)
    generators = [torch.Generator().manual_seed(index) for index in range(len(images))]
    samples = [1] * len(images)
    gc.collect()
    setup_rss, setup_peak = rss_bytes(), peak_rss_bytes()
    if variant == "before":
        every_image = mock.patch.object(
            perturbations,
            "distinct_image_tensors",
            lambda images, image_processor, samples: [perturbations.image_tensor(i, image_processor) for i in images],
        )
        samples_per_call = None
    else:
        every_image, samples_per_call = contextlib.nullcontext(), args.per_device_train_batch_size
    start = time.perf_counter()
    with every_image:
        output = perturbations.perturb_original_images(
            images,
            processor,
            "patch_blackening",
            generators,
            "cpu",
            samples=samples,
            samples_per_call=samples_per_call,
        )
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    output_bytes = sum(value.numel() * value.element_size() for value in output.values())
    return {
        "variant": variant,
        "images": len(images),
        "setup_rss_gb": setup_rss / 1e9,
        "setup_peak_gb": setup_peak / 1e9,
        "peak_rss_gb": peak / 1e9,
        "output_gb": output_bytes / 1e9,
        "above_setup_gb": (peak - setup_rss) / 1e9,
        "above_setup_and_output_gb": (peak - setup_rss - output_bytes) / 1e9,
        "seconds": seconds,
        "pixel_values_shape": list(output["pixel_values"].shape),
    }


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
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
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
