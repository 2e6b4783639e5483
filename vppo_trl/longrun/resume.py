"""Checkpoints that resume exactly: every weight restored, the trainer's own state saved, completion marked atomically.

Three things a plain `Trainer` checkpoint of a Qwen-VL GRPO run does not give, and this module adds:

- **Every weight.** transformers 5.x saves Qwen-VL models in the legacy key layout (`visual.*`, `model.layers.*`),
  and `Trainer._load_from_checkpoint` loads that file with `load_state_dict(..., strict=False)`, without the key
  conversion `from_pretrained` applies, so a resumed run silently keeps its initial weights
  (huggingface/transformers#43701). [`load_full_weights`] converts the keys the way `from_pretrained` does and
  refuses a checkpoint whose keys do not all match.
- **The training state outside the model.** GRPO's position inside a generation batch and its buffered
  completions, the sampler's shuffling state at the start of the epoch, VPPO's perturbation counter and dynamic
  sampling's place in the prompt stream are saved per process (`vppo_state_<process>.pt`).
- **Atomic completion.** A checkpoint counts only once `vppo_checkpoint.json` is written, last, by an atomic rename;
  old checkpoints are rotated only after that, so a kill while saving always leaves a complete checkpoint behind.
"""

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

from ..method.shared_state import SharedStateMixin

logger = logging.get_logger(__name__)

COMPLETE_MARKER = "vppo_checkpoint.json"
PROCESS_STATE = "vppo_state_{}.pt"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_MAX_LISTED_KEYS = 8


def _listed(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:_MAX_LISTED_KEYS])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED_KEYS else "")


def read_full_weights(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The model weights saved in `checkpoint` (one safetensors file or an index of shards), or `None` if absent."""
    folder = Path(checkpoint)
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return safetensors.torch.load_file(folder / SAFE_WEIGHTS_NAME, device="cpu")
    if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        shards = set(json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"].values())
        weights = {}
        for shard in sorted(shards):
            weights.update(safetensors.torch.load_file(folder / shard, device="cpu"))
        return weights
    return None


def load_full_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], checkpoint: str) -> None:
    """
    Load a full checkpoint into `model`, converting its keys as `from_pretrained` does, and refuse any mismatch.

    Works around huggingface/transformers#43701 (open): `Trainer._load_from_checkpoint` skips the key conversion and
    only warns about the keys it could not place. A key the model lacks, or a model weight the checkpoint lacks (other
    than one tied to a loaded weight, such as a tied `lm_head`), raises a `ValueError` naming the keys.
    """
    transforms = get_model_conversion_mapping(model)
    if any(isinstance(transform, WeightConverter) for transform in transforms):
        raise ValueError(
            f"Cannot resume {type(model).__name__} from {checkpoint}: its checkpoint format merges or splits tensors, "
            "which only from_pretrained can undo. Load the checkpoint with from_pretrained and start a new run."
        )
    renamings = [transform for transform in transforms if isinstance(transform, WeightRenaming)]
    converted = {rename_source_key(key, renamings, [])[0]: value for key, value in weights.items()}
    expected = model.state_dict()
    loaded_storage = {expected[key].data_ptr() for key in converted if key in expected}
    missing = [key for key in expected if key not in converted and expected[key].data_ptr() not in loaded_storage]
    unexpected = [key for key in converted if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {checkpoint} does not match {type(model).__name__}: "
            + "; ".join(
                part
                for part in (
                    f"{len(missing)} model weights are not in it ({_listed(missing)})" if missing else "",
                    f"{len(unexpected)} of its weights are not in the model ({_listed(unexpected)})"
                    if unexpected
                    else "",
                )
                if part
            )
            + ". Resume with the model the checkpoint was trained from."
        )
    model.load_state_dict(converted, strict=False)


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether `checkpoint` was written to the end (its completion marker exists)."""
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete `checkpoint-N` folder of `output_dir` with the largest N, skipping half-written ones."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _CHECKPOINT_NAME.match(path.name)) and path.is_dir()
    )
    for step, path in reversed(steps):
        if is_complete(path):
            return str(path)
        logger.warning(
            f"Skipping {path}: it is incomplete (the run stopped while saving step {step}, or, on several machines, "
            "output_dir is not on storage they all share: the main process writes the marker and the weights)."
        )
    return None


def mark_complete(checkpoint: str | os.PathLike, global_step: int) -> None:
    """Write the completion marker atomically (a rename), after everything else of the checkpoint."""
    marker = Path(checkpoint) / COMPLETE_MARKER
    temporary = marker.with_suffix(".tmp")
    temporary.write_text(json.dumps({"global_step": global_step}))
    os.replace(temporary, marker)


