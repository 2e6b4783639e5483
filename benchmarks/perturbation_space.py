"""What perturbing the original image costs against blackening patch rows of the processed pixels.

VPPOTrainer perturbs every image of a generation batch once per batch. With `perturbation_space="original_image"`
(the default, the official code's operation) each completion's image is converted to a tensor, moved to the device,
perturbed there and processed again by the fast image processor; with `"pixel_values"` the processed pixels are
perturbed in place (for patch blackening, a row mask). This script times both on the same batch with Qwen2.5-VL's
real image processor (14-px patches, 200,704..1,003,520 pixels after the paper's limits), next to the processor's
own pass over the original images, which TRL runs on every generation batch anyway.

Usage::

    python benchmarks/perturbation_space.py --device cpu --json perturbation_space.json
    python benchmarks/perturbation_space.py --device cuda --json perturbation_space_gpu.json

See benchmarks/RESULTS.md for figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor

from vppo_trl.data import PAPER_MAX_PIXELS, PAPER_MIN_PIXELS, fit_image_pixels
from vppo_trl.method.perturbations import PixelLayout, perturb_original_images, perturb_pixel_values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per generation batch (one image each)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument(
        "--sizes", default="500x700,1000x1400", help="comma-separated HxW of the loaded images, before the limits"
    )
    parser.add_argument("--kind", default="patch_blackening")
    parser.add_argument("--reps", type=int, default=5, help="timed repeats per route (median reported)")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def timed(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median wall time of `fn` over `reps` runs after one warm-up, synchronised on GPU."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_size(args: argparse.Namespace, processor, height: int, width: int, seed: int) -> dict:
    """Both routes on one generation batch of `args.prompts` random images of `height` x `width` (before limits)."""
    rng = np.random.default_rng(seed)
    layout = PixelLayout.from_image_processor(processor)
    loaded = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(args.prompts)]
    prompts = [fit_image_pixels(image, PAPER_MIN_PIXELS, PAPER_MAX_PIXELS) for image in loaded]
    # One image per completion, G completions per prompt, as GRPOTrainer's generation batch holds them.
    images = [image for image in prompts for _ in range(args.generations)]
    original = processor(images=images, return_tensors="pt", device=args.device)
    pixel_values, grid = original["pixel_values"], original["image_grid_thw"]

    def generator() -> torch.Generator:
        return torch.Generator(device=args.device).manual_seed(0)

    row = {
        "loaded_size": [height, width],
        "image_size": [prompts[0].height, prompts[0].width],
        "grid_thw": grid[0].tolist(),
        "images": len(images),
        "processor_on_originals_s": timed(
            lambda: processor(images=images, return_tensors="pt", device=args.device), args.device, args.reps
        ),
        "original_image_s": timed(
            lambda: perturb_original_images(images, processor, args.kind, generator(), args.device),
            args.device,
            args.reps,
        ),
        "pixel_values_s": timed(
            lambda: perturb_pixel_values(pixel_values, layout, args.kind, generator(), image_grid_thw=grid),
            args.device,
            args.reps,
        ),
    }
    row["ratio"] = row["original_image_s"] / row["pixel_values_s"]
    return row


def measure(args: argparse.Namespace) -> dict:
    processor = Qwen2VLImageProcessor()
    sizes = [tuple(int(side) for side in size.split("x")) for size in args.sizes.split(",")]
    results = [measure_size(args, processor, height, width, seed) for seed, (height, width) in enumerate(sizes)]
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "kind": args.kind,
        "prompts": args.prompts,
        "generations": args.generations,
        "reps": args.reps,
        "torch": torch.__version__,
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary = measure(args)
    for row in summary["results"]:
        print(
            f"{row['loaded_size'][0]}x{row['loaded_size'][1]} -> {row['image_size'][0]}x{row['image_size'][1]} "
            f"({row['images']} images): processor on originals {row['processor_on_originals_s'] * 1e3:.1f} ms, "
            f"original_image {row['original_image_s'] * 1e3:.1f} ms, "
            f"pixel_values {row['pixel_values_s'] * 1e3:.1f} ms (x{row['ratio']:.1f})"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=2)
    return summary


if __name__ == "__main__":
    main()
