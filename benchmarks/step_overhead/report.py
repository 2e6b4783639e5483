"""The figures of a run: medians over the measured steps, the JSON it writes, and the table it prints."""

from __future__ import annotations

import datetime
import os
import statistics
from dataclasses import asdict
from typing import Any

from .settings import ROLES, Settings


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
        "grpo_processor_s": med("grpo", "processor_s"),
        "vppo_processor_s": med("vppo", "processor_s"),
        "processor_calls_per_step": {role: med(role, "processor_calls") for role in ROLES},
        "grpo_sync_weights_s": med("grpo", "sync_weights_s"),
        "vppo_sync_weights_s": med("vppo", "sync_weights_s"),
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
        "command": ["python", "-m", "benchmarks.step_overhead", *argv],
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
            "processor_s = every call of the trainer's processor in the step (the prompts' tokenisation with their "
            "images, and TRL's second run for the training forward's pixel_values); sync_weights_s = with --vllm, "
            "loading the trainer's weights into the colocated engine (part of generation)",
        ],
    }
    return summary


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
        ("processor calls", f"{_fmt(summary['grpo_processor_s'])} / {_fmt(summary['vppo_processor_s'])}"),
    ]
    if summary["settings"]["vllm"]:
        sync = f"{_fmt(summary['grpo_sync_weights_s'])} / {_fmt(summary['vppo_sync_weights_s'])}"
        rows.append(("vLLM weight sync", sync))
    width = max(len(name) for name, _ in rows)
    print(f"{summary['device_name']} | load {summary['load_average_start']} -> {summary['load_average_end']}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
