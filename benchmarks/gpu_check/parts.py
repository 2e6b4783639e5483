"""The four parts of the check. Each returns its section: `ok` (did what a user needs happen), the figures, and
the checks that make up `ok`, by name, so that a failing one says which."""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .recipe import RECIPES, ROOT, build_recipe_trainer, recipe_args
from .settings import GpuCheckArguments, PartPlan

# What the step_overhead runs of part 1 are read for (their whole summaries are written next to the JSON).
OVERHEAD_FIGURES = (
    "complete",
    "measured_steps",
    "overhead_efficiency",
    "overhead_efficiency_paired_median",
    "apply_efficiency",
    "ratio",
    "peak_mem_ratio",
    "grpo_step_s",
    "vppo_step_s",
    "perturbed_pass_s",
    "forward_pass_s",
    "perturbation_s",
    "grpo_peak_mem_bytes",
    "vppo_peak_mem_bytes",
    "skipped_fraction",
    "weights_identical",
    "completion_lengths_fixed",
    "memory_measure",
    "command",
)
# RESULTS.md's targets: efficiency per run, and the peak-memory ratio (figures: reported, not part of `ok`).
OVERHEAD_TARGETS = {"skip_off": 1.1, "half_uniform": 0.6}
PEAK_MEMORY_RATIO_TARGET = 1.02


def checked(section: dict[str, Any], checks: dict[str, bool]) -> dict[str, Any]:
    """`section` with its checks and `ok`: every check passed."""
    return {"ok": all(checks.values()), "checks": checks, **section}


# ---------------------------------------------------------------------------------------------------------------
# 1. VPPO vs GRPO on the 7B architecture: step_overhead, twice
# ---------------------------------------------------------------------------------------------------------------


def overhead(args: GpuCheckArguments, plan: PartPlan, out_dir: Path, log_dir: Path) -> dict[str, Any]:
    """Two step_overhead runs, steps interleaved: VPPO measuring every row (skip off), then half the prompt groups
    uniform with skip_zero_advantage on (VPPO skips them)."""
    from benchmarks.step_overhead.harness import run_benchmark
    from benchmarks.step_overhead.report import summarise
    from benchmarks.step_overhead.settings import parse_args, resolve_settings

    common = ["--device", args.device, "--model", "7b-arch" if args.preset == "real" else "tiny"]
    common += ["--steps", str(plan.steps), "--warmup", "1", "--seed", str(args.seed)]
    common += ["--max-completion-length", str(plan.completion_length), "--perturbation-reps", "3"]
    runs = {
        "skip_off": [*common, "--no-skip-zero-advantage"],
        "half_uniform": [*common, "--zero-advantage-share", "0.5"],
    }
    section: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    for name, argv in runs.items():
        settings = resolve_settings(parse_args(argv))
        summary_path = out_dir / f"{Path(args.json).stem}.overhead_{name}.json"

        def write(run: dict[str, Any], settings=settings, argv=argv, summary_path=summary_path) -> None:
            summary_path.write_text(json.dumps(summarise(settings, run, argv), indent=1) + "\n")

        run_log = log_dir / f"overhead_{name}"
        run_log.mkdir(parents=True, exist_ok=True)
        run = run_benchmark(settings, run_log, write)
        summary = summarise(settings, run, argv)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        figures = {key: summary[key] for key in OVERHEAD_FIGURES}
        efficiency = figures["overhead_efficiency"]
        figures["efficiency_target"] = OVERHEAD_TARGETS[name]
        figures["efficiency_target_met"] = efficiency is not None and efficiency <= OVERHEAD_TARGETS[name]
        memory_ratio = figures["peak_mem_ratio"]
        figures["peak_mem_ratio_target_met"] = memory_ratio is not None and memory_ratio <= PEAK_MEMORY_RATIO_TARGET
        figures["summary_file"] = str(summary_path)
        section[name] = figures
        expected_skip = 0.0 if name == "skip_off" else 0.5  # 2 prompts per step, one of them uniform
        checks[f"{name}_complete"] = summary["complete"]
        checks[f"{name}_same_initial_weights"] = summary["weights_identical"]
        checks[f"{name}_fixed_length_completions"] = summary["completion_lengths_fixed"]
        checks[f"{name}_skipped_fraction_is_{expected_skip}"] = summary["skipped_fraction"] == expected_skip
        checks[f"{name}_perturbed_pass_ran"] = (summary["perturbed_forwards_per_step"] or 0) >= 1
    return checked(section, checks)


