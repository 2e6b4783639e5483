"""CPU demo: VPPO teaches a tiny vision-language model to read the colour of a shape, in a few minutes, offline.

Run it with `python -m vppo_trl.demo` (`--help` for the flags). Everything is built locally, nothing is downloaded:

1. Model: a tiny, randomly initialised Qwen2.5-VL (~0.2M parameters) with a local tokenizer in which every colour
   word is one token, and the real Qwen2.5-VL processor (`vppo_trl.testing.build_tiny_vlm`).
2. Task: a white 56-px image with one red, green, blue or yellow rectangle or ellipse; the prompt asks "What colour
   is the shape?" and never names it, so the reward (1 for the right colour word) can only be earned by looking at
   the image. Every prompt of the run has a fresh image (`vppo_trl.testing.make_colour_dataset`).
3. Vision tokens masked: the policy must never emit `<|image_pad|>` and the other vision special tokens. TRL
   suppresses `<|image_pad|>` while sampling, but scores log-probs over the full vocabulary, and a small random
   policy learns to park probability there (greedy decoding then emits nothing and learning can stall). The demo
   gives the output layer a frozen bias of -1e4 on those ids, so sampling, training log-probs, VPPO's perturbed
   pass and evaluation all see the same masked distribution, with no change to the trainer.
4. Warm start (format only): a random model never says a colour, so every reward is 0 and GRPO/VPPO have no signal.
   A few supervised steps on "<colour><|im_end|>", with the colour drawn independently of the image, teach the
   answer format without teaching which colour is right: the reward stays at chance (~0.25) afterwards.
5. VPPO: `VPPOTrainer` with the paper's VPPO defaults (patch blackening, k3 dependency, 40% of tokens kept, dynamic
   advantage shaping) and GRPO settings that a model this small learns with: 8 prompts x 8 completions per step,
   lr 1e-3 (constant), temperature 1, no KL, completions of at most 4 tokens.

It prints a table of steps, rewards and VPPO metrics while training, then the greedy accuracy on fresh held-out
images before and after VPPO, and a verdict comparing the mean reward of the first and last steps. It writes to
`--output-dir` the per-step log (`log.csv`, from `trainer.state.log_history`), a summary (`summary.json`), a plot
of reward and visual-dependency metrics against the step (`vppo_demo.png`), the trained model (`trainer/`) and the
token perception of that model on a held-out image (`spotlight/perception.html` and `.png`). `--compare grpo` also
trains GRPO from the same warm start with the same seed and draws both reward curves (`vppo_vs_grpo.png`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .testing import (
    COLOUR_QUESTION,
    COLOURS,
    build_model,
    build_processor,
    build_tokenizer,
    colour_reward,
    make_colour_dataset,
    suppressed_token_ids,
)

# Completions sampled for the spotlight of the trained model, as many as a training group.
SPOTLIGHT_COMPLETIONS = 8
SPOTLIGHT_DRAWS = 4

CHANCE_REWARD = 1 / len(COLOURS)
# Mean reward over the last steps above which the demo reports that the policy learned to read the colour.
LEARNED_THRESHOLD = 0.8
# Bias added to the logits of tokens the policy must never emit: exp(-1e4) is exactly 0 in float32, and unlike -inf
# it keeps entropies and KLs finite (0 * -1e4 = 0).
MASKED_LOGIT_BIAS = -1e4
# BPE entries of the tokenizer (716 tokens with Qwen's added ones, vs 1,486 by default): on CPU, TRL's fused log-prob
# head projects every position of a sequence onto the vocabulary, and that was most of a step's time.
VOCAB_SIZE = 600
PROMPTS_PER_STEP = 8
NUM_GENERATIONS = 8
# The vision tower trains at this multiple of the learning rate (see the module docstring).
VISION_LR_MULTIPLIER = 5.0
WARM_START_BATCH = 16
WARM_START_LR = 3e-3
EVAL_IMAGES = 128
# VPPO metrics shown in the table and the plot (all of them go to log.csv).
TABLE_METRICS = (
    ("vppo/token_fraction", "kept"),
    ("vppo/dependency_selected_mean", "dep kept"),
    ("vppo/dependency_rejected_mean", "dep dropped"),
    ("vppo/advantage_scale_max", "scale max"),
    ("vppo/skipped_fraction", "skipped"),
)
KEPT_NOTE = (
    "kept: share of completion tokens TGF trains. TGF keeps ceil({ratio} x n) tokens of an n-token completion, and "
    "most answers here are 2 tokens (colour, <|im_end|>): ceil({ratio} x 2) = {kept}, so about 0.5, not {ratio}."
)


def parse_args(argv: list[str] | None = None, prog: str = "python -m vppo_trl.demo") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a tiny vision-language model with VPPO on CPU to name the colour of a shape.",
    )
    parser.add_argument("--steps", type=int, default=500, help="VPPO optimizer steps (8 prompts x 8 completions).")
    parser.add_argument("--warm-start-steps", type=int, default=60, help="Format-only supervised steps before VPPO.")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="VPPO learning rate (constant).")
    parser.add_argument(
        "--beta", type=float, default=0.2, help="Weight of the KL penalty to the warm-start policy (0 turns it off)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model, the images and the training run.")
    parser.add_argument("--output-dir", default="demo_output", help="Where the log, summary and plot are written.")
    parser.add_argument(
        "--estimator", choices=("k3", "kl"), default="k3", help="Token visual dependency estimator (VPPOConfig)."
    )
    parser.add_argument(
        "--perturbation",
        choices=("patch_blackening", "gaussian_noise", "gaussian_blur", "solid"),
        default="patch_blackening",
        help="How the image is made uninformative to measure visual dependency.",
    )
    parser.add_argument(
        "--compare",
        choices=("grpo",),
        help="Also train GRPO from the same warm start with the same seed, and plot both reward curves.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="A few steps of each phase, to check that everything runs (CI)."
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warm_start_steps = 3, 3
    if args.steps < 1 or args.warm_start_steps < 0 or args.beta < 0:
        parser.error("--steps must be >= 1, --warm-start-steps and --beta >= 0")
    return args


def mask_tokens(model: torch.nn.Module, token_ids: list[int]) -> None:
    """Give the output layer a frozen bias that removes `token_ids` from every distribution the model produces."""
    lm_head = model.get_output_embeddings()
    if lm_head.bias is None:
        bias = torch.zeros(lm_head.out_features, dtype=lm_head.weight.dtype, device=lm_head.weight.device)
    else:
        bias = lm_head.bias.detach().clone()
    bias[token_ids] = MASKED_LOGIT_BIAS
    lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)


def prompt_texts(processor: Any, prompts: list) -> list[str]:
    return [processor.apply_chat_template(prompt, add_generation_prompt=True) for prompt in prompts]


def random_colour(rng: random.Random, colour: str) -> str:
    """The demo's warm-start answer: a colour drawn independently of the image's `colour`."""
    return rng.choice(COLOURS)


def warm_start(
    model: torch.nn.Module,
    processor: Any,
    steps: int,
    seed: int,
    make_answer: Callable[[random.Random, str], str] = random_colour,
) -> float:
    """Teach the answer format (`make_answer(rng, colour)`, then <|im_end|>); returns the last loss."""
    dataset = make_colour_dataset(steps * WARM_START_BATCH, seed=seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=WARM_START_LR)
    end_of_turn = processor.tokenizer.eos_token
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        rows = dataset[step * WARM_START_BATCH : (step + 1) * WARM_START_BATCH]
        # The default target ignores the image: the model learns what an answer looks like, not which one is right.
        answers = [make_answer(rng, colour) + end_of_turn for colour in rows["answer"]]
        texts = [text + answer for text, answer in zip(prompt_texts(processor, rows["prompt"]), answers, strict=True)]
        inputs = processor(text=texts, images=rows["images"], return_tensors="pt", padding=True)
        labels = inputs["input_ids"].clone()
        for row, answer in enumerate(answers):  # left padding: each row ends with its answer's tokens
            labels[row, : -len(processor.tokenizer(answer, add_special_tokens=False).input_ids)] = -100
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


@torch.no_grad()
def greedy_accuracy(model: torch.nn.Module, processor: Any, seed: int, num_images: int = EVAL_IMAGES) -> float:
    """Share of fresh images whose colour the greedy answer names."""
    rows = make_colour_dataset(num_images, seed=seed)[:]
    was_training = model.training
    model.eval()
    inputs = processor(
        text=prompt_texts(processor, rows["prompt"]), images=rows["images"], return_tensors="pt", padding=True
    )
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answers = processor.batch_decode(output[:, inputs["input_ids"].size(1) :], skip_special_tokens=True)
    model.train(was_training)
    return sum(colour_reward(answers, rows["answer"])) / num_images


def step_logs(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step training entries of `trainer.state.log_history` (not the end-of-training summary)."""
    return [entry for entry in log_history if "reward" in entry]


