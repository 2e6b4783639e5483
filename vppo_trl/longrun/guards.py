"""A NaN or infinite training loss, or NaN or infinite gradients, never move the weights."""

import functools
import warnings

import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import TrainerCallback
from transformers.utils import logging

from ..method.shared_state import SharedStateMixin

logger = logging.get_logger(__name__)

# Marks an optimizer `step` already wrapped by the guard.
GUARDED_STEP = "_skips_nonfinite_steps"
# Logged once per optimizer step: 1.0 when the guard skipped it.
SKIPPED_METRIC = "vppo/nonfinite_loss_skipped"
# What an optimizer's `__dict__` held for a step the guard wrapped when it held nothing (the class's method was used).
_ABSENT = object()


class NonFiniteLossGuardMixin(SharedStateMixin):
    """
    Skips every optimizer step whose loss or gradients are NaN or infinite, for [`~trl.GRPOTrainer`] subclasses.

    fp16 overflow, a bf16 backward overflow or a corrupt sample can make one batch's loss or gradients NaN; applying
    them would turn every weight into NaN and the rest of a long run into waste. The loss goes back as it is (a
    loss scaler and DDP then see what happened, see [`NonFiniteStepGuard`]), and the optimizer step it belongs to is
    skipped on every process whenever any of them saw a non-finite loss, or the step's gradients are not finite. After
    `max_consecutive_nonfinite_steps` skipped optimizer steps in a row, training stops with an error; the checkpoints
    already written are untouched. A skipped step does not advance the learning-rate schedule, on any backend.
    DeepSpeed configurations where a step could not be withheld are refused when the trainer is built
    ([`check_deepspeed_config`]).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            check_deepspeed_config(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        self._nonfinite_guard = NonFiniteStepGuard(self)
        self.add_callback(self._nonfinite_guard)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            # The optimizer may be the user's (`optimizers=`): give it back unwrapped, even after an error.
            self._nonfinite_guard.uninstall()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.model.training:
            self._nonfinite_guard.record_loss(loss)
        return loss


class NonFiniteStepGuard(TrainerCallback):
    """
    The non-finite guard's decisions, one per optimizer step, at the point where each backend applies the update.

    - The decision: a step is skipped when any process saw a non-finite loss in one of its micro-batches, or when its
      gradients are not finite. Without DeepSpeed both are added up over processes in one all-reduce right before the
      optimizer step (`on_pre_optimizer_step`, after the Trainer's clipping); under DeepSpeed, whose engine steps
      inside the last micro-batch's backward, the loss's flag is added up in that micro-batch's `compute_loss`, and
      the gradients are checked by ZeRO itself (it skips a step whose gradients overflow; the guard turns that check
      on where a ZeRO-1/2 configuration turned it off).
    - The skip: the update is withheld from the optimizer that applies it (the torch optimizer; with a loss scaler,
      the step accelerate hands to the scaler; under DeepSpeed the engine's `basic_optimizer`, for every parameter
      group), so weights, moments and step counts stay as they were. With fp16 and a loss scaler, an overflow of the
      scaled gradients is the scaler's own business: it skips the step and lowers its scale, as in its first steps,
      and the guard neither counts nor reports it, unless the scale is already below 1.
    - The schedule: a skipped step leaves the learning-rate schedule where it was, as loss scalers and DeepSpeed do for
      the steps they skip themselves: without DeepSpeed, accelerate is told the step was skipped (the Trainer then
      leaves its scheduler alone); under DeepSpeed, the ZeRO optimizer's `overflow` flag is raised, and the engine,
      which steps the scheduler itself, leaves it alone and counts the step as skipped.
    - The count: skipped optimizer steps in a row, reset by a step that is applied. The first skip is reported, the
      rest are logged (`vppo/nonfinite_loss_skipped`, one value per optimizer step) and summarised when training ends.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.window_losses: list[torch.Tensor] = []  # this process's losses of the step being accumulated
        self.loss_processes = 0  # processes that saw a non-finite loss in the step (decided once per step)
        self.decided = False
        self.skip = False  # read by the wrapped optimizer step
        self.cause: str | None = None  # "loss" or "gradients": why the guard skips this step
        self.consecutive, self.streak_causes = 0, set()
        self.skipped_steps, self.reported = 0, False
        self.wrapped: list[tuple[object, str, object]] = []  # (owner, name, what its `__dict__` held) per wrapped step
        self.marked_skipped: AcceleratedOptimizer | None = None  # told it skipped this step (see `on_optimizer_step`)

    # The loss, micro-batch by micro-batch

    def record_loss(self, loss: torch.Tensor) -> None:
        trainer = self.trainer
        self.install()
        self.window_losses.append(loss.detach())
        if trainer.is_deepspeed_enabled and trainer.accelerator.sync_gradients:
            # The engine steps inside this micro-batch's backward: decide before it.
            self.decide(gradients_nonfinite=False)

    def local_loss_nonfinite(self) -> torch.Tensor:
        return torch.stack([~torch.isfinite(loss).all() for loss in self.window_losses]).any()

    # The decision and the account, once per optimizer step

    def decide(self, gradients_nonfinite: bool | torch.Tensor) -> None:
        trainer = self.trainer
        flags = torch.stack([self.local_loss_nonfinite(), torch.as_tensor(gradients_nonfinite)]).float()
        loss_processes, gradient_processes = trainer.accelerator.reduce(flags.to(trainer.accelerator.device), "sum")
        self.loss_processes = int(loss_processes.item())
        self.cause = None
        if self.loss_processes > 0:
            self.cause = "loss"
        elif gradient_processes.item() > 0 and not self.scaler_handles_overflow():
            self.cause = "gradients"
        self.skip, self.decided = self.cause is not None, True

    def scaler_handles_overflow(self) -> bool:
        """Whether a loss scaler skips a step with non-finite gradients by itself as part of its calibration."""
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        return scaler is not None and scaler.get_scale() >= 1.0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.decided or not self.window_losses:  # DeepSpeed decided already (and stepped); or nothing to decide
            return
        grads = [parameter.grad for parameter in self.trainer.model.parameters() if parameter.grad is not None]
        self.decide(~torch.isfinite(torch.nn.utils.get_total_norm(grads)) if grads else False)

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        cause, losses = self.cause, self.window_losses
        if trainer.is_deepspeed_enabled and cause is None and trainer.accelerator.optimizer_step_was_skipped:
            # ZeRO found the gradients non-finite and skipped the step (under fp16: its loss scale's calibration).
            cause = None if trainer.model_wrapped.fp16_enabled() else "gradients"
        applied = cause is None and not trainer.accelerator.optimizer_step_was_skipped
        self.window_losses, self.decided, self.skip, self.cause = [], False, False, None
        if (
            cause is not None
            and not trainer.is_deepspeed_enabled
            and isinstance(trainer.optimizer, AcceleratedOptimizer)
        ):
            # What accelerate reports after a loss scaler's skip: the Trainer then holds the learning-rate schedule.
            # (Reset at the step's end: without a scaler, accelerate never resets it. Under DeepSpeed, see `install`.)
            trainer.optimizer._is_overflow = True
            self.marked_skipped = trainer.optimizer
        trainer._metrics["train"][SKIPPED_METRIC].append(float(cause is not None))
        if cause is None:
            if applied:
                self.consecutive, self.streak_causes = 0, set()
            return
        self.consecutive += 1
        self.skipped_steps += 1
        self.streak_causes.add(cause)
        step, limit = state.global_step + 1, args.max_consecutive_nonfinite_steps
        if self.consecutive >= limit:
            what = (
                "the training loss was"
                if self.streak_causes == {"loss"}
                else "the training loss or its gradients were"
            )
            raise RuntimeError(
                f"Step {step}: {what} NaN or infinite {limit} times in a row: {limit} optimizer steps in a row were "
                f"skipped (max_consecutive_nonfinite_steps={limit}; {self.skipped_steps} skipped in this run). "
                "Training stopped; the checkpoints already written are kept. Likely causes: a learning rate too high, "
                "fp16 overflow (use bf16), or corrupt data."
            )
        if not self.reported:
            self.reported = True
            processes = trainer.accelerator.num_processes
            if cause == "loss":
                here = next((loss for loss in losses if not torch.isfinite(loss).all()), losses[-1])
                what = (
                    f"the training loss is NaN or infinite on {self.loss_processes} of {processes} process(es) "
                    f"(here: {here.float().sum().item()})"
                )
            else:
                what = "the gradients are NaN or infinite, the training loss finite"
            warnings.warn(
                f"Step {step}: {what}; this optimizer step is skipped on every process. Further skipped steps are not "
                f"reported one by one: they are logged as {SKIPPED_METRIC} and counted when training ends; "
                f"{limit} in a row stop training (max_consecutive_nonfinite_steps).",
                stacklevel=2,
            )

    def on_step_end(self, args, state, control, **kwargs):
        self.unmark_skipped()

    def unmark_skipped(self) -> None:
        if self.marked_skipped is not None:
            self.marked_skipped._is_overflow = False
            self.marked_skipped = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.skipped_steps:
            logger.warning(
                f"{self.skipped_steps} of {state.global_step} optimizer steps were skipped for a NaN or infinite "
                f"loss or gradients (logged as {SKIPPED_METRIC})."
            )

    # The skip, where each backend applies the update

    def install(self) -> None:
        """Wrap the `step` that applies the update (once per optimizer) so that it passes over a skipped step."""
        trainer = self.trainer
        flags_overflow = None  # the ZeRO optimizer whose `overflow` a skipped step raises
        if trainer.is_deepspeed_enabled:
            engine = trainer.model_wrapped
            if hasattr(engine.optimizer, "overflow"):
                flags_overflow = engine.optimizer
            if getattr(engine.optimizer, "check_grad_overflow", True) is False:
                engine.optimizer.check_grad_overflow = True  # ZeRO-1/2 then skips a step with non-finite gradients
            # The ZeRO optimizer (fp32 master partitions, gradient buffers) wraps `basic_optimizer`: skipping only its
            # update lets ZeRO clear the step's gradients as usual and copy back unchanged master weights.
            owner, name = engine.basic_optimizer, "step"
        elif isinstance(trainer.optimizer, AcceleratedOptimizer) and trainer.optimizer.scaler is not None:
            # With a loss scaler, accelerate hands the scaler the step it captured when it prepared the optimizer.
            owner, name = trainer.optimizer, "_optimizer_patched_step_method"
        elif isinstance(trainer.optimizer, AcceleratedOptimizer):
            owner, name = trainer.optimizer.optimizer, "step"
        else:
            owner, name = trainer.optimizer, "step"
        if owner is None or getattr(getattr(owner, name), GUARDED_STEP, False):
            return

        step = getattr(owner, name)
        self.wrapped.append((owner, name, owner.__dict__.get(name, _ABSENT)))

        @functools.wraps(step)  # keeps the mark a learning-rate scheduler puts on its optimizer's `step`
        def step_unless_skipped(*args, **kwargs):
            # A zero gradient is not enough: Adam's moments would still move the weights. ZeRO calls this once per
            # parameter group: the decision belongs to the optimizer step, not to one call.
            if self.skip:
                if flags_overflow is not None:
                    # Read by the engine right after the step: it then holds the learning-rate schedule and counts
                    # the step skipped, as on the steps ZeRO skips itself. ZeRO resets it at its next step.
                    flags_overflow.overflow = True
                return None
            return step(*args, **kwargs)

        setattr(step_unless_skipped, GUARDED_STEP, True)
        setattr(owner, name, step_unless_skipped)

    def uninstall(self) -> None:
        """Give every wrapped optimizer its own `step` back, and forget a step left half-accumulated by an error."""
        for owner, name, own in reversed(self.wrapped):
            if own is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        self.wrapped = []
        self.window_losses, self.decided, self.skip, self.cause = [], False, False, None
        self.unmark_skipped()


def check_deepspeed_config(config: dict) -> None:
    """
    Raise a `ValueError` naming the setting and the fix when a DeepSpeed configuration applies updates the non-finite
    guard cannot withhold or NaN gradients nothing checks.

    - ZeRO-3 with part of the optimizer offloaded (`offload_optimizer.ratio` < 1) steps the parameters kept on the
      accelerator with a second optimizer of its own (`backup_optimizer`), beside the `basic_optimizer` the guard
      wraps.
    - DeepSpeed without ZeRO (stage 0) in fp32 checks no gradient: NaN gradients under a finite loss would be applied
      (fp16 and bf16 have their own check).
    """
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    offload = zero.get("offload_optimizer") or {}
    ratio = offload.get("ratio", 1.0)
    if stage == 3 and offload.get("device", "none") not in ("none", None) and float(ratio) < 1.0:
        raise ValueError(
            f"DeepSpeed ZeRO-3 with a partial optimizer offload (offload_optimizer.ratio={ratio}) updates the "
            "parameters it keeps on the accelerator with a second optimizer (ZeRO's backup_optimizer), whose update "
            "VPPO's non-finite guard cannot withhold after a NaN or infinite loss. Offload the whole optimizer "
            "(ratio 1.0, the default) or none of it."
        )
    enabled = {
        precision: str((config.get(precision) or {}).get("enabled", False)).lower() == "true"
        for precision in ("fp16", "bf16", "bfloat16")
    }
    if stage == 0 and not any(enabled.values()):
        raise ValueError(
            "DeepSpeed without ZeRO (zero_optimization.stage 0) in fp32 checks no gradient for NaN or infinite "
            "values, so NaN gradients under a finite loss would reach the weights past VPPO's non-finite guard. Use "
            "ZeRO stage 1, 2 or 3, or train without DeepSpeed (DDP), where the guard checks the gradients itself."
        )
