"""Why a CPU demo run stalls: per-colour measurements over training, `python benchmarks/demo_diagnosis.py --seeds 101`.

For each seed it builds the demo's warm start (`vppo_trl.tools.demo`), trains VPPO from it with the demo's settings
and measures, after the warm start and every `--every` steps, on a fixed probe set of fresh images (`--probe-images`
per colour):

- `confusion`: the greedy answer's colour word per true colour (`none` when it names no colour);
- `p_colour`: the policy's probability of each colour word right after "The shape is" (teacher forced), averaged per
  true colour: how likely sampling is to say the right colour at all;
- `separability`: how well the colours separate in the vision tower's output (the merged image tokens the language
  model reads, averaged per image) and in the language model's last hidden state where the colour word is predicted:
  nearest-centroid accuracy on half of the probe set with centroids from the other half, and per pair of colours the
  distance of the two centroids in units of the within-colour spread along that direction (d').

And, from every generation round of training (dynamic sampling's extra rounds included), per step and true colour:
the groups generated, those informative (rewards not all equal: the ones dynamic sampling keeps), the mean reward, the
variance of the reward within a group, and the share of sampled completions that name the right colour.

Writes `<output-dir>/seed<N>.json` and prints a short per-seed summary.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vppo_trl.testing import COLOURS, make_shape_image  # noqa: E402
from vppo_trl.tools import demo  # noqa: E402

ANSWER_PREFIX = "The shape is"


@dataclass
class DiagnosisArguments:
    """Flags of the demo diagnosis; the training settings are the demo's own unless given."""

    seeds: str = field(default="101,202", metadata={"help": "Seeds: a range `0-9`, a list `0,3,5` or both."})
    steps: int = field(default=demo.DemoArguments.steps, metadata={"help": "Most RL steps."})
    every: int = field(default=10, metadata={"help": "Measure on the probe set every this many steps."})
    probe_images: int = field(default=32, metadata={"help": "Probe images per colour."})
    output_dir: str = field(default="runs/demo_diagnosis", metadata={"help": "Where seed<N>.json is written."})


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


@dataclass
class Probe:
    """Fixed held-out images, `per_colour` of each colour, in the processor's batch layout."""

    colours: list[str]
    inputs: dict[str, torch.Tensor]
    answer_inputs: dict[str, torch.Tensor]  # the same prompts followed by "The shape is"

    @classmethod
    def build(cls, processor: Any, per_colour: int, seed: int) -> Probe:
        rng = random.Random(seed)
        colours = [colour for colour in COLOURS for _ in range(per_colour)]
        images = [[make_shape_image(colour, rng)] for colour in colours]
        prompts = demo.prompt_texts(processor, [demo.user_prompt(demo.QUESTION)] * len(colours))
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        prefixed = [prompt + ANSWER_PREFIX for prompt in prompts]
        answer_inputs = processor(text=prefixed, images=images, return_tensors="pt", padding=True)
        return cls(colours, dict(inputs), dict(answer_inputs))


def separability(features: torch.Tensor, colours: list[str]) -> dict[str, Any]:
    """Nearest-centroid accuracy (centroids from the even rows of each colour, tested on the odd ones) and per pair
    of colours the d' of the held-out rows along the line joining the two centroids."""
    labels = torch.tensor([COLOURS.index(colour) for colour in colours])
    fit = torch.zeros(len(colours), dtype=torch.bool)
    for index in range(len(COLOURS)):
        rows = (labels == index).nonzero().squeeze(-1)
        fit[rows[::2]] = True
    centroids = torch.stack([features[fit & (labels == index)].mean(0) for index in range(len(COLOURS))])
    test = ~fit
    nearest = torch.cdist(features[test], centroids).argmin(-1)
    result: dict[str, Any] = {"nearest_centroid_accuracy": (nearest == labels[test]).float().mean().item()}
    pairs = {}
    for a in range(len(COLOURS)):
        for b in range(a + 1, len(COLOURS)):
            direction = centroids[a] - centroids[b]
            direction = direction / direction.norm().clamp_min(1e-12)
            first = features[test & (labels == a)] @ direction
            second = features[test & (labels == b)] @ direction
            spread = (0.5 * (first.var() + second.var())).sqrt().clamp_min(1e-12)
            pairs[f"{COLOURS[a]}-{COLOURS[b]}"] = ((first.mean() - second.mean()) / spread).item()
    result["d_prime"] = pairs
    return result


@torch.no_grad()
def measure(model: torch.nn.Module, processor: Any, probe: Probe) -> dict[str, Any]:
    """Confusion, colour-word probabilities and separability of the policy on the probe set."""
    was_training = model.training
    model.eval()
    tokenizer = processor.tokenizer
    output = model.generate(**probe.inputs, max_new_tokens=demo.MAX_COMPLETION_LENGTH, do_sample=False)
    answers = processor.batch_decode(output[:, probe.inputs["input_ids"].size(1) :], skip_special_tokens=True)
    confusion = {colour: dict.fromkeys((*COLOURS, demo.NO_COLOUR), 0) for colour in COLOURS}
    for colour, answer in zip(probe.colours, answers, strict=True):
        confusion[colour][demo.named_colour(answer)] += 1
    correct = demo.sentence_reward(answers, probe.colours)

    outputs = model(**probe.answer_inputs, output_hidden_states=True)
    word_ids = [tokenizer.encode(" " + colour, add_special_tokens=False)[0] for colour in COLOURS]
    p_words = outputs.logits[:, -1].softmax(-1)[:, word_ids]
    p_colour = {
        colour: dict(
            zip(
                COLOURS, p_words[[i for i, c in enumerate(probe.colours) if c == colour]].mean(0).tolist(), strict=True
            )
        )
        for colour in COLOURS
    }
    answer_state = outputs.hidden_states[-1][:, -1]

    inner = model.model
    image_tokens = inner.get_image_features(probe.inputs["pixel_values"], probe.inputs["image_grid_thw"])
    image_tokens = image_tokens.pooler_output if hasattr(image_tokens, "pooler_output") else image_tokens
    vision = torch.stack([tokens.mean(0) for tokens in image_tokens])
    model.train(was_training)
    return {
        "accuracy": sum(correct) / len(correct),
        "per_colour_accuracy": {
            colour: statistics.fmean(r for r, c in zip(correct, probe.colours, strict=True) if c == colour)
            for colour in COLOURS
        },
        "confusion": confusion,
        "p_colour": p_colour,
        "vision": separability(vision, probe.colours),
        "answer_state": separability(answer_state, probe.colours),
    }


