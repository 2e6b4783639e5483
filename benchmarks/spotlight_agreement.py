"""How close the spotlight's dependencies, kept tokens and TAS scales are to training's, in float32 and under bf16.

`python benchmarks/spotlight_agreement.py` builds the tiny Qwen2.5-VL, generates one group of 8 completions (up to 16
tokens) as training does, and measures its token dependencies twice with the same perturbation draws: as
VPPOTrainer measures them (TRL's forward, under the trainer's autocast: none with `bf16=False`, bf16 on CPU with
`bf16=True`), and as the spotlight does (`token_perception`: the language backbone and the LM head in the model's
float32). Both sets go through the shaping function training calls (`shape_group`, here with the cold-start guard
on and part-open, so that its blend and balance take part). It prints, per estimator, precision and seed, the largest
and median difference of the dependencies, how many kept tokens differ and the largest difference of the TAS scales.
`docs/design.md` quotes the figures.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vppo_trl import VPPOConfig, VPPOTrainer  # noqa: E402
from vppo_trl.testing import COLOURS, build_tiny_vlm, make_colour_dataset  # noqa: E402
from vppo_trl.tools.spotlight import measurement_settings, shape_group, token_perception  # noqa: E402

COMPLETIONS = 8
ADVANTAGES = [1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 0.25, -0.25]


def length_reward(completions, **kwargs) -> list[float]:
    return [float(len(str(completion)) % 3) for completion in completions]


def agreement(estimator: str, bf16: bool, seed: int, output_dir: str) -> dict[str, float]:
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, seed=seed)
    dataset = make_colour_dataset(4, seed=3 + seed)
    args = VPPOConfig(
        output_dir=output_dir, per_device_train_batch_size=COMPLETIONS, num_generations=COMPLETIONS,
        max_completion_length=16, report_to="none", use_cpu=True, bf16=bf16, dependency_estimator=estimator, seed=5,
        cold_start_guard=True, cold_start_guard_floor=1e-4, cold_start_guard_full=1e-2,
    )  # fmt: skip
    trainer = VPPOTrainer(
        model=model, reward_funcs=length_reward, args=args, train_dataset=dataset, processing_class=processor
    )
    trainer.model.train()
    batch = trainer._generate_and_score_round([dict(dataset[0])] * COMPLETIONS)
    mask = batch["completion_mask"]
    trainer.shared.perturbation_round = 1  # the spotlight's first draw is the first round's
    with trainer.accelerator.autocast():  # what accelerate wraps the prepared model's forward in during training
        measured, _ = trainer._visual_dependency(batch, list(range(COMPLETIONS)), mask)
    settings = measurement_settings(args)
    spotlight, training = [], []
    for row in range(COMPLETIONS):
        ids = batch["completion_ids"][row][mask[row].bool()].tolist()
        perception = token_perception(
            trainer.model, processor, dataset[0]["prompt"], dataset[0]["images"], completion=ids, settings=settings,
            seed=args.seed, completion_index=row,
        )  # fmt: skip
        spotlight.append(perception.dependency)
        training.append(measured[row][: len(ids)].tolist())
    ours, theirs = shape_group(settings, spotlight, ADVANTAGES), shape_group(settings, training, ADVANTAGES)
    values = torch.tensor([value for row in training for value in row])
    errors = (torch.tensor([value for row in spotlight for value in row]) - values).abs()
    relative = errors / values.abs().clamp(min=1e-12)
    return {
        "tokens": values.numel(),
        "mean_dependency": values.mean().item(),
        "max_abs_difference": errors.max().item(),
        "median_relative_difference": relative.median().item(),
        "kept_tokens_differing": int((ours.keep != theirs.keep).sum()),
        "kept_tokens": int(theirs.keep.sum()),
        "max_scale_difference": (ours.scales - theirs.scales).abs().max().item(),
        "openness": theirs.openness,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--output-dir", default="spotlight_agreement_output")
    args = parser.parse_args(argv)
    for estimator in ("k3", "kl"):
        for bf16 in (False, True):
            for seed in args.seeds:
                result = agreement(estimator, bf16, seed, args.output_dir)
                precision = "bf16" if bf16 else "fp32"
                print(
                    f"{estimator} {precision} seed {seed}: {result['tokens']} tokens, mean dependency "
                    f"{result['mean_dependency']:.3g}; largest difference {result['max_abs_difference']:.3g}, median "
                    f"relative {result['median_relative_difference']:.3g}; kept tokens differing "
                    f"{result['kept_tokens_differing']} of {result['kept_tokens']}; largest TAS scale difference "
                    f"{result['max_scale_difference']:.3g} (guard openness {result['openness']:.3f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