# ---------------------------------------------------------------------------------------------------------------
# 2 and 3. A recipe's settings for a few steps in this process
# ---------------------------------------------------------------------------------------------------------------


def train_recipe(
    args: GpuCheckArguments,
    plan: PartPlan,
    recipe: str,
    architecture: str,
    overrides: dict[str, Any],
    watch: Callable[[Any], dict[str, Any]],
) -> dict[str, Any]:
    """Train `architecture` with `recipe`'s settings for `plan.steps` steps; `watch(trainer)` instruments the trainer
    before training and returns a function giving its figures and checks after."""
    import torch

    from benchmarks.step_overhead.harness import Memory

    from .architectures import FAMILIES, build_policy

    memory = Memory(args.device)
    gc.collect()
    memory.reset()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as output_dir:
        values = {
            "per_device_train_batch_size": 8,
            "generation_batch_size": 8,
            "max_completion_length": plan.completion_length,
            "seed": args.seed,
            **overrides,
        }
        training_args, model_args = recipe_args(recipe, args.device, output_dir, plan.steps, values)
        tiny = args.preset == "tiny"
        model, processor = build_policy(
            architecture,
            tiny=tiny,
            device=args.device,
            dtype="float32" if tiny else model_args.dtype,
            image_size=plan.image_size,
            seed=args.seed,
            text_layers=plan.text_layers,
            vision_layers=plan.vision_layers,
            attn_implementation=None if tiny else model_args.attn_implementation,
        )
        parameters = sum(p.numel() for p in model.parameters())
        trainer = build_recipe_trainer(training_args, model_args, model, processor, plan.image_size)
        finish = watch(trainer)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        metrics = trainer.state.log_history[-2] if len(trainer.state.log_history) > 1 else {}
        section, checks = finish()
        section = {
            "architecture": f"tiny {FAMILIES[architecture]} model" if tiny else architecture,
            "parameters": parameters,
            "steps": trainer.state.global_step,
            "losses": losses,
            "token_fraction": metrics.get("vppo/token_fraction"),
            "peak_mem_bytes": memory.peak(),
            "memory_measure": "torch.cuda.max_memory_allocated over the part"
            if args.device == "cuda"
            else "peak RSS of the check's process over the part (whole process)",
            "recipe": f"recipes/{recipe}",
            "recipe_overrides": values,
            **section,
        }
        checks = {
            f"trained_{plan.steps}_steps": trainer.state.global_step == plan.steps,
            "losses_finite": len(losses) == plan.steps and all(math.isfinite(loss) for loss in losses),
            **checks,
        }
        # The next part needs the memory back: nothing may keep the model alive.
        released = weakref.ref(model)
        del trainer, model, finish
        gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        section["allocated_after_bytes"] = int(torch.cuda.memory_allocated())
    checks["model_released"] = released() is None
    return checked(section, checks)