class _EpochStartCallback(TrainerCallback):
    """Records the sampler's shuffling state when an epoch begins, so that a resumed epoch reshuffles identically."""

    def __init__(self, trainer: "ExactResumeMixin"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        generator = getattr(self.trainer._train_sampler, "generator", None)
        self.trainer._epoch_sampler_state = generator.get_state() if generator is not None else None


class ExactResumeMixin(SharedStateMixin):
    """
    Exact, atomic checkpoints for [`~trl.GRPOTrainer`] subclasses.

    Subclasses add their own state to the checkpoint by extending `_training_state` and `_restore_training_state`
    (cooperatively, calling `super()`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._train_sampler = None
        self._epoch_sampler_state: torch.Tensor | None = None
        self._failed_hub_pushes = 0  # in this `train()` call: the first is reported, the rest counted
        self.add_callback(_EpochStartCallback(self))

    # -- what goes into the checkpoint ----------------------------------------------------------------------------

    def _training_state(self) -> dict[str, Any]:
        """This process's training state that the Trainer's own checkpoint files do not hold."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        mid_batch = self._step % generate_every != 0
        return {
            "grpo_step": self._step,
            # Completions still to be trained on: without them a resumed run would generate new ones.
            "buffered_inputs": self._buffered_inputs if mid_batch else None,
            "epoch_sampler_state": self._epoch_sampler_state,
        }

    def _restore_training_state(self, state: dict[str, Any]) -> None:
        self._step = state["grpo_step"]
        if state["buffered_inputs"] is not None:
            device = self.accelerator.device
            self._buffered_inputs = [
                {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
                for batch in state["buffered_inputs"]
            ]

    def _save_checkpoint(self, model, trial):
        # Rotation waits until this checkpoint is complete: it must never leave only a half-written one.
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        run_dir = self._get_output_dir(trial=trial)
        checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(checkpoint, exist_ok=True)
        torch.save(self._training_state(), os.path.join(checkpoint, PROCESS_STATE.format(self.args.process_index)))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(checkpoint, self.state.global_step)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # A failed upload (network, permissions, quota) must not stop a day-long run or touch local checkpoints.
        try:
            super()._push_from_checkpoint(checkpoint_folder)
        except Exception as error:  # noqa: BLE001 - any upload failure, reported once and counted
            self._failed_hub_pushes += 1
            if self._failed_hub_pushes == 1:
                warnings.warn(
                    f"Pushing {checkpoint_folder} to the Hub failed ({type(error).__name__}: {error}); training goes "
                    "on and the local checkpoint is kept. Further failed pushes are not reported one by one: they "
                    "are logged as hub/push_failures and counted when training ends.",
                    stacklevel=2,
                )
            self._metrics["train"]["hub/push_failures"].append(1.0)

    # -- resuming ---------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the newest *complete* checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
        if resume_from_checkpoint:
            resume_from_checkpoint = str(resume_from_checkpoint)
            self.shared.resumed = self._read_training_state(resume_from_checkpoint)
        self._failed_hub_pushes = 0
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.shared.resumed = None
            if self._failed_hub_pushes > 1:
                warnings.warn(
                    f"{self._failed_hub_pushes} checkpoint pushes to the Hub failed in this run (logged as "
                    "hub/push_failures); the local checkpoints are kept.",
                    stacklevel=2,
                )

    def _read_training_state(self, checkpoint: str) -> dict[str, Any] | None:
        if not os.path.isdir(checkpoint):
            raise ValueError(f"Checkpoint {checkpoint} does not exist.")
        if not is_complete(checkpoint):
            newest = newest_complete_checkpoint(os.path.dirname(os.path.abspath(checkpoint)))
            raise ValueError(
                f"Checkpoint {checkpoint} is incomplete (no {COMPLETE_MARKER}: the run stopped while saving it, an "
                "older version wrote it, or, on several machines, output_dir is not on storage they all share)."
                + (f" The newest complete one is {newest}." if newest else "")
            )
        path = os.path.join(checkpoint, PROCESS_STATE.format(self.args.process_index))
        if not os.path.isfile(path):
            raise ValueError(
                f"Checkpoint {checkpoint} has no training state for process {self.args.process_index} ({path}): "
                "resume with as many processes as the run that wrote it."
            )
        return torch.load(path, map_location="cpu", weights_only=False)

    def _get_train_sampler(self, *args, **kwargs):
        sampler = super()._get_train_sampler(*args, **kwargs)
        self._train_sampler = sampler
        if self.shared.resumed is not None and self.shared.resumed["epoch_sampler_state"] is not None:
            sampler.generator.set_state(self.shared.resumed["epoch_sampler_state"])
        return sampler

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = model if model is not None else self.model
        weights = None
        if not (is_peft_model(target) or self.is_deepspeed_enabled or self.is_fsdp_enabled):
            weights = read_full_weights(resume_from_checkpoint)
        if weights is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            load_full_weights(target, weights, resume_from_checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # Called once when a resumed run reaches its first step: the place to restore the rest of the state too.
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and self.shared.resumed is not None:
            self._restore_training_state(self.shared.resumed)
