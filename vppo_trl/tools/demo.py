"""CPU demo: VPPO teaches a tiny vision-language model to say the colour of a shape, in minutes, offline.

Run it with `vppo-trl demo` or `python -m vppo_trl.tools.demo` (`--help` for the flags; docs/demo.md explains each
choice). Everything is built locally, nothing is downloaded:

1. Model: a tiny, randomly initialised Qwen2.5-VL (~0.25M parameters) with a local tokenizer in which every colour
   word is one token, and the real Qwen2.5-VL processor (`vppo_trl.testing`).
2. Task: a white 56-px image with one red, green, blue or yellow rectangle or ellipse, and the question "What colour
   is the shape?". The reward is 1 for exactly the sentence "The shape is <colour>." with the right colour: a
   7-token answer (with `<|im_end|>`) of which only the colour word depends on the image. `--task chain` puts 12
   free words before the sentence, drawn anew in every completion, and rewards that format with the right colour:
   1 token in 18 decides the reward, as in the paper's reasoning chains, where most tokens do not need the image.
3. Warm start, the paper's regime in miniature (VPPO starts from a pretrained VLM, which already perceives): a short
   supervised phase teaches the model to tell the colours apart in another phrasing ("Describe the picture." ->
   "A green ellipse.") and the answer's format with a colour drawn independently of the image ("What colour is the
   shape?" -> "The shape is <random colour>."). The held-out accuracy stays near chance (0.25): RL has to teach the
   policy to use what it perceives to answer the question.
4. VPPO: `VPPOTrainer` with the paper's defaults (patch blackening, k3 dependency, 40% of tokens kept, dynamic
   advantage shaping, no KL) and dynamic sampling (groups whose 8 answers all earn the same reward are replaced by
   fresh prompts), 8 prompts x 8 completions per step. RL trains the language model; the vision tower, which the
   warm start taught to tell the colours apart, stays frozen: trained by RL too, it lost the colours' separation in
   the first steps, and one colour's answer could collapse for good (docs/demo.md, "Why runs stalled").
5. Vision tokens masked: the policy must never emit `<|image_pad|>` and the other vision special tokens. TRL
   suppresses `<|image_pad|>` while sampling but scores log-probs over the full vocabulary, where a small random
   policy learns to park probability. The output layer gets a frozen bias of -1e4 on those ids, so sampling,
   training, VPPO's perturbed pass and evaluation all see the same masked distribution.

It prints a table while training, then the greedy accuracy on fresh held-out images before and after VPPO, overall
and per colour (with what each colour was mistaken for), and a verdict: LEARNED when the mean reward of the last 20
steps is at least 0.8 and the held-out greedy accuracy at least 0.9. It writes to `--output-dir` the per-step log
(`log.csv`), `summary.json`, a plot (`vppo_demo.png`), the trained model (`trainer/`) and its token perception on a
held-out image (`spotlight/perception.html`, `.png` and `.json`). `--compare grpo` also trains TRL's GRPO from the
same warm start and seed, plots both reward curves and writes the GRPO model's token perception (`grpo_spotlight/`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..testing import (
    COLOURS,
    build_model,
    build_processor,
    build_tokenizer,
    make_colour_dataset,
    make_shape_image,
    suppressed_token_ids,
)

QUESTION = "What colour is the shape?"
# The warm start's perception prompt: another phrasing, whose answer names the colour and the shape.
DESCRIBE_PROMPT = "Describe the picture."
SHAPES = ("rectangle", "ellipse")
CHANCE_REWARD = 1 / len(COLOURS)
# Verdict: the mean reward over the last steps and the held-out greedy accuracy that count as "learned".
LEARNED_REWARD = 0.8
LEARNED_ACCURACY = 0.9
REWARD_WINDOW = 20
# Bias added to the logits of tokens the policy must never emit: exp(-1e4) is exactly 0 in float32, and unlike -inf
# it keeps entropies and KLs finite (0 * -1e4 = 0).
MASKED_LOGIT_BIAS = -1e4
# BPE entries of the tokenizer (716 tokens with Qwen's added ones, vs 1,486 by default): on CPU, TRL's fused log-prob
# head projects every position of a sequence onto the vocabulary, and that was most of a step's time.
VOCAB_SIZE = 600
PROMPTS_PER_STEP = 8
NUM_GENERATIONS = 8
# Completions stop at <|im_end|>; the answer sentence is 7 tokens with it.
MAX_COMPLETION_LENGTH = 10
# The chain task's free words: each a token of its own, none a colour, drawn uniformly and independently. Before the
# answer sentence they stand for the paper's reasoning tokens that do not need the picture (benchmarks/LEARNING.md).
CHAIN_WORDS = (
    *("first", "look", "then", "so", "we", "see", "it"),
    *("here", "next", "now", "well", "thus", "note", "check"),
)
CHAIN_LENGTH = 12
# The sentence the chain task's reward reads its colour from: the first one of the completion.
CHAIN_SENTENCE = re.compile(r"\bThe shape is (\w+)")
# The vision tower's learning-rate multiple in benchmarks/learning.py (the demo's RL trained the tower at 5x until it
# froze it: docs/demo.md, "Why runs stalled").
VISION_LR_MULTIPLIER = 5.0
# The VPPOConfig switches of each method the demo (and benchmarks/demo_sweep.py) can train. VPPOTrainer with TGF and
# TAS off is GRPO (VPPOConfig's docstring), with the same dynamic sampling and settings; its perturbed pass still runs,
# for the dependency metrics only.
TRAINING_METHODS: dict[str, dict[str, Any]] = {
    "vppo": {},
    "grpo": {"token_filter_ratio": 1.0, "advantage_shaping": False},
    "vppo_guard": {"cold_start_guard": True},
    "tgf_only": {"advantage_shaping": False},
    "tas_only": {"token_filter_ratio": 1.0},
}
WARM_START_BATCH = 16
# Measured on seed 0 (docs/demo.md): 200 steps on the description alone reach a held-out description accuracy of 1.0
# at 1e-3, 0.61 at 3e-3 and 0.34 at 1e-2 (or at 3e-3 with the vision tower at 5x).
WARM_START_LR = 1e-3
EVAL_IMAGES = 128
NO_COLOUR = "none"
# Completions sampled for the spotlight of the trained model, as many as a training group.
SPOTLIGHT_COMPLETIONS = 8
SPOTLIGHT_DRAWS = 4
# VPPO metrics shown in the table and the plot (all of them go to log.csv).
TABLE_METRICS = (
    ("vppo/token_fraction", "kept"),
    ("vppo/dependency_selected_mean", "dep kept"),
    ("vppo/dependency_rejected_mean", "dep dropped"),
    ("vppo/advantage_scale_max", "scale max"),
    ("vppo/skipped_fraction", "skipped"),
)


@dataclass
class DemoArguments:
    """Flags of the CPU demo (`python -m vppo_trl.tools.demo --help`)."""

    steps: int = field(
        default=150, metadata={"help": "Most RL optimizer steps (8 prompts x 8 completions each); see --stop-reward."}
    )
    warm_start_steps: int = field(
        default=200, metadata={"help": "Supervised warm-start steps (perception in another phrasing, answer format)."}
    )
    learning_rate: float = field(
        default=2e-3,
        metadata={
            "help": "RL learning rate of the language model (constant after the warm-up); the vision tower is frozen."
        },
    )
    warmup_steps: int = field(
        default=5,
        metadata={
            "help": "RL steps over which the learning rate rises linearly from 0. Adam's first step moves every "
            "weight by the full rate whatever its gradient; at 2e-3 that could break the answer's format for good."
        },
    )
    dynamic_sampling: bool = field(
        default=True, metadata={"help": "Replace groups whose completions all earn the same reward (DAPO)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the model, the images and the training run."})
    task: str = field(
        default="sentence",
        metadata={
            "help": "sentence: answer 'The shape is <colour>.' (7 tokens, rewarded when exact). chain: 12 free words "
            "first, sampled anew in every completion, then the sentence; rewarded when the sentence names the right "
            "colour (1 token in 18 decides the reward, the paper's regime in miniature: docs/demo.md).",
            "choices": ("sentence", "chain"),
        },
    )
    output_dir: str = field(default="demo_output", metadata={"help": "Where the log, summary and plots are written."})
    estimator: str = field(
        default="k3", metadata={"help": "Token visual dependency estimator (VPPOConfig).", "choices": ("k3", "kl")}
    )
    perturbation: str = field(
        default="patch_blackening",
        metadata={
            "help": "How the image is made uninformative to measure visual dependency.",
            "choices": ("patch_blackening", "gaussian_noise", "gaussian_blur", "solid"),
        },
    )
    compare: str | None = field(
        default=None,
        metadata={
            "help": "Also train GRPO from the same warm start with the same seed, and plot both reward curves.",
            "choices": ("grpo",),
        },
    )
    spotlight: bool = field(
        default=True, metadata={"help": "Write the token perception of the trained model on a held-out image."}
    )
    stop_reward: float = field(
        default=0.9,
        metadata={
            "help": f"Stop once the mean reward of the last {REWARD_WINDOW} steps reaches this (above 1: never stop)."
        },
    )
    quick: bool = field(
        default=False,
        metadata={"help": "A few steps of each phase and one extra generation round at most, to check that it runs."},
    )

    def __post_init__(self):
        if self.quick:
            self.steps, self.warm_start_steps = 2, 2
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.warm_start_steps < 0:
            raise ValueError(f"--warm-start-steps must be >= 0, got {self.warm_start_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")

    @property
    def demo_task(self) -> DemoTask:
        return TASKS[self.task]


def parse_args(argv: list[str] | None = None, prog: str = "python -m vppo_trl.tools.demo") -> DemoArguments:
    from ..command_line import CommandLineParser

    parser = CommandLineParser(
        DemoArguments,
        prog=prog,
        description="Train a tiny vision-language model with VPPO on CPU to say the colour of a shape.",
    )
    (args,) = parser.parse_dataclasses(argv)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------------------------


def answer_sentence(colour: str) -> str:
    return f"The shape is {colour}."


def completion_texts(completions: list) -> list[str]:
    return [item if isinstance(item, str) else "".join(message["content"] for message in item) for item in completions]


def sentence_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 for exactly "The shape is <answer>." (surrounding spaces aside), else 0.0."""
    texts = completion_texts(completions)
    return [float(text.strip() == answer_sentence(colour)) for text, colour in zip(texts, answer, strict=True)]


