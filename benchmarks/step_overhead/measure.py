"""One worker: a trainer with its methods timed, its step records, and the untimed extras of each turn.

Trainer methods are wrapped on the instance (the classes are untouched). After each step, still inside the worker's
turn and outside the step's timer, the worker times the floor (one plain no-grad forward of the step's generation
batch) and, for VPPO, the perturbation alone.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback, set_seed
from trl.models.utils import disable_gradient_checkpointing

from .harness import Channel, Recorder, cpu_name, max_rss_bytes, versions
from .settings import Settings
from .workload import build_policy, build_trainer, fingerprint

FLOOR_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "mm_token_type_ids")


def run_worker(role: str, settings: Settings, fds: str) -> None:
    channel = Channel(fds)
    try:
        train_in_turns(role, settings, channel)
    except BaseException as error:  # report, so that the driver does not wait for nothing
        traceback.print_exc()
        try:
            channel.send({"event": "error", "error": f"{type(error).__name__}: {error}"})
        except OSError:
            pass
        raise


def train_in_turns(role: str, settings: Settings, channel: Channel) -> None:
    """Build the role's trainer, instrument it, and run its `train()` one step per turn."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no GPU")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    set_seed(settings.seed)
    model, processor = build_policy(settings)
    ready = {
        "event": "ready",
        "fingerprint": fingerprint(model),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    output_dir = tempfile.mkdtemp(prefix=f"step_overhead_{role}_")
    trainer = build_trainer(role, settings, model, processor, output_dir)
    recorder = Recorder(settings.device)
    originals = instrument(trainer, recorder, role, settings.max_completion_length)

    def untimed_extras(batch: dict[str, Any]) -> dict[str, float | None]:
        extras = {"forward_pass_s": floor_forward(trainer, originals, recorder, batch), "perturbation_s": None}
        if role == "vppo" and "pixel_values" in batch:
            extras["perturbation_s"] = perturbation_time(originals, recorder, batch, settings.perturbation_reps)
        return extras

    trainer.add_callback(Baton(role, settings, channel, recorder, ready, untimed_extras))
    try:
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    channel.send({"event": "finished", "max_rss_bytes": max_rss_bytes()})


def floor_forward(trainer, originals: dict[str, Callable], recorder: Recorder, batch: dict[str, Any]) -> float:
    """One plain no-grad forward of the generation batch through TRL's log-prob path: the floor."""
    args = trainer.args
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    extra = {key: batch[key] for key in FLOOR_KEYS if batch.get(key) is not None}
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


def perturbation_time(originals: dict[str, Callable], recorder: Recorder, batch: dict[str, Any], reps: int) -> float:
    """VPPO's perturbation of the batch's images alone: the median of `reps` synchronised repeats."""
    timings = []
    for _ in range(reps):
        recorder.sync()
        start = time.perf_counter()
        originals["_perturbed_pixel_values"](batch)
        recorder.sync()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


class Baton(TrainerCallback):
    """Times each step, reports it, and blocks the train loop until the driver hands this trainer its next turn.

    `untimed_extras(batch)` gives the figures taken after a generating step, outside its timer.
    """

    def __init__(
        self,
        role: str,
        settings: Settings,
        channel: Channel,
        recorder: Recorder,
        ready: dict[str, Any],
        untimed_extras: Callable[[dict[str, Any]], dict[str, float | None]],
    ):
        self.role, self.settings, self.channel, self.recorder = role, settings, channel, recorder
        self.ready, self.untimed_extras = ready, untimed_extras

    def on_train_begin(self, args, state, control, **kwargs):
        cuda = self.settings.device == "cuda"
        self.channel.send(
            {
                **self.ready,
                "versions": versions(),
                "device_name": torch.cuda.get_device_name() if cuda else f"CPU: {cpu_name()}",
                "cpu_name": cpu_name(),
                "torch_threads": torch.get_num_threads(),
            }
        )
        self.channel.wait_for("go")

    def on_step_begin(self, args, state, control, **kwargs):
        recorder = self.recorder
        recorder.start_step()
        recorder.sync()
        self.mem_begin = recorder.memory.current()
        recorder.memory.reset()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        recorder, settings = self.recorder, self.settings
        recorder.sync()
        step_s = time.perf_counter() - self.start
        peak = max([recorder.memory.peak(), *recorder.segment_peaks])
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
            "processor_s": recorder.total("processor"),
            "processor_calls": recorder.count("processor"),
            "sync_weights_s": recorder.total("sync_weights") if settings.vllm else None,
            "peak_mem_bytes": peak,
            "mem_at_step_begin_bytes": self.mem_begin,
            "lengths_fixed": recorder.values.get("lengths_fixed", True),
            "vppo": vppo_record(recorder) if self.role == "vppo" else None,
        }
        # Untimed extras, still inside this trainer's turn: the floor and the isolated perturbation.
        if batch is None:
            record |= {"forward_pass_s": None, "perturbation_s": None}
        else:
            record |= self.untimed_extras(batch)
        recorder.batch = None
        self.channel.send(record)
        if settings.device == "cuda" and settings.empty_cache_between_turns:
            torch.cuda.empty_cache()
        self.channel.wait_for("go" if state.global_step < settings.total_steps else "finish")


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


def time_processor_calls(processor, recorder: Recorder) -> None:
    """Time every call of the trainer's processor: the prompts' tokenisation with their images, and TRL's second run
    for the training forward's `pixel_values`. Python looks `__call__` up on the type, so this one instance gets a
    subclass of its own (the class is untouched)."""
    base = type(processor)
    processor.__class__ = type(base.__name__, (base,), {"__call__": recorder.timed("processor", base.__call__)})


def instrument(trainer, recorder: Recorder, role: str, length: int) -> dict[str, Callable]:
    """Wrap trainer methods on the instance (the class is untouched); returns the unwrapped bound methods."""
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
    time_processor_calls(trainer.processing_class, recorder)
    if trainer.use_vllm:
        generation = trainer.vllm_generation
        generation.sync_weights = recorder.timed("sync_weights", generation.sync_weights)
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

    def visual_dependency(batch, rows, mask, measure=None, **kwargs):
        recorder.values["measured_rows_fraction"] = len(rows) / mask.size(0) if mask.size(0) else None
        return originals["_visual_dependency"](batch, rows, mask, measure, **kwargs)

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
