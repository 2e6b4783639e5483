"""The price of perception: GRPOTrainer and VPPOTrainer steps side by side, with the extra passes timed apart.

VPPO's only extra cost is scoring each generation batch a second time on perturbed images. This script measures it
against its floor, one plain no-grad forward of the same batch, with everything else equal:

- two worker processes, one GRPOTrainer and one VPPOTrainer, each running its own real ``trainer.train()`` loop
  (optimiser, gradient clipping, scheduler and logging included), built from the same seed (same initial weights,
  checked by a fingerprint), the same data in the same order, the same settings;
- steps interleaved GRPO, VPPO, GRPO, ... by a baton: a worker blocks in ``on_step_end`` until the driver hands it
  the next turn, so only one trainer ever runs at a time and nothing of one leaks into the other's timers;
- completions of one fixed length (``min_new_tokens = max_new_tokens``; asserted on every batch);
- synchronised timers (``torch.cuda.synchronize`` on GPU) around the step and around wrapped trainer methods.

Why two processes rather than one: a peak-memory figure is per process (``torch.cuda.max_memory_allocated``, peak
RSS), so one process holding both trainers could not tell their peaks apart, and the trainers would share
process-wide state (global RNG, accelerate's GradientState). Separate processes keep each figure its own.

Usage::

    python benchmarks/step_overhead.py --device cpu --model tiny --steps 8 --json tiny.json
    python benchmarks/step_overhead.py --device cuda --model 7b-arch --steps 8 --warmup 2 --json k3.json

See benchmarks/README.md for the GPU commands and benchmarks/RESULTS.md for figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import re
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("grpo", "vppo")
FAMILY = "qwen2_5_vl"

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

# Qwen2.5-VL-7B-Instruct's config.json values (the model cannot be downloaded here; weights are random).
QWEN25_VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN25_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "hidden_act": "silu",
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "initializer_range": 0.02,
}
QWEN25_VL_7B_VOCAB = 152064

# Keys that the benchmark JSON always carries (the smoke test checks them).
REQUIRED_KEYS = (
    "grpo_step_s",
    "vppo_step_s",
    "ratio",
    "grpo_generation_s",
    "vppo_generation_s",
    "grpo_train_side_s",
    "vppo_train_side_s",
    "perturbed_pass_s",
    "forward_pass_s",
    "overhead_efficiency",
    "grpo_peak_mem_bytes",
    "vppo_peak_mem_bytes",
    "skipped_fraction",
    "perturbation_s",
    "settings",
    "device_name",
    "versions",
    "date",
    "raw",
)


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
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    optim: str = "sgd"
    learning_rate: float = 1e-6
    perturbation_reps: int = 10
    threads: int | None = None
    empty_cache_between_turns: bool = True
    turn_timeout_s: float = 1800.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompts_per_step(self) -> int:
        return self.completions // self.num_generations

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


# ---------------------------------------------------------------------------------------------------------------
# Driver: two workers, one baton
# ---------------------------------------------------------------------------------------------------------------


class WorkerProcess:
    """One trainer in its own process, spoken to with JSON lines over a pair of pipes."""

    def __init__(self, role: str, settings: Settings, log_path: Path, script: Path):
        self.role = role
        self.log_path = log_path
        self.timeout = settings.turn_timeout_s
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        command = [
            sys.executable,
            str(script),
            "--worker-role",
            role,
            "--worker-settings",
            json.dumps(asdict(settings)),
            "--worker-fds",
            f"{to_worker_r},{from_worker_w}",
        ]
        self.log = open(log_path, "w")  # closed in close(): it lives as long as the worker
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(to_worker_r, from_worker_w), env=env
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self.to_worker = os.fdopen(to_worker_w, "w")
        self.from_worker_fd = from_worker_r
        self.buffer = b""

    def send(self, message: dict) -> None:
        self.to_worker.write(json.dumps(message) + "\n")
        self.to_worker.flush()

    def receive(self, event: str) -> dict:
        """Wait for the next message, which must be `event`; fail with the worker's log tail if it died."""
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buffer:
            if time.monotonic() > deadline:
                self.fail(f"no '{event}' within {self.timeout:.0f} s")
            ready, _, _ = select.select([self.from_worker_fd], [], [], 1.0)
            if ready:
                chunk = os.read(self.from_worker_fd, 1 << 16)
                if not chunk:
                    self.process.wait(timeout=60)
                    self.fail(f"exited with code {self.process.returncode} before '{event}'")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        if message.get("event") == "error":
            self.fail(message.get("error", "unknown error"))
        if message.get("event") != event:
            self.fail(f"expected '{event}', got {message.get('event')!r}")
        return message

    def fail(self, reason: str) -> None:
        self.log.flush()
        tail = self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""
        raise RuntimeError(f"{self.role} worker: {reason}\n--- log tail ({self.log_path}) ---\n{tail}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        with contextlib.suppress(OSError):  # a dead worker's pipe
            self.to_worker.close()
        os.close(self.from_worker_fd)
        self.log.close()


def run_benchmark(
    settings: Settings, log_dir: Path, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Start both workers, hand the baton GRPO, VPPO, GRPO, ... and collect every step's record.

    `on_progress` gets the run so far after each GRPO/VPPO pair, so that a run cut short still leaves figures.
    """
    script = Path(__file__).resolve()
    load_start = os.getloadavg()
    git_state = _git_state()
    started = time.time()
    workers = {role: WorkerProcess(role, settings, log_dir / f"{role}.log", script) for role in ROLES}
    try:
        # Set-up (imports, model, trainer, accelerate) runs in both at once: nothing is timed until both are ready.
        ready = {role: worker.receive("ready") for role, worker in workers.items()}
        fingerprints = {role: message["fingerprint"] for role, message in ready.items()}
        if fingerprints["grpo"] != fingerprints["vppo"]:
            # Costs do not depend on weight values (same shapes, fixed lengths), so go on, but say so loudly.
            print(f"WARNING: the two trainers start from different weights: {fingerprints}", file=sys.stderr)
        records: dict[str, list[dict]] = {role: [] for role in ROLES}
        run = {"ready": ready, "records": records, "finished": {}, "load_average_start": load_start, "git": git_state}
        run["fingerprints"] = fingerprints
        for _ in range(settings.total_steps):
            for role in ROLES:
                workers[role].send({"cmd": "go"})
                records[role].append(workers[role].receive("step"))
            if on_progress is not None:
                on_progress({**run, "load_average_end": os.getloadavg(), "wall_s": time.time() - started})
        finished = {}
        for role in ROLES:  # one after the other, so that their shutdowns do not overlap either
            workers[role].send({"cmd": "finish"})
            finished[role] = workers[role].receive("finished")
            workers[role].process.wait(timeout=300)
    finally:
        for worker in workers.values():
            worker.close()
    return {
        "ready": ready,
        "records": records,
        "finished": finished,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_s": time.time() - started,
        "fingerprints": fingerprints,
        "git": git_state,
    }


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(settings: Settings, run: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """Medians over the measured steps; VPPO's extra passes only happen on steps that generate, so train-side
    figures (and the overhead) are taken over generating steps (all of them when num_iterations = 1)."""
    # Pairs only: a run cut short may hold one more GRPO step than VPPO steps.
    pairs = min(len(run["records"][role]) for role in ROLES)
    measured = {role: [r for r in run["records"][role][:pairs] if not r["warmup"]] for role in ROLES}
    generating = {role: [r for r in measured[role] if r["generated"]] for role in ROLES}

    def med(role: str, key: str, rows: dict[str, list[dict]] = generating) -> float | None:
        return _median([r.get(key) for r in rows[role]])

    grpo_train, vppo_train = med("grpo", "train_side_s"), med("vppo", "train_side_s")
    forward = med("vppo", "forward_pass_s")
    overhead = None if grpo_train is None or vppo_train is None else vppo_train - grpo_train
    paired = [
        (v["train_side_s"] - g["train_side_s"]) / v["forward_pass_s"]
        for g, v in zip(generating["grpo"], generating["vppo"], strict=False)
        if v.get("forward_pass_s")
    ]
    grpo_peak = max((r["peak_mem_bytes"] for r in measured["grpo"]), default=None)
    vppo_peak = max((r["peak_mem_bytes"] for r in measured["vppo"]), default=None)
    skipped = [r["vppo"]["skipped_fraction"] for r in generating["vppo"] if r["vppo"]["skipped_fraction"] is not None]
    vppo_rows = [r["vppo"] for r in generating["vppo"]]
    finished, ready = run["finished"], run["ready"]
    complete = all(role in finished for role in ROLES)
    import_versions = ready["vppo"]["versions"]
    if settings.num_iterations == 1:
        grpo_step, vppo_step = med("grpo", "step_s", measured), med("vppo", "step_s", measured)
    else:
        # Generating and reusing steps alternate: a median of the mix means nothing, the mean over cycles does.
        grpo_step = statistics.fmean(r["step_s"] for r in measured["grpo"]) if measured["grpo"] else None
        vppo_step = statistics.fmean(r["step_s"] for r in measured["vppo"]) if measured["vppo"] else None
    summary: dict[str, Any] = {
        "complete": complete,
        "measured_steps": {role: len(measured[role]) for role in ROLES},
        "grpo_step_s": grpo_step,
        "vppo_step_s": vppo_step,
        "ratio": _div(vppo_step, grpo_step),
        "grpo_generation_s": med("grpo", "generation_s"),
        "vppo_generation_s": med("vppo", "generation_s"),
        "grpo_train_side_s": grpo_train,
        "vppo_train_side_s": vppo_train,
        "train_side_overhead_s": overhead,
        "perturbed_pass_s": _median([r["perturbed_forward_s"] for r in vppo_rows]),
        "original_forward_s": _median([r["original_forward_s"] for r in vppo_rows if r["original_forwards"]]),
        "original_forwards_per_step": _median([r["original_forwards"] for r in vppo_rows]),
        "perturbed_forwards_per_step": _median([r["perturbed_forwards"] for r in vppo_rows]),
        "original_forward_steps_fraction": (
            sum(1 for r in vppo_rows if r["original_forwards"]) / len(vppo_rows) if vppo_rows else None
        ),
        "kl_head_s": _median([r["kl_head_s"] for r in vppo_rows]) if settings.estimator == "kl" else None,
        "visual_dependency_s": _median([r["visual_dependency_s"] for r in vppo_rows]),
        "apply_visual_dependency_s": _median([r["apply_s"] for r in vppo_rows]),
        "perturbation_in_step_s": _median([r["perturbation_in_step_s"] for r in vppo_rows]),
        "select_rows_s": _median([r["select_rows_s"] for r in vppo_rows]),
        "measured_rows_fraction": _median([r["measured_rows_fraction"] for r in vppo_rows]),
        "forward_pass_s": forward,
        "grpo_forward_pass_s": med("grpo", "forward_pass_s"),
        "overhead_efficiency": _div(overhead, forward),
        "overhead_efficiency_paired_median": _median(paired),
        # VPPO's own code timed directly (less noisy than a difference of two step medians, blind to side effects).
        "apply_efficiency": _median(
            [r["vppo"]["apply_s"] / r["forward_pass_s"] for r in generating["vppo"] if r.get("forward_pass_s")]
        ),
        "grpo_loss_s": med("grpo", "compute_loss_s"),
        "vppo_loss_s": med("vppo", "compute_loss_s"),
        "grpo_scoring_s": med("grpo", "scoring_s"),
        "vppo_scoring_s": med("vppo", "scoring_s"),
        "grpo_nograd_forwards_per_step": med("grpo", "nograd_forwards"),
        "vppo_nograd_forwards_per_step": med("vppo", "nograd_forwards"),
        "grpo_peak_mem_bytes": grpo_peak,
        "vppo_peak_mem_bytes": vppo_peak,
        "peak_mem_ratio": _div(vppo_peak, grpo_peak),
        "vppo_dependency_phase_peak_mem_bytes": max(
            (r["vppo"]["apply_peak_mem_bytes"] for r in generating["vppo"]), default=None
        ),
        "memory_measure": (
            "torch.cuda.max_memory_allocated per step (reset at on_step_begin), max over measured steps"
            if settings.device == "cuda"
            else "peak RSS (VmHWM) per step, reset at on_step_begin via /proc/self/clear_refs, max over measured "
            "steps; whole process (Python, libraries, dataset), one process per trainer"
        ),
        "process_max_rss_bytes": {role: finished.get(role, {}).get("max_rss_bytes") for role in ROLES},
        "skipped_fraction": statistics.fmean(skipped) if skipped else None,
        "skipped_fraction_per_step": [r["vppo"]["skipped_fraction"] for r in measured["vppo"]],
        "perturbation_s": _median([r["perturbation_s"] for r in measured["vppo"]]),
        "completion_length": settings.max_completion_length,
        "completion_lengths_fixed": all(r["lengths_fixed"] for role in ROLES for r in run["records"][role]),
        "settings": asdict(settings),
        "command": ["python", "benchmarks/step_overhead.py", *argv],
        "device_name": ready["vppo"]["device_name"],
        "cpu_name": ready["vppo"]["cpu_name"],
        "cpu_count": os.cpu_count(),
        "torch_threads": ready["vppo"]["torch_threads"],
        "versions": import_versions,
        "git": run.get("git"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": run["load_average_start"],
        "load_average_end": run["load_average_end"],
        "wall_s": run["wall_s"],
        "weights_fingerprints": run["fingerprints"],
        "weights_identical": run["fingerprints"]["grpo"] == run["fingerprints"]["vppo"],
        "model_parameters": ready["vppo"]["parameters"],
        "raw": run["records"],
        "notes": [
            "step = on_step_begin..on_step_end of HF Trainer's loop: generation, scoring, VPPO's passes, loss forward "
            "and backward, gradient clipping, optimiser step; timers synchronise the device",
            "generation = GRPOTrainer._generate (prompt tokenisation and image processing, model.generate, decoding); "
            "train side = step - generation",
            "forward_pass_s = one no-grad _get_per_token_logps_and_entropies over the whole generation batch (chunked "
            "by per_device_train_batch_size, gradient checkpointing off), run after the step, not counted in it",
            "perturbed_pass_s = VPPO's forward on the perturbed images (rows it measured); original_forward_s = its "
            "forward on the original images, needed by k3 when TRL did not compute old_per_token_logps, and by kl",
            "perturbation_s = VPPOTrainer._perturbed_pixel_values on the step's batch, median of isolated repeats",
        ],
    }
    missing = [key for key in REQUIRED_KEYS if key not in summary]
    if missing:
        raise RuntimeError(f"summary lacks {missing}")
    return summary


def _git_state() -> dict[str, Any]:
    """The commit measured, and whether the package had uncommitted changes (figures belong to a code state)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    changed = git("status", "--porcelain", "--untracked-files=no", "vppo_trl")
    return {"commit": git("rev-parse", "HEAD"), "package_modified": changed.splitlines() if changed else []}


def _fmt(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "n/a"
    if unit == "B":
        return f"{value / 2**20:.1f} MiB"
    if unit == "x":
        return f"{value:.3f}"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"


def print_summary(summary: dict[str, Any]) -> None:
    rows = [
        ("step (GRPO / VPPO)", f"{_fmt(summary['grpo_step_s'])} / {_fmt(summary['vppo_step_s'])}"),
        ("ratio VPPO/GRPO", _fmt(summary["ratio"], "x")),
        ("generation", f"{_fmt(summary['grpo_generation_s'])} / {_fmt(summary['vppo_generation_s'])}"),
        ("train side", f"{_fmt(summary['grpo_train_side_s'])} / {_fmt(summary['vppo_train_side_s'])}"),
        ("train-side overhead", _fmt(summary["train_side_overhead_s"])),
        ("reference forward (floor)", _fmt(summary["forward_pass_s"])),
        ("perturbed pass", _fmt(summary["perturbed_pass_s"])),
        (
            "original-image pass",
            f"{_fmt(summary['original_forward_s'])} x {summary['original_forwards_per_step']} per step",
        ),
        ("whole _apply_visual_dependency", _fmt(summary["apply_visual_dependency_s"])),
        ("overhead efficiency", _fmt(summary["overhead_efficiency"], "x")),
        ("peak memory", f"{_fmt(summary['grpo_peak_mem_bytes'], 'B')} / {_fmt(summary['vppo_peak_mem_bytes'], 'B')}"),
        ("peak memory ratio", _fmt(summary["peak_mem_ratio"], "x")),
        ("skipped fraction", _fmt(summary["skipped_fraction"], "x")),
        ("perturbation", _fmt(summary["perturbation_s"])),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{summary['device_name']} | load {summary['load_average_start']} -> {summary['load_average_end']}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker_role:
        run_worker(args.worker_role, Settings(**json.loads(args.worker_settings)), args.worker_fds)
        return None
    settings = resolve_settings(args)

    def write(summary: dict[str, Any]) -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=1) + "\n")

    def progress(run: dict[str, Any]) -> None:
        if any(not r["warmup"] for r in run["records"]["vppo"]):
            write(summarise(settings, run, argv))  # "complete": false until the end

    with tempfile.TemporaryDirectory(prefix="step_overhead_") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        run = run_benchmark(settings, log_dir, progress)
    summary = summarise(settings, run, argv)
    write(summary)
    print_summary(summary)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Worker: one trainer, instrumented
# ---------------------------------------------------------------------------------------------------------------


class Channel:
    """The worker's end of the baton: JSON lines in, JSON lines out."""

    def __init__(self, fds: str):
        read_fd, write_fd = (int(fd) for fd in fds.split(","))
        self.inbox = os.fdopen(read_fd, "r")
        self.outbox = os.fdopen(write_fd, "w")

    def send(self, message: dict) -> None:
        self.outbox.write(json.dumps(message) + "\n")
        self.outbox.flush()

    def wait_for(self, command: str) -> None:
        line = self.inbox.readline()
        if not line:
            raise SystemExit("the driver went away")
        received = json.loads(line).get("cmd")
        if received != command:
            raise RuntimeError(f"expected command {command!r}, got {received!r}")


class Memory:
    """Per-segment peak memory: CUDA allocator peak on GPU, the process's peak RSS (resettable VmHWM) on CPU."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.can_reset_rss = False
        if not self.cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.can_reset_rss = True
            except OSError:
                self.can_reset_rss = False

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        elif self.can_reset_rss:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.cuda:
            return int(self.torch.cuda.max_memory_allocated())
        if self.can_reset_rss:
            match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def current(self) -> int:
        if self.cuda:
            return int(self.torch.cuda.memory_allocated())
        match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) * 1024 if match else 0


class Recorder:
    """Timings of wrapped trainer methods during one step, with device synchronisation around each."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.memory = Memory(device)
        self.times: dict[str, list[float]] = defaultdict(list)
        self.values: dict[str, Any] = {}
        self.segment_peaks: list[int] = []
        self.perturbed_inputs: set[int] = set()
        self.last_perturbed: Any = None
        self.batch: dict[str, Any] | None = None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def start_step(self) -> None:
        self.times.clear()
        self.values.clear()
        self.segment_peaks.clear()
        self.perturbed_inputs.clear()
        self.last_perturbed = None
        self.batch = None

    def timed(self, name: str | Callable[..., str], fn: Callable, condition: Callable[[], bool] | None = None):
        """`fn` wrapped so that each call's synchronised duration is appended to `times[name]`."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if condition is not None and not condition():
                return fn(*args, **kwargs)
            label = name(*args, **kwargs) if callable(name) else name
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.times[label].append(time.perf_counter() - start)

        return wrapper

    def total(self, name: str) -> float:
        return float(sum(self.times.get(name, [])))

    def count(self, name: str) -> int:
        return len(self.times.get(name, []))


def _versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def qwen25_vl_7b_arch_config(tokenizer, text_layers: int = 28, vision_layers: int = 32, vocab_size: int | None = None):
    """Qwen2.5-VL-7B-Instruct's config, with the local tokenizer's special-token ids.

    The tokenizer has ~1.5k tokens; the vocabulary is padded to 152064 like the real checkpoint, so that the
    embedding and the LM head cost what they cost there. Fewer layers (smoke tests only) keep the real spacing of
    the full-attention vision blocks.
    """
    from transformers import Qwen2_5_VLConfig

    vocab = tokenizer.get_vocab()
    endoftext, im_end = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    text = dict(QWEN25_VL_7B_TEXT)
    text.update(
        vocab_size=max(vocab_size or QWEN25_VL_7B_VOCAB, len(tokenizer)),
        num_hidden_layers=text_layers,
        max_window_layers=text_layers,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
    )
    vision = dict(QWEN25_VL_7B_VISION)
    full = [i for i in QWEN25_VL_7B_VISION["fullatt_block_indexes"] if i < vision_layers] or [vision_layers - 1]
    vision.update(depth=vision_layers, fullatt_block_indexes=full)
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_qwen25_vl_7b_arch(tokenizer, settings: Settings):
    """The 7B architecture with random weights, initialised directly on the device in `settings.dtype` (a CPU
    fp32 copy of 8.3B parameters would take 33 GB and minutes)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen25_vl_7b_arch_config(tokenizer, settings.text_layers, settings.vision_layers, settings.vocab_size)
    torch.manual_seed(settings.seed)
    if settings.device == "cuda":
        torch.cuda.manual_seed_all(settings.seed)
    with torch.device(settings.device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=getattr(torch, settings.dtype))
    model.eval()
    generation = model.generation_config
    generation.bos_token_id = config.text_config.bos_token_id
    generation.eos_token_id = [config.text_config.eos_token_id, config.text_config.bos_token_id]
    generation.pad_token_id = config.text_config.pad_token_id
    return model


def build_policy(settings: Settings):
    """Model and processor for the preset; the same seed gives the same weights in both workers."""
    import torch

    from vppo_trl.testing import build_model, build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    processor = build_processor(FAMILY, tokenizer, image_size=settings.image_size)
    dtype = getattr(torch, settings.dtype)
    if settings.model == "7b-arch":
        model = build_qwen25_vl_7b_arch(tokenizer, settings)
    else:
        model = build_model(
            FAMILY,
            tokenizer,
            seed=settings.seed,
            text_hidden=settings.text_hidden,
            text_layers=settings.text_layers,
            vision_hidden=settings.vision_hidden,
            vision_layers=settings.vision_layers,
            dtype=dtype,
        )
        if settings.vocab_size and settings.vocab_size > len(tokenizer):
            torch.manual_seed(settings.seed + 1)
            model.resize_token_embeddings(settings.vocab_size, mean_resizing=False)
    return model, processor


def fingerprint(model) -> str:
    """A digest of every parameter, to check that both workers start from the same weights."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            p = parameter.detach()
            sums = (p.sum(dtype=torch.float64).item(), p.abs().sum(dtype=torch.float64).item())
            digest.update(name.encode())
            digest.update(repr(sums).encode())
    return digest.hexdigest()[:16]


def uniform_prompt(index: int, share: float) -> bool:
    """Whether prompt `index` gets a uniform reward: exactly `share` of any run of consecutive prompts (Bresenham),
    so with an unshuffled dataset every step holds the same number of uniform groups."""
    return int((index + 1) * share) > int(index * share)


def make_reward(share: float) -> Callable[..., list[float]]:
    """Reward 1 for every completion of a 'uniform' prompt (advantage exactly 0), else 1 for the first completion of
    the group and 0 for the others (every advantage non-zero, whatever G)."""

    def benchmark_reward(completions: list, prompt_index: list[int], **kwargs: Any) -> list[float]:
        seen: set[int] = set()
        rewards = []
        for index in prompt_index:
            if uniform_prompt(index, share):
                rewards.append(1.0)
            else:
                rewards.append(0.0 if index in seen else 1.0)
                seen.add(index)
        return rewards

    return benchmark_reward


def run_worker(role: str, settings: Settings, fds: str) -> None:
    channel = Channel(fds)
    try:
        _run_worker(role, settings, channel)
    except BaseException as error:  # report, so that the driver does not wait for nothing
        import traceback

        traceback.print_exc()
        try:
            channel.send({"event": "error", "error": f"{type(error).__name__}: {error}"})
        except OSError:
            pass
        raise


def _run_worker(role: str, settings: Settings, channel: Channel) -> None:
    import torch
    from transformers import TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing

    from vppo_trl import VPPOConfig, VPPOTrainer
    from vppo_trl.testing import make_colour_dataset, suppressed_token_ids

    device = settings.device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no GPU")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    set_seed(settings.seed)
    model, processor = build_policy(settings)
    model_fingerprint = fingerprint(model)
    parameters = sum(p.numel() for p in model.parameters())

    rows = settings.prompts_per_step * settings.total_steps * settings.num_iterations + settings.prompts_per_step
    dataset = make_colour_dataset(max(rows, 16), seed=settings.seed, size=settings.image_size)
    dataset = dataset.add_column("prompt_index", list(range(len(dataset))))
    length = settings.max_completion_length
    output_dir = tempfile.mkdtemp(prefix=f"step_overhead_{role}_")
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=settings.completions,
        gradient_accumulation_steps=1,
        num_generations=settings.num_generations,
        num_iterations=settings.num_iterations,
        max_completion_length=length,
        # Fixed-length completions: EOS is masked until max_new_tokens; vision tokens are never sampled.
        generation_kwargs={"min_new_tokens": length, "suppress_tokens": suppressed_token_ids(processor)},
        max_steps=settings.total_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        optim=settings.optim,
        shuffle_dataset=False,
        gradient_checkpointing=settings.gradient_checkpointing,
        bf16=settings.dtype == "bfloat16",
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=settings.seed,
        dataloader_num_workers=0,
    )
    if role == "grpo":
        args = GRPOConfig(**common)
        trainer_cls = GRPOTrainer
    else:
        args = VPPOConfig(
            **common,
            dependency_estimator=settings.estimator,
            skip_zero_advantage=settings.skip_zero_advantage,
        )
        trainer_cls = VPPOTrainer
    trainer = trainer_cls(
        model=model,
        reward_funcs=make_reward(settings.zero_advantage_share),
        args=args,
        train_dataset=dataset,
        processing_class=processor,
    )
    recorder = Recorder(device)
    originals = instrument(trainer, recorder, role, length)
    memory = recorder.memory

    def reference_forward(batch: dict[str, Any]) -> float:
        """One plain no-grad forward of the generation batch through TRL's log-prob path: the floor."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        keys = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "mm_token_type_ids")
        extra = {key: batch[key] for key in keys if batch.get(key) is not None}
        with torch.no_grad(), disable_gradient_checkpointing(trainer.model, args.gradient_checkpointing_kwargs):
            recorder.sync()
            start = time.perf_counter()
            originals["_get_per_token_logps_and_entropies"](
                trainer.model,
                input_ids,
                attention_mask,
                batch["completion_ids"].size(1),
                batch_size=args.per_device_train_batch_size,
                num_images=batch.get("num_images"),
                **extra,
            )
            recorder.sync()
        return time.perf_counter() - start

    def perturbation_time(batch: dict[str, Any]) -> float | None:
        if role != "vppo" or "pixel_values" not in batch:
            return None
        timings = []
        for _ in range(settings.perturbation_reps):
            recorder.sync()
            start = time.perf_counter()
            originals["_perturbed_pixel_values"](batch)
            recorder.sync()
            timings.append(time.perf_counter() - start)
        return statistics.median(timings)

    class Baton(TrainerCallback):
        """Blocks the train loop between steps until the driver hands this trainer its turn."""

        def on_train_begin(self, args, state, control, **kwargs):
            channel.send(
                {
                    "event": "ready",
                    "fingerprint": model_fingerprint,
                    "parameters": parameters,
                    "versions": _versions(),
                    "device_name": torch.cuda.get_device_name() if device == "cuda" else f"CPU: {_cpu_name()}",
                    "cpu_name": _cpu_name(),
                    "torch_threads": torch.get_num_threads(),
                }
            )
            self._wait("go")

        def on_step_begin(self, args, state, control, **kwargs):
            recorder.start_step()
            recorder.sync()
            self.mem_begin = memory.current()
            memory.reset()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.sync()
            step_s = time.perf_counter() - self.start
            peak = max([memory.peak(), *recorder.segment_peaks])
            batch = recorder.batch
            generation_s = recorder.total("generate")
            record = {
                "event": "step",
                "step": state.global_step,
                "warmup": state.global_step <= settings.warmup,
                "generated": batch is not None,
                "step_s": step_s,
                "generation_s": generation_s,
                "generate_model_s": recorder.total("generate_model"),
                "train_side_s": step_s - generation_s,
                "scoring_s": recorder.total("generate_and_score") - generation_s,
                "compute_loss_s": recorder.total("compute_loss"),
                "nograd_forwards": recorder.count("nograd_forward"),
                "nograd_forward_s": recorder.total("nograd_forward"),
                "peak_mem_bytes": peak,
                "mem_at_step_begin_bytes": self.mem_begin,
                "lengths_fixed": recorder.values.get("lengths_fixed", True),
                "vppo": vppo_record(recorder) if role == "vppo" else None,
            }
            # Untimed extras, still inside this trainer's turn: the floor and the isolated perturbation.
            record["forward_pass_s"] = reference_forward(batch) if batch is not None else None
            record["perturbation_s"] = perturbation_time(batch) if batch is not None else None
            recorder.batch = None
            channel.send(record)
            if device == "cuda" and settings.empty_cache_between_turns:
                torch.cuda.empty_cache()
            self._wait("go" if state.global_step < settings.total_steps else "finish")

        def _wait(self, command: str) -> None:
            channel.wait_for(command)

    trainer.add_callback(Baton())
    try:
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    channel.send({"event": "finished", "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def vppo_record(recorder: Recorder) -> dict[str, Any]:
    """What VPPO's own passes cost in this step."""
    original = recorder.times.get("original_forward", [])
    perturbed = recorder.times.get("perturbed_forward", [])
    kl_total = recorder.total("kl_dependency")
    return {
        "apply_s": recorder.total("apply"),
        "visual_dependency_s": recorder.total("visual_dependency"),
        "perturbation_in_step_s": recorder.total("perturbation_in_step"),
        "select_rows_s": recorder.total("select_rows"),
        "original_forward_s": float(sum(original)),
        "original_forwards": len(original),
        "perturbed_forward_s": float(sum(perturbed)),
        "perturbed_forwards": len(perturbed),
        "kl_head_s": kl_total - float(sum(original)) - float(sum(perturbed)) if kl_total else None,
        "measured_rows_fraction": recorder.values.get("measured_rows_fraction"),
        "skipped_fraction": recorder.values.get("skipped_fraction"),
        "apply_peak_mem_bytes": recorder.values.get("apply_peak_mem_bytes"),
    }


def instrument(trainer, recorder: Recorder, role: str, length: int) -> dict[str, Callable]:
    """Wrap trainer methods on the instance (the class is untouched); returns the unwrapped bound methods."""
    import torch

    names = ["_generate", "_generate_single_turn", "_generate_and_score_completions", "compute_loss"]
    names.append("_get_per_token_logps_and_entropies")
    if role == "vppo":
        names += ["_apply_visual_dependency", "_visual_dependency", "_perturbed_pixel_values", "_select_rows"]
        names += ["_sampled_token_logps", "_completion_hidden_states", "_kl_dependency", "_shape_advantages"]
    originals = {name: getattr(trainer, name) for name in names}

    def generate_and_score(inputs):
        output = originals["_generate_and_score_completions"](inputs)
        ids, mask = output["completion_ids"], output["completion_mask"]
        fixed = ids.size(1) == length and bool((mask.sum(1) == length).all())
        if not fixed:
            raise AssertionError(f"completions are not all {length} tokens: {mask.sum(1).tolist()}")
        recorder.values["lengths_fixed"] = fixed
        recorder.batch = output
        return output

    trainer._generate = recorder.timed("generate", originals["_generate"])
    trainer._generate_single_turn = recorder.timed("generate_model", originals["_generate_single_turn"])
    trainer._generate_and_score_completions = recorder.timed("generate_and_score", generate_and_score)
    trainer.compute_loss = recorder.timed("compute_loss", originals["compute_loss"])
    trainer._get_per_token_logps_and_entropies = recorder.timed(
        "nograd_forward",
        originals["_get_per_token_logps_and_entropies"],
        condition=lambda: not torch.is_grad_enabled(),
    )
    if role != "vppo":
        return originals

    def apply_visual_dependency(batch):
        recorder.segment_peaks.append(recorder.memory.peak())
        recorder.memory.reset()
        try:
            return originals["_apply_visual_dependency"](batch)
        finally:
            apply_peak = recorder.memory.peak()
            recorder.segment_peaks.append(apply_peak)
            recorder.values["apply_peak_mem_bytes"] = apply_peak
            recorder.memory.reset()

    def shape_advantages(*args, **kwargs):
        # Runs after the generation-time pass, or in the loss when VPPO defers shaping to the loss's forward.
        originals["_shape_advantages"](*args, **kwargs)
        skipped = trainer._metrics["train"].get("vppo/skipped_fraction")
        recorder.values["skipped_fraction"] = skipped[-1] if skipped else None

    def visual_dependency(batch, rows, mask, measure=None):
        recorder.values["measured_rows_fraction"] = len(rows) / mask.size(0) if mask.size(0) else None
        return originals["_visual_dependency"](batch, rows, mask, measure)

    def perturbed_pixel_values(batch):
        perturbed = originals["_perturbed_pixel_values"](batch)
        recorder.last_perturbed = perturbed
        return perturbed

    def select_rows(batch, rows):
        inputs = originals["_select_rows"](batch, rows)
        if recorder.last_perturbed is not None and batch.get("pixel_values") is recorder.last_perturbed:
            recorder.perturbed_inputs.add(id(inputs))
        return inputs

    def forward_label(*args, **kwargs) -> str:
        inputs = next(a for a in args if isinstance(a, dict))
        if id(inputs) in recorder.perturbed_inputs:
            recorder.perturbed_inputs.discard(id(inputs))  # ids are reused once a dict is freed
            return "perturbed_forward"
        return "original_forward"

    trainer._apply_visual_dependency = recorder.timed("apply", apply_visual_dependency)
    trainer._shape_advantages = shape_advantages
    trainer._visual_dependency = recorder.timed("visual_dependency", visual_dependency)
    trainer._perturbed_pixel_values = recorder.timed("perturbation_in_step", perturbed_pixel_values)
    trainer._select_rows = recorder.timed("select_rows", select_rows)
    trainer._sampled_token_logps = recorder.timed(forward_label, originals["_sampled_token_logps"])
    trainer._completion_hidden_states = recorder.timed(forward_label, originals["_completion_hidden_states"])
    trainer._kl_dependency = recorder.timed("kl_dependency", originals["_kl_dependency"])
    return originals


if __name__ == "__main__":
    main()