def chain_answer(rng: random.Random, colour: str) -> str:
    """`CHAIN_LENGTH` free words drawn uniformly from `CHAIN_WORDS`, then "The shape is <colour>."."""
    return " ".join([*(rng.choice(CHAIN_WORDS) for _ in range(CHAIN_LENGTH)), answer_sentence(colour)])


def chain_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """
    TRL reward function: 1.0 when the completion's first "The shape is <colour>" names `answer` after at least
    `CHAIN_LENGTH` words, else 0.0. Which words they are, and what follows the sentence, earns nothing. Without the
    sentence, naming the colour in the warm start's other phrasing ("A blue ellipse.") would earn the reward; without
    the count, dropping the free words would (both seen in pilot runs: benchmarks/LEARNING.md).
    """
    rewards = []
    for text, colour in zip(completion_texts(completions), answer, strict=True):
        said = CHAIN_SENTENCE.search(text)
        chained = said is not None and len(text[: said.start()].split()) >= CHAIN_LENGTH
        rewards.append(float(chained and said.group(1) == colour))
    return rewards


@dataclass(frozen=True)
class DemoTask:
    """What the policy is asked to answer and what earns the reward; the demo's other settings are the tasks' own.

    `answer(rng, colour)` is an answer naming `colour` (the warm start's format examples draw `colour` at random);
    `words` are the answer's words besides the colours, each made one token of the tokenizer.
    """

    name: str
    answer: Callable[[random.Random, str], str]
    reward: Callable[..., list[float]]
    max_completion_length: int
    words: tuple[str, ...] = ()

    def answer_tokens(self, tokenizer: Any) -> int:
        """Tokens of an answer, with <|im_end|> (every answer of a task has as many: each word is one token)."""
        return len(tokenizer(self.answer(random.Random(0), COLOURS[0]) + tokenizer.eos_token).input_ids)


