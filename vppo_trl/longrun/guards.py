"""A training loss that is NaN or infinite never moves the weights."""

import functools
import warnings

import torch
from accelerate.optimizer import AcceleratedOptimizer

from ..method.shared_state import SharedStateMixin

# Marks a `step` already wrapped by the guard.
GUARDED_STEP = "_skips_nonfinite_loss_steps"


class NonFiniteLossGuardMixin(SharedStateMixin):
    """
    Skips the optimizer step of a non-finite training loss, for [`~trl.GRPOTrainer`] subclasses.

    fp16 overflow or a corrupt sample can make one batch's loss NaN; applying its gradient would turn every weight
    into NaN and the rest of a long run into waste. The optimizer step such a batch belongs to is skipped instead
    (the batch back-propagates a zero loss, or under DeepSpeed its own loss, whose gradients the step then drops),
    with a warning naming the step; the share of skipped losses is logged as `vppo/nonfinite_loss_skipped`. All
    processes skip together when any of them sees a non-finite loss. The skipped step leaves the weights and the
    optimizer's state as they were, with DDP, ZeRO-2 and ZeRO-3 alike and whether the Trainer or DeepSpeed's config
    built the optimizer. The learning-rate schedule advances with `global_step`, except where DeepSpeed notices the
    non-finite gradients itself and skips the step as an overflow (ZeRO-2 and ZeRO-3 by default), which holds it. After
    `max_consecutive_nonfinite_steps` skipped losses in a row, training stops with an error; checkpoints already
    written are untouched.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._consecutive_nonfinite_losses = 0
        # The `global_step` (steps done so far) whose update is skipped; every micro-batch of that step shares it.
        self._skipped_update_step: int | None = None

    def _skip_update_of_skipped_step(self) -> None:
        """Make the optimizer that updates the weights pass over `_skipped_update_step`."""
        if self.is_deepspeed_enabled:
            # The engine's ZeRO optimizer (fp32 master partitions, gradient buffers) wraps `basic_optimizer`: skipping
            # only its update lets ZeRO clear the step's gradients as usual and copy back unchanged master weights.
            optimizer = self.model_wrapped.basic_optimizer
        elif isinstance(self.optimizer, AcceleratedOptimizer):
            optimizer = self.optimizer.optimizer
        else:
            optimizer = self.optimizer
        if optimizer is not None and not getattr(optimizer.step, GUARDED_STEP, False):
            optimizer.step = self._unless_skipped(optimizer.step)

    def _unless_skipped(self, step):
        @functools.wraps(step)  # keeps the mark a learning-rate scheduler puts on its optimizer's `step`
        def step_unless_skipped(*args, **kwargs):
            # A zero gradient is not enough: Adam's moments would still move the weights. ZeRO calls this once per
            # parameter group, so the decision belongs to the training step, not to one call.
            if self._skipped_update_step == self.state.global_step:
                return None
            return step(*args, **kwargs)

        setattr(step_unless_skipped, GUARDED_STEP, True)
        return step_unless_skipped

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self.model.training:
            return loss
        local_nonfinite = (~torch.isfinite(loss.detach())).any().float()
        processes = int(self.accelerator.reduce(local_nonfinite, reduction="sum").item())
        nonfinite = processes > 0
        self._metrics["train"]["vppo/nonfinite_loss_skipped"].append(float(nonfinite))
        if not nonfinite:
            self._consecutive_nonfinite_losses = 0
            return loss
        self._consecutive_nonfinite_losses += 1
        self._skipped_update_step = self.state.global_step
        self._skip_update_of_skipped_step()
        step = self.state.global_step + 1
        limit = self.args.max_consecutive_nonfinite_steps
        if self._consecutive_nonfinite_losses >= limit:
            raise RuntimeError(
                f"Step {step}: the training loss was NaN or infinite {limit} times in a row "
                f"(max_consecutive_nonfinite_steps={limit}). Training stopped; the checkpoints already written are "
                "kept. Likely causes: a learning rate too high, fp16 overflow (use bf16), or corrupt data."
            )
        warnings.warn(
            f"Step {step}: the training loss is NaN or infinite on {processes} of {self.accelerator.num_processes} "
            f"process(es) (here: {loss.detach().float().sum().item()}); this optimizer step is skipped on all of "
            f"them, {self._consecutive_nonfinite_losses} in a row.",
            stacklevel=2,
        )
        if self.is_deepspeed_enabled:
            # ZeRO-3 keeps only a shard of each parameter outside the forward pass, so gradients reach the parameters
            # only through the forward's own graph: the loss goes back as it is and ZeRO drops the step's gradients.
            return loss
        # A zero loss through every trainable parameter, so that DDP's gradient hooks still fire.
        return sum(parameter.sum() for parameter in model.parameters() if parameter.requires_grad) * 0.0
