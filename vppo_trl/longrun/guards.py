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


class NonFiniteLossGuardMixin(SharedStateMixin):
    """
    Skips every optimizer step whose loss or gradients are NaN or infinite, for [`~trl.GRPOTrainer`] subclasses.

    fp16 overflow, a bf16 backward overflow or a corrupt sample can make one batch's loss or gradients NaN; applying
    them would turn every weight into NaN and the rest of a long run into waste. The loss goes back as it is (a
    loss scaler and DDP then see what happened, see [`NonFiniteStepGuard`]), and the optimizer step it belongs to is
    skipped on every process whenever any of them saw a non-finite loss, or the step's gradients are not finite. After
    `max_consecutive_nonfinite_steps` skipped optimizer steps in a row, training stops with an error; the checkpoints
    already written are untouched.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._nonfinite_guard = NonFiniteStepGuard(self)
        self.add_callback(self._nonfinite_guard)

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
        if trainer.is_deepspeed_enabled:
            engine = trainer.model_wrapped
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

        @functools.wraps(step)  # keeps the mark a learning-rate scheduler puts on its optimizer's `step`
        def step_unless_skipped(*args, **kwargs):
            # A zero gradient is not enough: Adam's moments would still move the weights. ZeRO calls this once per
            # parameter group: the decision belongs to the optimizer step, not to one call.
            if self.skip:
                return None
            return step(*args, **kwargs)

        setattr(step_unless_skipped, GUARDED_STEP, True)
        setattr(owner, name, step_unless_skipped)