def lora(args: GpuCheckArguments, plan: PartPlan, out_dir: Path, log_dir: Path) -> dict[str, Any]:
    """recipes/qwen2_5_vl_3b_lora_single_gpu.yaml on the 3B architecture: only the adapter moves, and VPPO's
    perturbed pass runs through it."""

    def watch(trainer):
        import torch
        from peft.tuners.lora import LoraLayer

        model = trainer.model
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        base = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if "lora_" not in n}
        counts = {"inside_perturbed_pass": 0, "perturbed_passes": 0}
        state = {"in_perturbed_pass": False}

        def count(module, inputs, output):
            if state["in_perturbed_pass"]:
                counts["inside_perturbed_pass"] += 1

        lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        hooks = [m.lora_A[name].register_forward_hook(count) for m in lora_layers for name in m.lora_A]
        perturbed_token_logps = trainer._perturbed_token_logps

        def watched(*a, **kw):
            state["in_perturbed_pass"] = True
            counts["perturbed_passes"] += 1
            try:
                return perturbed_token_logps(*a, **kw)
            finally:
                state["in_perturbed_pass"] = False

        trainer._perturbed_token_logps = watched

        def finish():
            for hook in hooks:
                hook.remove()
            after = dict(model.named_parameters())
            moved = [n for n, before in adapter.items() if not torch.equal(before, after[n].detach())]
            changed = [n for n, before in base.items() if not torch.equal(before, after[n].detach().cpu())]
            section = {
                "lora_layers": len(lora_layers),
                "adapter_tensors": len(adapter),
                "adapter_tensors_moved": len(moved),
                "adapter_tensors_not_moved": sorted(set(adapter) - set(moved))[:5],
                "base_tensors": len(base),
                "base_tensors_changed": changed[:5],
                "vision_tower_adapted": any("visual" in n for n in adapter),
                "perturbed_passes": counts["perturbed_passes"],
                "adapter_calls_in_perturbed_passes": counts["inside_perturbed_pass"],
            }
            checks = {
                "every_adapter_tensor_moved": bool(adapter) and len(moved) == len(adapter),
                "base_weights_unchanged": not changed,
                "language_model_only": not section["vision_tower_adapted"],
                "perturbed_pass_through_adapter": counts["inside_perturbed_pass"] > 0,
            }
            return section, checks

        return finish

    return train_recipe(args, plan, "qwen2_5_vl_3b_lora_single_gpu.yaml", "qwen2_5_vl_3b", {}, watch)


def qwen3(args: GpuCheckArguments, plan: PartPlan, out_dir: Path, log_dir: Path) -> dict[str, Any]:
    """recipes/qwen3_vl_8b.yaml on the Qwen3-VL-8B architecture (16-px patches, DeepStack), full fine-tuning with
    SGD (AdamW's states for 8.8B parameters would not fit an 80 GB GPU next to the model): the recipe's perturbation,
    14-px squares blackened on the loaded images and re-processed, lands on the device in the batch's layout."""

    def watch(trainer):
        perturbed_pixel_values = trainer._perturbed_pixel_values
        seen: dict[str, list] = {"changed_fraction": [], "same_device": [], "same_shape": []}

        def watched(batch):
            perturbed = perturbed_pixel_values(batch)
            original = batch["pixel_values"]
            seen["same_device"].append(perturbed.device == original.device)
            seen["same_shape"].append(perturbed.shape == original.shape)
            changed = (perturbed != original).any(dim=-1).float().mean().item()
            seen["changed_fraction"].append(changed)
            return perturbed

        trainer._perturbed_pixel_values = watched

        def finish():
            fractions = seen["changed_fraction"]
            section = {
                "perturbation": f"{trainer.args.perturbation} on {trainer.args.perturbation_space}, "
                f"{trainer.args.perturbation_patch_size}-px squares, p={trainer.args.perturbation_prob}",
                "entropy_penalty_coef": trainer.args.entropy_penalty_coef,
                "perturbed_batches": len(fractions),
                "perturbed_patch_rows_changed_fraction": fractions,
            }
            checks = {
                "perturbed_every_step": len(fractions) >= plan.steps,
                "perturbed_on_the_device_in_the_batch_layout": all(seen["same_device"]) and all(seen["same_shape"]),
                "perturbation_changed_some_patches_not_all": all(0.0 < f < 1.0 for f in fractions),
            }
            return section, checks

        return finish

    return train_recipe(args, plan, "qwen3_vl_8b.yaml", "qwen3_vl_8b", {"optim": "sgd"}, watch)


# ---------------------------------------------------------------------------------------------------------------
# 4. ZeRO-3 through accelerate launch: a checkpoint, and a resume that continues
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_config(device: str, folder: Path) -> tuple[Path, int]:
    """recipes/accelerate/zero3.yaml and the number of processes: one per GPU; on CPU, its copy with `use_cpu`, no
    mixed precision and one process (what tests/test_multiprocess.py runs ZeRO-3 on CPU with)."""
    import torch
    import yaml

    recipe = RECIPES / "accelerate" / "zero3.yaml"
    if device == "cuda":
        return recipe, max(1, torch.cuda.device_count())
    config = yaml.safe_load(recipe.read_text())
    config.update(use_cpu=True, mixed_precision="no", num_processes=1)
    path = folder / "zero3_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, 1


