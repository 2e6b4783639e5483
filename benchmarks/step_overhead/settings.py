"""What defines a run: the model presets, the settings both workers share, and the command line that sets them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("grpo", "vppo")

# Model presets. `tiny` is vppo_trl.testing's default model; `small` gives CPU ratios closer to a real run (generation
# no longer dwarfs everything); `7b-arch` is Qwen2.5-VL-7B-Instruct's architecture with random weights.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "text_hidden": 64,
        "text_layers": 2,
        "vision_hidden": 32,
        "vision_layers": 2,
        "image_size": 56,
        "max_completion_length": 16,
        "gradient_checkpointing": False,
    },
    "small": {
        "text_hidden": 384,
        "text_layers": 4,
        "vision_hidden": 128,
        "vision_layers": 2,
        "image_size": 224,
        "max_completion_length": 64,
        "gradient_checkpointing": False,
    },
    "7b-arch": {
        "text_hidden": 3584,
        "text_layers": 28,
        "vision_hidden": 1280,
        "vision_layers": 32,
        "image_size": 448,
        "max_completion_length": 384,
        "gradient_checkpointing": True,
        "vocab_size": 152064,
    },
}


@dataclass
class Settings:
    """Everything that defines one benchmark run; both workers receive the same copy."""

    device: str = "cpu"
    model: str = "tiny"
    steps: int = 8
    warmup: int = 1
    estimator: str = "k3"
    zero_advantage_share: float = 0.0
    skip_zero_advantage: bool = True
    seed: int = 0
    completions: int = 8
    num_generations: int = 4
    num_iterations: int = 1
    max_completion_length: int = 16
    image_size: int = 56
    text_hidden: int = 64
    text_layers: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2
    vocab_size: int | None = None
    head_dim: int = 16
    vllm: bool = False
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    optim: str = "sgd"
    learning_rate: float = 1e-6
    perturbation_reps: int = 10
    threads: int | None = None
    empty_cache_between_turns: bool = True
    turn_timeout_s: float = 1800.0

    @property
    def prompts_per_step(self) -> int:
        return self.completions // self.num_generations

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.step_overhead",
        description="The price of perception: GRPOTrainer and VPPOTrainer steps side by side, with the extra passes "
        "timed apart.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=tuple(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per trainer (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per trainer first")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--estimator", choices=("k3", "kl"), default="k3")
    parser.add_argument(
        "--zero-advantage-share",
        type=float,
        default=0.0,
        help="share of prompt groups whose reward is uniform (advantage 0): VPPO may skip them",
    )
    parser.add_argument(
        "--no-skip-zero-advantage",
        dest="skip_zero_advantage",
        action="store_false",
        help="run VPPO with skip_zero_advantage=False (measure every row)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--completions", type=int, default=8, help="completions per step (per-device batch)")
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument(
        "--num-iterations",
        type=int,
        default=1,
        help="TRL num_iterations; >1 makes TRL compute old_per_token_logps, which VPPO's k3 then reuses",
    )
    parser.add_argument("--max-completion-length", type=int, default=None, help="override the preset")
    parser.add_argument("--image-size", type=int, default=None, help="override the preset (pixels, square)")
    parser.add_argument("--text-layers", type=int, default=None, help="override the preset (e.g. to smoke-test)")
    parser.add_argument("--vision-layers", type=int, default=None, help="override the preset")
    parser.add_argument("--vocab-size", type=int, default=None, help="pad the model vocabulary to this size")
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="generate with a vLLM engine colocated in each worker (TRL's vllm_mode='colocate'); on CPU, vLLM's CPU "
        "build, whose attention needs heads at least 32 wide (tiny and small then use 32)",
    )
    parser.add_argument(
        "--head-dim", type=int, default=None, help="attention head width of tiny and small (16, 32 with --vllm)"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="cpu: float32, cuda: bfloat16")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--optim", default="sgd", help="HF optimiser name; sgd keeps two 7B trainers on one GPU")
    parser.add_argument("--perturbation-reps", type=int, default=10, help="isolated perturbation timings per step")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads per worker (cpu default 1: on a shared CPU, OpenMP barriers make 2+ erratic)",
    )
    parser.add_argument(
        "--empty-cache-between-turns",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cuda: release a worker's cached blocks before it hands over the GPU (two 7B trainers share it)",
    )
    parser.add_argument("--turn-timeout", type=float, default=1800.0, help="seconds to wait for one worker turn")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the workers' logs here")
    # Internal: a worker process.
    parser.add_argument("--worker-role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-settings", help=argparse.SUPPRESS)
    parser.add_argument("--worker-fds", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Merge the preset of `--model` with the command-line overrides and check that they make sense."""
    preset = dict(PRESETS[args.model])
    for name in ("max_completion_length", "image_size", "text_layers", "vision_layers", "vocab_size"):
        value = getattr(args, name)
        if value is not None:
            preset[name] = value
    if args.gradient_checkpointing is not None:
        preset["gradient_checkpointing"] = args.gradient_checkpointing
    if args.model != "7b-arch":  # the 7B architecture's heads are its own (128 wide)
        preset["head_dim"] = args.head_dim or (32 if args.vllm else 16)
    settings = Settings(
        device=args.device,
        model=args.model,
        steps=args.steps,
        warmup=args.warmup,
        estimator=args.estimator,
        zero_advantage_share=args.zero_advantage_share,
        skip_zero_advantage=args.skip_zero_advantage,
        seed=args.seed,
        completions=args.completions,
        num_generations=args.num_generations,
        num_iterations=args.num_iterations,
        dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
        optim=args.optim,
        perturbation_reps=args.perturbation_reps,
        threads=args.threads if args.threads is not None else (1 if args.device == "cpu" else None),
        empty_cache_between_turns=args.empty_cache_between_turns,
        vllm=args.vllm,
        turn_timeout_s=args.turn_timeout,
        **preset,
    )
    if settings.steps < 1 or settings.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if settings.num_generations < 2 or settings.completions % settings.num_generations:
        raise SystemExit("--completions must be a multiple of --num-generations (>= 2)")
    cycle = settings.num_iterations
    if cycle > 1 and (settings.steps % cycle or settings.warmup % cycle):
        raise SystemExit("with --num-iterations N, --steps and --warmup must be multiples of N (whole cycles)")
    if not 0.0 <= settings.zero_advantage_share <= 1.0:
        raise SystemExit("--zero-advantage-share must be in [0, 1]")
    return settings