class GroupRecorder:
    """A reward function that scores with the demo's and records every group it scores, by step."""

    __name__ = demo.sentence_reward.__name__  # dynamic sampling filters on the reward of this name

    def __init__(self):
        self.step = 1
        self.groups: list[dict[str, Any]] = []

    def __call__(self, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
        rewards = demo.sentence_reward(completions, answer, **kwargs)
        texts = [item if isinstance(item, str) else "".join(m["content"] for m in item) for item in completions]
        size = demo.NUM_GENERATIONS
        for start in range(0, len(rewards), size):
            group = rewards[start : start + size]
            colour = answer[start]
            self.groups.append(
                {
                    "step": self.step,
                    "colour": colour,
                    "mean_reward": statistics.fmean(group),
                    "variance": statistics.pvariance(group),
                    "named_right": sum(demo.named_colour(t) == colour for t in texts[start : start + size]) / size,
                    "named": [demo.named_colour(t) for t in texts[start : start + size]],
                }
            )
        return rewards


def make_probe_callback(recorder: GroupRecorder, processor: Any, probe: Probe, every: int, records: list):
    from transformers import TrainerCallback

    class ProbeCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            recorder.step = state.global_step + 1

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                records.append({"step": state.global_step, **measure(model, processor, probe)})

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if not records or records[-1]["step"] != state.global_step:
                records.append({"step": state.global_step, **measure(model, processor, probe)})

    return ProbeCallback()


def per_colour_training(groups: list[dict[str, Any]], first: int, last: int) -> dict[str, dict[str, float]]:
    """Per true colour, over the groups generated at steps `first` to `last`: groups, informative share, mean
    reward and within-group variance, share of samples naming the right colour."""
    summary = {}
    for colour in COLOURS:
        rows = [g for g in groups if g["colour"] == colour and first <= g["step"] <= last]
        if not rows:
            continue
        summary[colour] = {
            "groups": len(rows),
            "informative": sum(g["variance"] > 0 for g in rows),
            "mean_reward": statistics.fmean(g["mean_reward"] for g in rows),
            "mean_variance": statistics.fmean(g["variance"] for g in rows),
            "named_right": statistics.fmean(g["named_right"] for g in rows),
        }
    return summary


def run_seed(args: DiagnosisArguments, seed: int) -> dict[str, Any]:
    folder = Path(args.output_dir) / f"seed{seed}"
    settings = demo.DemoArguments(steps=args.steps, seed=seed, output_dir=str(folder), spotlight=False)
    with demo.quiet_libraries():
        start = demo.build_warm_start(settings, folder / "warm_start")
        probe = Probe.build(start.processor, args.probe_images, seed=seed + 100)
        records = [{"step": 0, **measure(demo.load_policy(start.folder, start.masked), start.processor, probe)}]
        recorder = GroupRecorder()
        callback = make_probe_callback(recorder, start.processor, probe, args.every, records)
        trainer, summary = demo.timed_training(
            "vppo", settings, start, folder / "vppo", verbose=False, reward_func=recorder, callbacks=[callback]
        )
    windows = [(1, 20), *((s + 1, s + 20) for s in range(20, trainer.state.global_step, 20))]
    result = {
        "seed": seed,
        "summary": summary,
        "probe": records,
        "training_groups": recorder.groups,
        "per_colour_training": {f"{a}-{b}": per_colour_training(recorder.groups, a, b) for a, b in windows},
    }
    path = Path(args.output_dir) / f"seed{seed}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result), flush=True)
    return result


def report(result: dict[str, Any]) -> str:
    """A few lines per seed: the verdict, then per probe point the per-colour accuracy, the probability of the right
    colour word and the weakest pair's d'."""
    summary = result["summary"]
    lines = [
        f"seed {result['seed']}: learned {summary['learned']}, {summary['steps_trained']} steps, held-out accuracy "
        f"{summary['greedy_accuracy_after']:.2f}"
    ]
    for record in result["probe"]:
        right = " ".join(f"{c[0]}{record['p_colour'][c][c]:.2f}" for c in COLOURS)
        accuracy = " ".join(f"{c[0]}{record['per_colour_accuracy'][c]:.2f}" for c in COLOURS)
        vision = record["vision"]
        weakest = min(vision["d_prime"].items(), key=lambda item: abs(item[1]))
        lines.append(
            f"  step {record['step']:>3}: accuracy {accuracy} | P(right word) {right} | vision NC "
            f"{vision['nearest_centroid_accuracy']:.2f}, weakest d' {weakest[0]} {weakest[1]:.1f} | answer-state NC "
            f"{record['answer_state']['nearest_centroid_accuracy']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        DiagnosisArguments, prog="python benchmarks/demo_diagnosis.py", description=__doc__.split("\n")[0]
    )
    (args,) = parser.parse_args_into_dataclasses(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return [run_seed(args, seed) for seed in parse_seeds(args.seeds)]


if __name__ == "__main__":
    main()
