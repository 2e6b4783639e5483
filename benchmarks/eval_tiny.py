"""`vppo-trl eval` end to end on CPU: two tiny models, two local benchmarks, a results table and a comparison plot.

Both models start from the same random tiny Qwen2.5-VL and get the same number of supervised steps on the
evaluation prompt (problem + the paper's instruction) with a `\\boxed{}` answer. One is taught the format only (the
answer is drawn at random, so it cannot beat chance); the other is taught the right answer, which can only be read
off the image. Then the script runs the commands a user runs, as subprocesses:

    vppo-trl eval --model <model> --data colour.jsonl --data colour_choice.jsonl --k 8 --output-dir <run>
    vppo-trl eval compare <supervised run>/results.json <format-only run>/results.json <reseeded run>/results.json

Usage: python benchmarks/eval_tiny.py [--output-dir eval_tiny] [--steps 300] [--problems 64]
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from vppo_trl.data import build_prompt
from vppo_trl.testing import COLOUR_QUESTION, COLOURS, build_tiny_vlm, make_shape_image

CHOICE_QUESTION = "Which colour is the shape? A. red B. green C. blue D. yellow"
LETTERS = "ABCD"


def write_benchmark(folder: Path, name: str, count: int, seed: int) -> Path:
    """A benchmark in the training data layout: `<name>.jsonl` (problem, answer, images) and its images."""
    rng = random.Random(seed)
    (folder / name).mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.jsonl").open("w") as handle:
        for index in range(count):
            colour = rng.choice(COLOURS)
            make_shape_image(colour, rng).save(folder / name / f"{index}.png")
            choice = name.endswith("choice")
            answer = LETTERS[COLOURS.index(colour)] if choice else colour
            row = {"id": index, "problem": CHOICE_QUESTION if choice else COLOUR_QUESTION, "answer": answer,
                   "images": [f"{name}/{index}.png"]}  # fmt: skip
            handle.write(json.dumps(row) + "\n")
    return folder / f"{name}.jsonl"


def train(steps: int, learn_answer: bool, seed: int) -> tuple:
    """Supervised steps on `\\boxed{answer}` after the evaluation prompt; the answer is right or random."""
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, seed=seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokenizer = processor.tokenizer
    model.train()
    for _ in range(steps):
        texts, images, targets = [], [], []
        for _ in range(16):
            colour, choice = rng.choice(COLOURS), rng.random() < 0.5
            shown = colour if learn_answer else rng.choice(COLOURS)
            answer = LETTERS[COLOURS.index(shown)] if choice else shown
            prompt = build_prompt(CHOICE_QUESTION if choice else COLOUR_QUESTION, num_images=1)
            texts.append(processor.apply_chat_template(prompt, add_generation_prompt=True))
            targets.append(f"\\boxed{{{answer}}}" + tokenizer.eos_token)
            images.append([make_shape_image(colour, rng)])
        inputs = processor(text=[t + a for t, a in zip(texts, targets, strict=True)], images=images,
                           return_tensors="pt", padding=True, padding_side="left")  # fmt: skip
        labels = torch.full_like(inputs["input_ids"], -100)
        for row, target in enumerate(targets):
            count = len(tokenizer(target, add_special_tokens=False)["input_ids"])
            labels[row, -count:] = inputs["input_ids"][row, -count:]
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, processor, loss.item()


def run(command: list[str]) -> float:
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="eval_tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.output_dir)
    shutil.rmtree(root, ignore_errors=True)
    benchmarks = [write_benchmark(root / "data", name, args.problems, seed=100 + index)
                  for index, name in enumerate(("colour", "colour_choice"))]  # fmt: skip
    for label, learn in (("format-only", False), ("supervised", True)):
        start = time.perf_counter()
        model, processor, loss = train(args.steps, learn, args.seed)
        model.save_pretrained(root / label)
        processor.save_pretrained(root / label)
        print(f"{label}: {args.steps} steps in {time.perf_counter() - start:.0f} s, last loss {loss:.3f}", flush=True)
    # The supervised model is evaluated twice, with two sampling seeds: a difference that is noise only.
    runs = {"supervised": ("supervised", args.seed), "format-only": ("format-only", args.seed),
            "supervised-reseeded": ("supervised", args.seed + 1)}  # fmt: skip
    for name, (model_name, seed) in runs.items():
        command = ["vppo-trl", "eval", "--model", str(root / model_name), "--k", "8", "--max-new-tokens", "16",
                   "--batch-size", "16", "--seed", str(seed), "--output-dir", str(root / f"run-{name}")]  # fmt: skip
        for benchmark in benchmarks:
            command += ["--data", str(benchmark)]
        seconds = run(command)
        print(f"{name}: evaluation of {2 * args.problems} problems x 8 samples took {seconds:.0f} s", flush=True)
    results = [str(root / f"run-{name}" / "results.json") for name in runs]
    run(["vppo-trl", "eval", "compare", *results, "--labels", ",".join(runs), "--output-dir", str(root / "compare")])


if __name__ == "__main__":
    sys.exit(main())