def window_mean(values: list[float], window: int) -> float:
    return sum(values[-window:]) / len(values[-window:])


def make_table_callback(print_every: int, window: int):
    from transformers import TrainerCallback

    class TableCallback(TrainerCallback):
        """Print one table row every `print_every` steps, with the reward averaged over the last `window` steps."""

        def __init__(self):
            self.rewards: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            metrics = TABLE_METRICS if hasattr(args, "token_filter_ratio") else ()  # GRPO logs no VPPO metrics
            header = f"{'step':>5} {'reward':>7} {f'avg{window}':>7}" + "".join(f" {name:>11}" for _, name in metrics)
            if metrics:
                print(KEPT_NOTE.format(ratio=args.token_filter_ratio, kept=math.ceil(args.token_filter_ratio * 2)))
            print(header + "\n" + "-" * len(header), flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "reward" not in logs:
                return
            self.rewards.append(logs["reward"])
            if state.global_step % print_every and state.global_step != state.max_steps:
                return
            row = f"{state.global_step:>5} {logs['reward']:>7.3f} {window_mean(self.rewards, window):>7.3f}"
            metrics = TABLE_METRICS if hasattr(args, "token_filter_ratio") else ()
            row += "".join(f" {logs[key]:>11.3g}" if key in logs else f" {'-':>11}" for key, _ in metrics)
            print(row, flush=True)

    return TableCallback()


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], window: int, path: Path, title: str) -> None:
    """Reward against step (with a moving average), and the visual dependency of kept vs dropped tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    rewards = [row["reward"] for row in rows]
    smoothed = [window_mean(rewards[: i + 1], window) for i in range(len(rewards))]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 2))
    top.plot(steps, rewards, color="tab:blue", alpha=0.3, linewidth=1, label="reward (per step)")
    top.plot(steps, smoothed, color="tab:blue", linewidth=2, label=f"reward ({window}-step mean)")
    top.axhline(CHANCE_REWARD, color="grey", linestyle="--", linewidth=1, label="chance (1/4)")
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("accuracy reward")
    top.set_title(title)
    top.legend(loc="lower right")
    for key, label, colour in (
        ("vppo/dependency_selected_mean", "tokens kept by TGF", "tab:orange"),
        ("vppo/dependency_rejected_mean", "tokens filtered out", "tab:green"),
    ):
        # Steps where every group had zero advantage measure no dependency and log none.
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            bottom.plot(*zip(*points, strict=True), color=colour, linewidth=1, label=label)
    bottom.set_yscale("symlog", linthresh=1e-3)
    bottom.set_ylabel("mean visual dependency (k3)")
    bottom.set_xlabel("VPPO step")
    if bottom.lines:
        bottom.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None, prog: str = "python -m vppo_trl.demo") -> dict[str, Any]:
    """Run the demo; returns the summary that is also written to `summary.json`."""
    args = parse_args(argv, prog)
    from transformers.utils import logging as hf_logging

    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    progress_bars = hf_logging.is_progress_bar_enabled()
    # The tiny model's ops are too short to gain much from intra-op threads: on 2 idle cores, 2 threads were 16%
    # faster than 1, but on 2 cores shared with other jobs 5x slower. Restored afterwards, as are the log levels.
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecation notices of the libraries, not of the demo
            return run(args)
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        if progress_bars:
            hf_logging.enable_progress_bar()


def train_policy(method: str, args: argparse.Namespace, warm_start_dir: Path, processor: Any, masked: list[int]):
    """Train the warm-start policy with `method` ("vppo" or "grpo"); both get the same data, seed and optimizer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from . import VPPOConfig, VPPOTrainer

    policy = build_model_from(warm_start_dir)
    mask_tokens(policy, masked)
    settings = dict(
        output_dir=str(Path(args.output_dir) / ("trainer" if method == "vppo" else "grpo_trainer")),
        max_steps=args.steps,
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,
        num_generations=NUM_GENERATIONS,
        max_completion_length=4,
        temperature=1.0,
        beta=args.beta,
        gradient_checkpointing=False,  # TRL turns it on by default; a model this small does not need to save memory
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
    )
    if method == "vppo":
        config = VPPOConfig(**settings, dependency_estimator=args.estimator, perturbation=args.perturbation)
        trainer_class = VPPOTrainer
    else:
        config, trainer_class = GRPOConfig(**settings), GRPOTrainer
    # One fresh image per prompt of the run: no image is seen twice.
    train_dataset = make_colour_dataset(args.steps * PROMPTS_PER_STEP, seed=args.seed + 3)
    vision = list(policy.model.visual.parameters())
    vision_ids = {id(p) for p in vision}
    optimizer = torch.optim.AdamW(
        [
            # The language model's group first: the Trainer logs the first group's learning rate.
            {"params": [p for p in policy.parameters() if p.requires_grad and id(p) not in vision_ids]},
            {"params": vision, "lr": args.learning_rate * VISION_LR_MULTIPLIER},
        ],
        lr=args.learning_rate,
        weight_decay=0.0,
    )
    trainer = trainer_class(
        model=policy,
        reward_funcs=colour_reward,
        args=config,
        train_dataset=train_dataset,
        processing_class=processor,
        optimizers=(optimizer, None),  # the scheduler (constant) is built by the Trainer, per parameter group
    )
    if trainer.ref_model is not None:
        mask_tokens(trainer.accelerator.unwrap_model(trainer.ref_model), masked)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    window = max(1, min(20, args.steps // 4))
    trainer.add_callback(make_table_callback(print_every=max(1, args.steps // 20), window=window))
    vppo_settings = (
        f"estimator {args.estimator}, perturbation {args.perturbation}, token_filter_ratio "
        f"{config.token_filter_ratio}, "
        if method == "vppo"
        else ""
    )
    print(
        f"{method.upper()}: {args.steps} steps of {PROMPTS_PER_STEP} prompts x {NUM_GENERATIONS} completions, "
        f"{vppo_settings}lr {args.learning_rate} (vision tower x{VISION_LR_MULTIPLIER:g}), KL beta {args.beta}."
    )
    trainer.train()
    return trainer


def build_model_from(folder: Path) -> torch.nn.Module:
    """The warm-start policy, loaded from its folder (TRL loads the KL reference from the same one)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder)


def save_trained_model(trainer, processor: Any, masked: list[int], folder: Path) -> None:
    """
    Save the policy where `vppo-trl spotlight --model` can load it. The masking bias of the output layer is not part
    of the Qwen2.5-VL architecture and is not saved; `suppress_tokens` keeps generation from emitting those ids.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.generation_config.suppress_tokens = masked
    trainer.save_model(str(folder))
    processor.save_pretrained(str(folder))


def spotlight_trained_model(model: torch.nn.Module, processor: Any, args: argparse.Namespace) -> dict[str, Path]:
    """Token perception of the trained model on a held-out image: completions sampled as in training, with rewards."""
    from .spotlight import perturbed_views, sample_perceptions, write_spotlight

    row = make_colour_dataset(1, seed=args.seed + 4)[0]
    was_training = model.training
    model.eval()
    perceptions = sample_perceptions(
        model, processor, COLOUR_QUESTION, row["images"], num_completions=SPOTLIGHT_COMPLETIONS,
        answer=row["answer"], reward_func=colour_reward, max_new_tokens=4, seed=args.seed,
        perturbation=args.perturbation, estimator=args.estimator, draws=SPOTLIGHT_DRAWS,
    )  # fmt: skip
    originals, perturbed = perturbed_views(model, processor, COLOUR_QUESTION, row["images"], args.perturbation,
                                           args.seed)  # fmt: skip
    model.train(was_training)
    title = f"Token perception of the demo's VPPO model on a held-out {row['answer']} shape"
    subtitle = (
        f"tiny Qwen2.5-VL after {args.steps} VPPO steps (seed {args.seed}) · {SPOTLIGHT_COMPLETIONS} completions "
        f"sampled at temperature 1 · {args.perturbation}, {args.estimator}, {SPOTLIGHT_DRAWS} draws averaged"
    )
    paths = write_spotlight(Path(args.output_dir) / "spotlight", perceptions, originals, perturbed, COLOUR_QUESTION,
                            title=title, subtitle=subtitle)  # fmt: skip
    correct = sum(item.reward for item in perceptions)
    mean_dependency = sum(item.trajectory_dependency for item in perceptions) / len(perceptions)
    print(
        f"Spotlight on a held-out {row['answer']} shape: {correct:g} of {len(perceptions)} sampled answers right, "
        f"mean trajectory dependency {mean_dependency:.3g}. Page: {paths['perception.html']}, picture: "
        f"{paths['perception.png']}"
    )
    return paths


def plot_comparison(runs: dict[str, list[dict[str, Any]]], window: int, path: Path, title: str) -> None:
    """Reward curves of several methods ({name: step logs}) on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for (name, rows), colour in zip(runs.items(), ("tab:orange", "tab:blue"), strict=False):
        steps = [row["step"] for row in rows]
        rewards = [row["reward"] for row in rows]
        smoothed = [window_mean(rewards[: i + 1], window) for i in range(len(rewards))]
        axis.plot(steps, rewards, color=colour, alpha=0.2, linewidth=1)
        axis.plot(steps, smoothed, color=colour, linewidth=2, label=f"{name} ({window}-step mean)")
    axis.axhline(CHANCE_REWARD, color="grey", linestyle="--", linewidth=1, label="chance (1/4)")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("step")
    axis.set_ylabel("accuracy reward")
    axis.set_title(title)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import set_seed

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    set_seed(args.seed)

    tokenizer = build_tokenizer(COLOURS, vocab_size=VOCAB_SIZE)
    tokenizer.padding_side = "left"
    processor = build_processor("qwen2_5_vl", tokenizer)
    model = build_model("qwen2_5_vl", tokenizer, seed=args.seed)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"Tiny Qwen2.5-VL built locally: {num_parameters / 1e6:.2f}M parameters, {len(tokenizer)} tokens.")

    print(f"Warm start (answer format only): {args.warm_start_steps} supervised steps on random colours...")
    loss = warm_start(model, processor, args.warm_start_steps, seed=args.seed + 1)
    # Saved so that TRL can load the KL reference from it; the policy starts from the same checkpoint.
    warm_start_dir = output_dir / "warm_start"
    model.save_pretrained(warm_start_dir)
    processor.save_pretrained(warm_start_dir)
    masked = suppressed_token_ids(processor)
    eval_seed = args.seed + 2
    warm_policy = build_model_from(warm_start_dir)
    mask_tokens(warm_policy, masked)
    accuracy_before = greedy_accuracy(warm_policy, processor, seed=eval_seed)
    print(
        f"  loss {loss:.3f} per answer token (a uniform colour guess and a sure <|im_end|> give "
        f"ln(4) / 2 = {math.log(4) / 2:.3f}); held-out greedy accuracy {accuracy_before:.2f} "
        f"(chance {CHANCE_REWARD:.2f}). Saved to {warm_start_dir}."
    )
    print(f"Masked (never emitted): {processor.tokenizer.convert_ids_to_tokens(masked)}.")

    train_start = time.perf_counter()
    trainer = train_policy("vppo", args, warm_start_dir, processor, masked)
    train_seconds = time.perf_counter() - train_start
    accuracy_after = greedy_accuracy(trainer.model, processor, seed=eval_seed)
    model_dir = Path(trainer.args.output_dir)
    save_trained_model(trainer, processor, masked, model_dir)
    spotlight_paths = spotlight_trained_model(trainer.model, processor, args)

    window = max(1, min(20, args.steps // 4))
    rows = step_logs(trainer.state.log_history)
    rewards = [row["reward"] for row in rows]
    start_reward, end_reward = sum(rewards[:window]) / window, window_mean(rewards, window)
    csv_path, plot_path, summary_path = (
        output_dir / "log.csv",
        output_dir / "vppo_demo.png",
        output_dir / "summary.json",
    )
    write_csv(rows, csv_path)
    plot(
        rows,
        window,
        plot_path,
        title=f"VPPO on a tiny Qwen2.5-VL, CPU (seed {args.seed}, {args.estimator}, {args.perturbation})",
    )
    learned = end_reward >= LEARNED_THRESHOLD
    summary = {
        "seed": args.seed,
        "steps": args.steps,
        "estimator": args.estimator,
        "perturbation": args.perturbation,
        "learning_rate": args.learning_rate,
        "beta": args.beta,
        "window": window,
        "start_reward": start_reward,
        "end_reward": end_reward,
        "greedy_accuracy_before": accuracy_before,
        "greedy_accuracy_after": accuracy_after,
        "learned": learned,
        "train_seconds": train_seconds,
        "log": str(csv_path),
        "plot": str(plot_path),
        "model": str(model_dir),
        "spotlight": str(spotlight_paths["perception.html"]),
        "spotlight_png": str(spotlight_paths["perception.png"]),
    }
    summary["total_seconds"] = time.perf_counter() - start
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"Held-out greedy accuracy on {EVAL_IMAGES} fresh images: {accuracy_before:.2f} before VPPO -> "
        f"{accuracy_after:.2f} after. Training {train_seconds:.0f} s, total {summary['total_seconds']:.0f} s."
    )
    print(f"Per-step log: {csv_path}; summary: {summary_path}; trained model: {model_dir}")
    change = f"mean reward {start_reward:.2f} (first {window} steps) -> {end_reward:.2f} (last {window} steps)"
    if args.quick:
        verdict = f"quick run, too short to judge learning: {change}"
    elif learned:
        verdict = f"LEARNED to read the colour from the image: {change}, chance is {CHANCE_REWARD:.2f}"
    else:
        verdict = f"did NOT clearly learn: {change}, below the {LEARNED_THRESHOLD} threshold"
    print(f"Verdict: {verdict}. Plot: {plot_path}")

    if args.compare == "grpo":
        compare_start = time.perf_counter()
        grpo = train_policy("grpo", args, warm_start_dir, processor, masked)
        grpo_rows = step_logs(grpo.state.log_history)
        grpo_rewards = [row["reward"] for row in grpo_rows]
        comparison_path = output_dir / "vppo_vs_grpo.png"
        title = f"VPPO vs GRPO from the same warm start, tiny Qwen2.5-VL, CPU (seed {args.seed})"
        plot_comparison({"VPPO": rows, "GRPO": grpo_rows}, window, comparison_path, title=title)
        write_csv(grpo_rows, output_dir / "grpo_log.csv")
        summary.update(
            grpo_start_reward=sum(grpo_rewards[:window]) / window,
            grpo_end_reward=window_mean(grpo_rewards, window),
            grpo_greedy_accuracy_after=greedy_accuracy(grpo.model, processor, seed=eval_seed),
            grpo_seconds=time.perf_counter() - compare_start,
            comparison_plot=str(comparison_path),
        )
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"GRPO: mean reward {summary['grpo_start_reward']:.2f} (first {window} steps) -> "
            f"{summary['grpo_end_reward']:.2f} (last {window} steps), held-out greedy accuracy "
            f"{summary['grpo_greedy_accuracy_after']:.2f}; VPPO: {start_reward:.2f} -> {end_reward:.2f}, "
            f"{accuracy_after:.2f}. Plot: {comparison_path}"
        )
    return summary


if __name__ == "__main__":
    main()