TASKS = {
    # The 7-token sentence: only the colour word depends on the image, the rest is certain after the warm start.
    "sentence": DemoTask(
        "sentence", lambda rng, colour: answer_sentence(colour), sentence_reward, MAX_COMPLETION_LENGTH
    ),
    # The paper's regime in miniature: 12 free words that vary between completions and carry no reward, then the
    # sentence; in the answer's format, the colour alone decides the reward: 1 token in 18 (benchmarks/LEARNING.md).
    "chain": DemoTask("chain", chain_answer, chain_reward, CHAIN_LENGTH + MAX_COMPLETION_LENGTH, CHAIN_WORDS),
}


def user_prompt(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def make_question_dataset(n: int, seed: int, balanced: bool = False):
    """`n` rows of the demo's task (`prompt`, `images`, `answer`), one fresh image each; `balanced`: as many of each
    colour (up to the remainder of `n`), in a random order."""
    from datasets import Dataset

    rng = random.Random(seed)
    if balanced:
        colours = [COLOURS[index % len(COLOURS)] for index in range(n)]
        rng.shuffle(colours)
    else:
        colours = [rng.choice(COLOURS) for _ in range(n)]
    images = [[make_shape_image(colour, rng)] for colour in colours]
    return Dataset.from_dict({"prompt": [user_prompt(QUESTION)] * n, "images": images, "answer": colours})


def warm_start_examples(n: int, seed: int, task: DemoTask = TASKS["sentence"]) -> list[tuple[str, Any, str]]:
    """(prompt, image, answer) pairs: perception in another phrasing, then `task`'s answer format with a random colour.

    The two alternate, so each batch holds both. The format examples name a colour drawn independently of the image:
    they teach what an answer to the question looks like, not which colour is right.
    """
    rng = random.Random(seed)
    examples = []
    for index in range(n):
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        image = make_shape_image(colour, rng, shape=shape)
        if index % 2 == 0:
            examples.append((DESCRIBE_PROMPT, image, f"A {colour} {shape}."))
        else:
            examples.append((QUESTION, image, task.answer(rng, rng.choice(COLOURS))))
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Model, warm start, evaluation
# ---------------------------------------------------------------------------------------------------------------


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


def supervised_steps(
    model: torch.nn.Module,
    processor: Any,
    batches: Iterable[list[tuple[Any, Any, str]]],
    learning_rate: float = WARM_START_LR,
) -> float:
    """One AdamW step per batch of (prompt, image, answer) on the answer's tokens and <|im_end|>; the last loss."""
    optimizer = torch.optim.AdamW(
        [parameter for parameter in model.parameters() if parameter.requires_grad], learning_rate
    )
    end_of_turn = processor.tokenizer.eos_token
    model.train()
    loss = torch.tensor(float("nan"))
    for batch in batches:
        prompts = [user_prompt(prompt) if isinstance(prompt, str) else prompt for prompt, _, _ in batch]
        answers = [answer + end_of_turn for _, _, answer in batch]
        texts = [text + answer for text, answer in zip(prompt_texts(processor, prompts), answers, strict=True)]
        images = [[image] if not isinstance(image, list) else image for _, image, _ in batch]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = inputs["input_ids"].clone()
        for row, answer in enumerate(answers):  # left padding: each row ends with its answer's tokens
            labels[row, : -len(processor.tokenizer(answer, add_special_tokens=False).input_ids)] = -100
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def perception_warm_start(
    model: torch.nn.Module, processor: Any, steps: int, seed: int, task: DemoTask = TASKS["sentence"]
) -> float:
    """The demo's warm start (`warm_start_examples`), `steps` batches of `WARM_START_BATCH`; returns the last loss."""
    examples = warm_start_examples(steps * WARM_START_BATCH, seed, task)
    batches = (examples[step * WARM_START_BATCH : (step + 1) * WARM_START_BATCH] for step in range(steps))
    return supervised_steps(model, processor, batches)


def random_colour(rng: random.Random, colour: str) -> str:
    """A colour drawn independently of the image's `colour` (a format-only warm-start answer)."""
    return rng.choice(COLOURS)


def warm_start(
    model: torch.nn.Module,
    processor: Any,
    steps: int,
    seed: int,
    make_answer: Callable[[random.Random, str], str] = random_colour,
    learning_rate: float = WARM_START_LR,
) -> float:
    """Format-only warm start on `testing.COLOUR_QUESTION` (`make_answer(rng, colour)`), used by
    benchmarks/learning.py; returns the last loss."""
    dataset = make_colour_dataset(steps * WARM_START_BATCH, seed=seed)
    rng = random.Random(seed)
    batches = []
    for step in range(steps):
        rows = dataset[step * WARM_START_BATCH : (step + 1) * WARM_START_BATCH]
        answers = [make_answer(rng, colour) for colour in rows["answer"]]
        batches.append(list(zip(rows["prompt"], rows["images"], answers, strict=True)))
    return supervised_steps(model, processor, batches, learning_rate)


def named_colour(text: str) -> str:
    """The first colour word of an answer, or `NO_COLOUR`."""
    words = text.replace(".", " ").lower().split()
    return next((word for word in words if word in COLOURS), NO_COLOUR)


@dataclass
class HeldOut:
    """The policy's greedy answers on fresh held-out images, as many of each colour.

    `accuracy` and `per_colour` count the rewarded sentence; `confusion[true][named]` counts the answers to images of
    colour `true` that named colour `named` (`NO_COLOUR` when the answer named none)."""

    accuracy: float
    per_colour: dict[str, float]
    confusion: dict[str, dict[str, int]]

    @classmethod
    def after_training(cls, summary: dict[str, Any]) -> HeldOut:
        """The evaluation after training, from a run's summary (`run_summary`)."""
        return cls(summary["greedy_accuracy_after"], summary["per_colour_accuracy_after"], summary["confusion_after"])

    def per_colour_text(self) -> str:
        return ", ".join(f"{colour} {accuracy:.2f}" for colour, accuracy in self.per_colour.items())

    def confusions(self) -> list[str]:
        """What the policy answers instead of each colour, most frequent first: `yellow -> red 25/32`."""
        found = []
        for colour, named in self.confusion.items():
            total = sum(named.values())
            for other, count in named.items():
                if other != colour and count:
                    found.append((count, f"{colour} -> {other} {count}/{total}"))
        return [text for _, text in sorted(found, key=lambda item: -item[0])]


@torch.no_grad()
def held_out_evaluation(
    model: torch.nn.Module,
    processor: Any,
    seed: int,
    task: DemoTask = TASKS["sentence"],
    num_images: int = EVAL_IMAGES,
) -> HeldOut:
    """Greedy answers on `num_images` fresh images (as many of each colour): `task`'s reward (the accuracy), per colour
    and confusion."""
    rows = make_question_dataset(num_images, seed=seed, balanced=True)[:]
    was_training = model.training
    model.eval()
    inputs = processor(
        text=prompt_texts(processor, rows["prompt"]), images=rows["images"], return_tensors="pt", padding=True
    )
    output = model.generate(**inputs, max_new_tokens=task.max_completion_length, do_sample=False)
    answers = processor.batch_decode(output[:, inputs["input_ids"].size(1) :], skip_special_tokens=True)
    model.train(was_training)
    rewards = task.reward(answers, rows["answer"])
    confusion = {colour: dict.fromkeys((*COLOURS, NO_COLOUR), 0) for colour in COLOURS}
    right = dict.fromkeys(COLOURS, 0.0)
    for colour, answer, reward in zip(rows["answer"], answers, rewards, strict=True):
        confusion[colour][named_colour(answer)] += 1
        right[colour] += reward
    per_colour = {colour: right[colour] / sum(confusion[colour].values()) for colour in COLOURS}
    return HeldOut(sum(rewards) / num_images, per_colour, confusion)


# ---------------------------------------------------------------------------------------------------------------
# Logs, table, plots
# ---------------------------------------------------------------------------------------------------------------


def step_logs(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step training entries of `trainer.state.log_history` (not the end-of-training summary)."""
    return [entry for entry in log_history if "reward" in entry]


def window_mean(values: list[float], window: int = REWARD_WINDOW) -> float:
    return sum(values[-window:]) / len(values[-window:])


def moving_means(values: list[float], window: int = REWARD_WINDOW) -> list[float]:
    return [window_mean(values[: index + 1], window) for index in range(len(values))]


def first_step_reaching(rewards: list[float], threshold: float = LEARNED_REWARD, window: int = REWARD_WINDOW):
    """The first step (1-based, from the `window`-th on) at which the mean reward of the last `window` steps is at
    least `threshold`, or None."""
    means = moving_means(rewards, window)
    return next((step for step in range(window, len(means) + 1) if means[step - 1] >= threshold), None)


def make_stop_callback(threshold: float):
    """Stop training once the mean reward of the last `REWARD_WINDOW` steps reaches `threshold`."""
    from transformers import TrainerCallback

    class StopWhenLearned(TrainerCallback):
        def __init__(self):
            self.rewards: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "reward" in logs:
                self.rewards.append(logs["reward"])
                if len(self.rewards) >= REWARD_WINDOW and window_mean(self.rewards) >= threshold:
                    control.should_training_stop = True

    return StopWhenLearned()


def make_table_callback(print_every: int, answer_tokens: int):
    from transformers import TrainerCallback

    class TableCallback(TrainerCallback):
        """Print one table row every `print_every` steps, with the reward averaged over the last steps."""

        def __init__(self):
            self.rewards: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            metrics = TABLE_METRICS if hasattr(args, "token_filter_ratio") else ()  # GRPO logs no VPPO metrics
            header = f"{'step':>5} {'reward':>7} {f'avg{REWARD_WINDOW}':>7}" + "".join(
                f" {name:>11}" for _, name in metrics
            )
            if metrics:
                ratio = args.token_filter_ratio
                print(
                    f"kept: share of completion tokens TGF trains, ceil({ratio} x n) of an n-token completion: "
                    f"{math.ceil(ratio * answer_tokens)} of the answer's {answer_tokens} (with <|im_end|>)."
                )
            print(header + "\n" + "-" * len(header), flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "reward" not in logs:
                return
            self.rewards.append(logs["reward"])
            last = state.global_step == state.max_steps or control.should_training_stop  # the stop callback runs first
            if state.global_step % print_every and not last:
                return
            row = f"{state.global_step:>5} {logs['reward']:>7.3f} {window_mean(self.rewards):>7.3f}"
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


def draw_rewards(axis, runs: dict[str, list[dict[str, Any]]]) -> None:
    """Per-step and moving-mean reward of each run ({name: step logs}) on `axis`."""
    for (name, rows), colour in zip(runs.items(), ("tab:blue", "tab:orange"), strict=False):
        steps, rewards = [row["step"] for row in rows], [row["reward"] for row in rows]
        axis.plot(steps, rewards, color=colour, alpha=0.25, linewidth=1)
        axis.plot(steps, moving_means(rewards), color=colour, linewidth=2, label=f"{name} ({REWARD_WINDOW}-step mean)")
    axis.axhline(CHANCE_REWARD, color="grey", linestyle="--", linewidth=1, label="chance (1/4)")
    axis.axhline(LEARNED_REWARD, color="grey", linestyle=":", linewidth=1, label=f"learned ({LEARNED_REWARD})")
    axis.set_ylim(-0.02, 1.02)
    axis.set_ylabel("reward")
    axis.legend(loc="lower right")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Reward against step, and the visual dependency of the tokens TGF keeps vs those it filters out."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 7))
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    draw_rewards(top, {"VPPO": rows})
    top.set_title(title)
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


def plot_comparison(runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Reward curves of several methods ({name: step logs}) on one plot."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5))
    axis = figure.subplots()
    draw_rewards(axis, runs)
    axis.set_xlabel("step")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class WarmStart:
    """The warm-start checkpoint every method of a seed starts from, and what it needs to train and evaluate."""

    folder: Path
    processor: Any
    masked: list[int]
    loss: float
    held_out: HeldOut


def build_warm_start(args: DemoArguments, folder: Path) -> WarmStart:
    """Build the tiny model and tokenizer of `args.seed`, warm-start it and save it to `folder`."""
    from transformers import set_seed

    set_seed(args.seed)
    task = args.demo_task
    tokenizer = build_tokenizer(COLOURS + task.words, vocab_size=VOCAB_SIZE)
    tokenizer.padding_side = "left"
    processor = build_processor("qwen2_5_vl", tokenizer)
    model = build_model("qwen2_5_vl", tokenizer, seed=args.seed)
    loss = perception_warm_start(model, processor, args.warm_start_steps, seed=args.seed + 1, task=task)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    masked = suppressed_token_ids(processor)
    policy = load_policy(folder, masked)
    held_out = held_out_evaluation(policy, processor, seed=args.seed + 2, task=task)
    return WarmStart(folder, processor, masked, loss, held_out)


def load_policy(folder: Path, masked: list[int]) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    policy = AutoModelForImageTextToText.from_pretrained(folder)
    mask_tokens(policy, masked)
    return policy


def train_policy(
    method: str,
    args: DemoArguments,
    start: WarmStart,
    output_dir: Path,
    verbose: bool = True,
    reward_func: Callable[..., list[float]] | None = None,
    callbacks: Iterable[Any] = (),
):
    """Train the warm-start policy with `method` (a key of `TRAINING_METHODS`); all get the same data, seed and
    settings. `reward_func` (named like the task's reward, its default) and `callbacks` let a benchmark watch the run.
    """
    task = args.demo_task
    reward_func = reward_func or task.reward
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .. import VPPOConfig, VPPOTrainer

    policy = load_policy(start.folder, start.masked)
    # The warm start taught the vision tower to tell the colours apart; RL teaches the language model to answer with
    # what it sees. Trained by RL too, the tower lost the colours' separation in the first steps, and the answer of
    # one colour could collapse before RL had linked it to the image (docs/demo.md, "Why runs stalled").
    policy.model.visual.requires_grad_(False)
    settings = dict(
        output_dir=str(output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,
        num_generations=NUM_GENERATIONS,
        max_completion_length=task.max_completion_length,
        temperature=1.0,
        beta=0.0,
        dynamic_sampling=args.dynamic_sampling,
        dynamic_sampling_reward=task.reward.__name__,
        # A quick run's policy earns no reward: every round is uninformative, one extra round shows as much as five.
        **({"dynamic_sampling_max_rounds": 1} if args.quick else {}),
        bf16=False,  # float32 on CPU: the same numbers on every machine, and faster than autocast for ops this small
        gradient_checkpointing=False,  # TRL turns it on by default; a model this small does not need to save memory
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
    )
    if method == "grpo":
        config = VPPOConfig(**settings, **TRAINING_METHODS[method])
    else:
        config = VPPOConfig(
            **settings, **TRAINING_METHODS[method], dependency_estimator=args.estimator, perturbation=args.perturbation
        )
    # Fresh images for every prompt the run can draw: each step generates on at most 1 + max_rounds batches.
    prompts = (1 + config.dynamic_sampling_max_rounds) * args.steps * PROMPTS_PER_STEP
    train_dataset = make_question_dataset(prompts, seed=args.seed + 3)
    trainer = VPPOTrainer(
        model=policy,
        reward_funcs=reward_func,
        args=config,
        train_dataset=train_dataset,
        processing_class=start.processor,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(make_stop_callback(args.stop_reward))
    for callback in callbacks:
        trainer.add_callback(callback)
    if verbose:
        answer_tokens = task.answer_tokens(start.processor.tokenizer)
        trainer.add_callback(make_table_callback(max(1, args.steps // 10), answer_tokens))
        print(
            f"{method.upper()}: {args.steps} steps of {PROMPTS_PER_STEP} prompts x {NUM_GENERATIONS} completions, "
            f"dynamic sampling {'on' if args.dynamic_sampling else 'off'}, lr {args.learning_rate} after "
            f"{args.warmup_steps} warm-up steps (vision tower frozen), no KL"
            + (f", {args.estimator}, {args.perturbation}, keeps {config.token_filter_ratio:.0%} of tokens." if
               method != "grpo" else ".")
        )  # fmt: skip
    trainer.train()
    return trainer


def run_summary(method: str, trainer, start: WarmStart, args: DemoArguments, seconds: float) -> dict[str, Any]:
    """What a user reads of one training run: rewards, the step it reached the bar, held-out accuracy, verdict."""
    rewards = [row["reward"] for row in step_logs(trainer.state.log_history)]
    held_out = held_out_evaluation(trainer.model, start.processor, seed=args.seed + 2, task=args.demo_task)
    end_reward = window_mean(rewards)
    return {
        "method": method,
        "seed": args.seed,
        "start_reward": sum(rewards[:REWARD_WINDOW]) / len(rewards[:REWARD_WINDOW]),
        "end_reward": end_reward,
        "steps_trained": trainer.state.global_step,
        "rewards": rewards,
        "step_reaching_0.8": first_step_reaching(rewards),
        "greedy_accuracy_before": start.held_out.accuracy,
        "greedy_accuracy_after": held_out.accuracy,
        "per_colour_accuracy_before": start.held_out.per_colour,
        "per_colour_accuracy_after": held_out.per_colour,
        "confusion_after": held_out.confusion,
        "learned": end_reward >= LEARNED_REWARD and held_out.accuracy >= LEARNED_ACCURACY,
        "train_seconds": seconds,
    }


def timed_training(
    method: str, args: DemoArguments, start: WarmStart, output_dir: Path, verbose: bool = True, **watch: Any
):
    """`train_policy` (`watch`: its `reward_func` and `callbacks`) and its `run_summary`, with the training's CPU
    time (this process's: on a shared machine it says how much work the run was, the wall time how long it took)."""
    began, cpu = time.perf_counter(), time.process_time()
    trainer = train_policy(method, args, start, output_dir, verbose, **watch)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu
    return trainer, {**run_summary(method, trainer, start, args, seconds), "train_cpu_seconds": cpu_seconds}


def save_trained_model(trainer, processor: Any, masked: list[int], folder: Path) -> None:
    """
    Save the policy where `vppo-trl spotlight --model` can load it. The masking bias of the output layer is not part
    of the Qwen2.5-VL architecture and is not saved; `suppress_tokens` keeps generation from emitting those ids.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.generation_config.suppress_tokens = masked
    lm_head = model.get_output_embeddings()
    bias, lm_head.bias = lm_head.bias, None  # saved, it would load as an unexpected key
    try:
        trainer.save_model(str(folder))
    finally:
        lm_head.bias = bias
    processor.save_pretrained(str(folder))


def spotlight_trained_model(
    model: torch.nn.Module, processor: Any, args: DemoArguments, steps_trained: int, method: str = "vppo"
) -> dict[str, Path]:
    """
    Token perception of the model `method` trained on a held-out image: completions sampled as in training, with
    rewards, and the tokens `method` trains and the scales it gives them (GRPO: every token, at scale 1). Written to
    `spotlight/` of the output folder (`<method>_spotlight/` for another method than VPPO).
    """
    from .spotlight import perturbed_views, sample_perceptions, write_spotlight

    row = make_question_dataset(1, seed=args.seed + 4)[0]
    was_training = model.training
    model.eval()
    perceptions = sample_perceptions(
        model, processor, QUESTION, row["images"], num_completions=SPOTLIGHT_COMPLETIONS, answer=row["answer"],
        reward_func=args.demo_task.reward, max_new_tokens=args.demo_task.max_completion_length, seed=args.seed,
        perturbation=args.perturbation, estimator=args.estimator, draws=SPOTLIGHT_DRAWS, **TRAINING_METHODS[method],
    )  # fmt: skip
    originals, perturbed = perturbed_views(model, processor, QUESTION, row["images"], args.perturbation, args.seed)
    model.train(was_training)
    name = method.upper()
    title = f"Token perception of the demo's {name} model on a held-out {row['answer']} shape"
    subtitle = (
        f"tiny Qwen2.5-VL, {args.task} task, after {steps_trained} {name} steps (seed {args.seed}) · "
        f"{SPOTLIGHT_COMPLETIONS} completions sampled at temperature 1 · {args.perturbation}, {args.estimator}, "
        f"{SPOTLIGHT_DRAWS} draws averaged · marked: the tokens {name} trains"
    )
    folder = Path(args.output_dir) / ("spotlight" if method == "vppo" else f"{method}_spotlight")
    paths = write_spotlight(folder, perceptions, originals, perturbed, QUESTION, title=title, subtitle=subtitle)
    correct = sum(item.reward for item in perceptions)
    mean_dependency = sum(item.trajectory_dependency for item in perceptions) / len(perceptions)
    print(
        f"Spotlight on a held-out {row['answer']} shape: {correct:g} of {len(perceptions)} sampled answers right, "
        f"mean trajectory dependency {mean_dependency:.3g}. Page: {paths['perception.html']}, picture: "
        f"{paths['perception.png']}"
    )
    return paths


def verdict(summary: dict[str, Any], quick: bool) -> str:
    change = (
        f"mean reward {summary['start_reward']:.2f} (first {REWARD_WINDOW} steps) -> {summary['end_reward']:.2f} "
        f"(last {REWARD_WINDOW}), held-out greedy accuracy {summary['greedy_accuracy_before']:.2f} -> "
        f"{summary['greedy_accuracy_after']:.2f}"
    )
    if quick:
        return f"quick run, too short to judge learning: {change}"
    if summary["learned"]:
        return f"LEARNED to read the colour from the image: {change}"
    mistakes = HeldOut.after_training(summary).confusions()
    return f"did NOT learn: {change} (learned means >= {LEARNED_REWARD} and >= {LEARNED_ACCURACY})" + (
        f"; held-out answers confused {', '.join(mistakes)}" if mistakes else ""
    )


def held_out_lines(summary: dict[str, Any], method: str) -> list[str]:
    """The held-out accuracy before and after, per colour, and what each colour was mistaken for."""
    after = HeldOut.after_training(summary)
    mistakes = after.confusions()
    return [
        f"Held-out greedy accuracy on {EVAL_IMAGES} fresh images ({EVAL_IMAGES // len(COLOURS)} of each colour): "
        f"{summary['greedy_accuracy_before']:.2f} before {method} -> {after.accuracy:.2f} after. Training "
        f"{summary['train_seconds']:.0f} s.",
        f"  per colour after {method}: {after.per_colour_text()}"
        + (f"; confused (true -> answered): {', '.join(mistakes)}." if mistakes else "; no colour confused."),
    ]


def topped_up_line(rows: list[dict[str, Any]]) -> str | None:
    """What dynamic sampling could not fill, said once (the library's own warning is silenced by the demo)."""
    short = [row for row in rows if row.get("dynamic_sampling/round_limit_reached")]
    if not short:
        return None
    fills = [row["dynamic_sampling/batch_fill"] for row in short]
    return (
        f"Dynamic sampling: {len(short)} of {len(rows)} steps trained on a batch it could not fill with informative "
        f"groups within its extra generation rounds (mean fill {sum(fills) / len(fills):.2f}; the rest of the batch "
        "carries no gradient)."
    )


def main(argv: list[str] | None = None, prog: str = "python -m vppo_trl.tools.demo") -> dict[str, Any]:
    """Run the demo; returns the summary that is also written to `summary.json`."""
    args = parse_args(argv, prog)
    with quiet_libraries():
        return run(args)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class quiet_libraries:
    """One torch thread, errors-only library logging and no progress bars, restored on exit.

    Silenced while the demo runs, each where it is emitted and only for the demo's call: transformers' logging below
    errors, FutureWarnings, the dynamic-sampling shortfall warning (the demo prints its own count, `topped_up_line`)
    and DeepSpeed's start-up line "Setting accelerator to CPU", which it logs when first imported (accelerate imports
    it, when it is installed, to unwrap a model: every `save_pretrained`).

    The tiny model's ops are too short to gain from intra-op threads: on 2 idle cores, 2 threads were 16% faster than
    1, but on 2 cores shared with other jobs 5x slower.
    """

    QUIET_LOGGERS = ("DeepSpeed", "vppo_trl.longrun.dynamic_sampling")

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.threads, self.verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
        self.progress_bars = hf_logging.is_progress_bar_enabled()
        torch.set_num_threads(1)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.filter = _BelowError()
        for name in self.QUIET_LOGGERS:
            logging.getLogger(name).addFilter(self.filter)
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notices of the libraries, not of the demo
        return self

    def __exit__(self, *exc_info):
        from transformers.utils import logging as hf_logging

        self.warnings.__exit__(*exc_info)
        for name in self.QUIET_LOGGERS:
            logging.getLogger(name).removeFilter(self.filter)
        torch.set_num_threads(self.threads)
        hf_logging.set_verbosity(self.verbosity)
        if self.progress_bars:
            hf_logging.enable_progress_bar()


def run(args: DemoArguments) -> dict[str, Any]:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print(
        f'Warm start: {args.warm_start_steps} supervised steps, {DESCRIBE_PROMPT!r} -> "A <colour> <shape>." and '
        f'{QUESTION!r} -> "{args.demo_task.answer(random.Random(args.seed), "<random colour>")}"...'
    )
    start = build_warm_start(args, output_dir / "warm_start")
    print(
        f"  loss {start.loss:.3f}; held-out greedy accuracy {start.held_out.accuracy:.2f} (chance "
        f"{CHANCE_REWARD:.2f}; per colour {start.held_out.per_colour_text()}). Masked (never emitted): "
        f"{start.processor.tokenizer.convert_ids_to_tokens(start.masked)}."
    )
    trainer, summary = timed_training("vppo", args, start, output_dir / "trainer")
    model_dir = Path(trainer.args.output_dir)
    save_trained_model(trainer, start.processor, start.masked, model_dir)
    rows = step_logs(trainer.state.log_history)
    csv_path, plot_path, summary_path = (output_dir / name for name in ("log.csv", "vppo_demo.png", "summary.json"))
    write_csv(rows, csv_path)
    plot(rows, plot_path, title=f"VPPO on a tiny Qwen2.5-VL, CPU (seed {args.seed})")
    summary.update(
        steps=args.steps,
        warm_start_steps=args.warm_start_steps,
        estimator=args.estimator,
        perturbation=args.perturbation,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        dynamic_sampling=args.dynamic_sampling,
        task=args.task,
        dynamic_sampling_reward=args.demo_task.reward.__name__,
        log=str(csv_path),
        plot=str(plot_path),
        model=str(model_dir),
    )
    for line in (topped_up_line(rows), *held_out_lines(summary, "VPPO")):
        if line:
            print(line)
    if args.spotlight:
        paths = spotlight_trained_model(trainer.model, start.processor, args, trainer.state.global_step)
        summary.update(spotlight=str(paths["perception.html"]), spotlight_png=str(paths["perception.png"]))
    print(f"Per-step log: {csv_path}; summary: {summary_path}; trained model: {model_dir}")
    print(f"Verdict: {verdict(summary, args.quick)}. Plot: {plot_path}")

    if args.compare == "grpo":
        grpo, grpo_summary = timed_training("grpo", args, start, output_dir / "grpo_trainer")
        grpo_rows = step_logs(grpo.state.log_history)
        write_csv(grpo_rows, output_dir / "grpo_log.csv")
        comparison_path = output_dir / "vppo_vs_grpo.png"
        title = f"VPPO vs GRPO from the same warm start, tiny Qwen2.5-VL, CPU (seed {args.seed})"
        plot_comparison({"VPPO": rows, "GRPO": grpo_rows}, comparison_path, title=title)
        summary.update(grpo={key: grpo_summary[key] for key in grpo_summary if key not in ("method", "seed")})
        summary["comparison_plot"] = str(comparison_path)
        for line in (topped_up_line(grpo_rows), *held_out_lines(grpo_summary, "GRPO")):
            if line:
                print(line)
        if args.spotlight:
            paths = spotlight_trained_model(grpo.model, start.processor, args, grpo.state.global_step, method="grpo")
            summary["grpo"].update(spotlight=str(paths["perception.html"]), spotlight_png=str(paths["perception.png"]))
        print(f"GRPO verdict: {verdict(grpo_summary, args.quick)}. Plot: {comparison_path}")
    summary["total_seconds"] = time.perf_counter() - began
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