def zero3(args: GpuCheckArguments, plan: PartPlan, out_dir: Path, log_dir: Path) -> dict[str, Any]:
    """recipes/qwen2_5_vl_7b_paper.yaml's settings under `accelerate launch --config_file
    recipes/accelerate/zero3.yaml`: `plan.steps` steps and a checkpoint, then a second launch resuming from it."""
    from vppo_trl.longrun.resume import is_complete

    with tempfile.TemporaryDirectory(prefix="gpu_check_zero3_") as tmp:
        folder = Path(tmp)
        config, processes = accelerate_config(args.device, folder)
        output_dir = folder / "run"
        total = plan.steps + 1
        results = {}
        for phase, max_steps in (("first", plan.steps), ("resumed", total)):
            spec = {
                "phase": phase,
                "output_dir": str(output_dir),
                "save_steps": plan.steps,
                "max_steps": max_steps,
                "resume": phase == "resumed",
                "device": args.device,
                "tiny": args.preset == "tiny",
                "seed": args.seed,
                "text_layers": plan.text_layers,
                "vision_layers": plan.vision_layers,
                "image_size": plan.image_size,
                "completion_length": plan.completion_length,
                "result": str(folder / f"{phase}.json"),
            }
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
            command += ["--num_processes", str(processes), "--main_process_port", str(free_port())]
            # The model is built from a config, not loaded: deepspeed.initialize partitions it (zero.Init is for
            # from_pretrained, which a user's run goes through).
            command += ["--zero3_init_flag", "false", "-m", "benchmarks.gpu_check.zero3_worker", json.dumps(spec)]
            log_path = log_dir / f"zero3_{phase}.log"
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            }
            with open(log_path, "w") as log:
                completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            if completed.returncode != 0:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"the {phase} launch exited with {completed.returncode}:\n{tail}")
            results[phase] = json.loads(Path(spec["result"]).read_text())
        first, resumed = results["first"], results["resumed"]
        checkpoint = output_dir / f"checkpoint-{plan.steps}"
        section = {
            "command": " ".join(command[:-1]) + " '<spec>'",
            "processes": processes,
            "architecture": "tiny qwen2_5_vl model" if args.preset == "tiny" else "qwen2_5_vl_7b widths, fewer layers",
            "text_layers": plan.text_layers,
            "vision_layers": plan.vision_layers,
            "parameters": first["parameters"],
            "checkpoint": checkpoint.name,
            "checkpoint_complete": is_complete(checkpoint),
            "steps_first": first["steps_seen"],
            "steps_resumed": resumed["steps_seen"],
            "losses_first": first["losses"],
            "losses_resumed": resumed["losses"],
            "peak_mem_bytes_first": first["peak_mem_bytes"],
            "peak_mem_bytes_resumed": resumed["peak_mem_bytes"],
            "memory_measure": "torch.cuda.max_memory_allocated of rank 0"
            if args.device == "cuda"
            else "peak RSS of the (one) worker process",
            "fingerprints": {
                "first_begin": first["begin_fingerprint"],
                "first_end": first["end_fingerprint"],
                "resumed_begin": resumed["begin_fingerprint"],
                "resumed_end": resumed["end_fingerprint"],
            },
        }
        checks = {
            "first_run_trained": first["steps_seen"] == list(range(1, plan.steps + 1)),
            "training_moved_the_weights": first["begin_fingerprint"] != first["end_fingerprint"],
            "checkpoint_written_and_complete": is_complete(checkpoint),
            "resume_loaded_the_checkpoint_weights": resumed["begin_fingerprint"] == first["end_fingerprint"],
            "resume_continued_at_the_next_step": resumed["steps_seen"] == [total],
            "resumed_step_trained": resumed["end_fingerprint"] != resumed["begin_fingerprint"],
            "losses_finite": all(math.isfinite(x) for x in first["losses"] + resumed["losses"]),
        }
    return checked(section, checks)


PART_FUNCTIONS = {"overhead": overhead, "lora": lora, "qwen3": qwen3, "zero3": zero3}
