"""What a check run is: its command line (one dataclass), the sizes of its parts per preset, and how a time budget
shortens them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

PARTS = ("overhead", "lora", "qwen3", "zero3")


@dataclass
class GpuCheckArguments:
    """
    Arguments of `python -m benchmarks.gpu_check`.

    Args:
        device (`str`, defaults to `"cpu"`):
            `"cuda"` for the check on a GPU, `"cpu"` to run the same sequence on CPU.
        preset (`str`, defaults to `"tiny"`):
            `"real"`: random-init models of the recipes' architectures in bf16 (a GPU is needed); `"tiny"`:
            `vppo_trl.testing`'s tiny models of the same families (minutes on CPU).
        json (`str`, defaults to `"gpu_check.json"`):
            Where the results go; each part's section is written as soon as the part ends.
        budget_s (`float`, *optional*):
            Seconds the whole run may take; parts are shortened (fewer steps) to fit. Defaults to the preset's.
        parts (`list[str]`, defaults to every part):
            Which parts to run, in this order: `overhead`, `lora`, `qwen3`, `zero3`.
        log_dir (`str`, *optional*):
            Keep the logs of the worker processes here (a temporary folder otherwise).
        seed (`int`, defaults to `0`):
            Seed of the models' random weights and of the trainers.
    """

    device: str = field(default="cpu", metadata={"help": "cuda or cpu.", "choices": ["cpu", "cuda"]})
    preset: str = field(
        default="tiny",
        metadata={
            "help": "real: the recipes' architectures (GPU); tiny: tiny models (CPU).",
            "choices": ["tiny", "real"],
        },
    )
    json: str = field(default="gpu_check.json", metadata={"help": "Results file, written after every part."})
    budget_s: float | None = field(
        default=None, metadata={"help": "Seconds for the whole run; parts are shortened to fit (preset default)."}
    )
    parts: list[str] = field(
        default_factory=lambda: list(PARTS), metadata={"help": f"Parts to run, among {list(PARTS)}."}
    )
    log_dir: str | None = field(default=None, metadata={"help": "Keep the worker processes' logs here."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and of the trainers."})

    def __post_init__(self):
        unknown = [part for part in self.parts if part not in PARTS]
        if unknown:
            raise ValueError(f"unknown part(s) {unknown}; choose among {list(PARTS)}")
        if self.preset == "real" and self.device != "cuda":
            raise ValueError("--preset real builds 3-8B models in bf16: it needs --device cuda")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ValueError(f"--budget_s must be positive, got {self.budget_s}")

    @property
    def json_path(self) -> Path:
        return Path(self.json)


@dataclass(frozen=True)
class PartPlan:
    """A part's size and its expected time: `setup_s` (processes, models, checkpoints) plus `steps` x `step_s`.

    The real preset's times are estimates for one H100/H200 from the step-overhead benchmark's H100 figures (a 7B
    step of 8 x 256 tokens took 11-13 s; these parts generate 8 x 128 or fewer); the tiny preset's were measured
    on a loaded 2-core CPU.
    """

    steps: int
    setup_s: float
    step_s: float
    min_steps: int = 1
    text_layers: int | None = None
    vision_layers: int | None = None
    image_size: int = 56
    completion_length: int = 8

    @property
    def expected_s(self) -> float:
        return self.setup_s + self.steps * self.step_s

    def within(self, seconds: float) -> PartPlan:
        """This plan with as many steps as fit in `seconds` (at least `min_steps`, at most `steps`)."""
        fit = math.floor((seconds - self.setup_s) / self.step_s) if self.step_s else self.steps
        return replace(self, steps=max(self.min_steps, min(self.steps, fit)))


# overhead: measured steps per trainer in each of its two runs (one warm-up step each; setup and step times count
# both runs and both trainers). zero3: steps before the checkpoint; the resumed run trains one more.
PLANS: dict[str, dict[str, PartPlan]] = {
    "real": {
        "overhead": PartPlan(
            steps=3, setup_s=2 * 55, step_s=2 * 13, min_steps=1, image_size=448, completion_length=128
        ),
        "lora": PartPlan(steps=3, setup_s=25, step_s=8, image_size=448, completion_length=128),
        "qwen3": PartPlan(steps=3, setup_s=30, step_s=9, image_size=448, completion_length=128),
        # The 7B widths and vocabulary at 2 text and 8 vision layers (2.2B parameters): AdamW's states for the whole
        # 7B model would not fit one GPU, nor its checkpoint (about 100 GB) the disk and the time.
        "zero3": PartPlan(
            steps=2, setup_s=130, step_s=4, text_layers=2, vision_layers=8, image_size=448, completion_length=64
        ),
    },
    "tiny": {
        # 2 measured steps: tests/test_benchmark_smoke.py reads this part's step_overhead summary as the benchmark's.
        "overhead": PartPlan(steps=2, setup_s=2 * 60, step_s=2 * 6, completion_length=16),
        "lora": PartPlan(steps=2, setup_s=12, step_s=4),
        "qwen3": PartPlan(steps=2, setup_s=2, step_s=1),
        "zero3": PartPlan(steps=2, setup_s=100, step_s=3),
    },
}
DEFAULT_BUDGET_S = {"real": 480.0, "tiny": 420.0}
