"""A training loss that is NaN or infinite is never back-propagated."""

import warnings

import torch

from .shared_state import SharedStateMixin


class NonFiniteLossGuardMixin(SharedStateMixin):
    """
    Skips the optimizer step of a non-finite training loss, for [`~trl.GRPOTrainer`] subclasses.

    fp16 overflow or a corrupt sample can make one batch's loss NaN; back-propagating it would turn every weight into
    NaN and the rest of a long run into waste. Such a batch back-propagates a zero loss instead (through every
    trainable parameter, so that distributed gradient hooks still fire) and the optimizer step it belongs to is
    skipped, with a warning naming the step; the share of skipped losses is logged as
    `vppo/nonfinite_loss_skipped`. All processes skip together when any of them sees a non-finite loss. After
    `max_consecutive_nonfinite_steps` skipped losses in a row, training stops with an error; checkpoints already
    written are untouched.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._consecutive_nonfinite_losses = 0
        self._skip_optimizer_step = False

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        step = optimizer.step

        def step_unless_skipped(*step_args, **step_kwargs):
            # A zero gradient is not enough: Adam's moments would still move the weights.
            if self._skip_optimizer_step:
                self._skip_optimizer_step = False
                return None
            return step(*step_args, **step_kwargs)

        optimizer.step = step_unless_skipped
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self.model.training:
            return loss
        nonfinite = (~torch.isfinite(loss.detach())).any().float()
        nonfinite = bool(self.accelerator.reduce(nonfinite, reduction="sum") > 0)
        self._metrics["train"]["vppo/nonfinite_loss_skipped"].append(float(nonfinite))
        if not nonfinite:
            self._consecutive_nonfinite_losses = 0
            return loss
        self._consecutive_nonfinite_losses += 1
        self._skip_optimizer_step = True
        step = self.state.global_step + 1
        limit = self.args.max_consecutive_nonfinite_steps
        if self._consecutive_nonfinite_losses >= limit:
            raise RuntimeError(
                f"Step {step}: the training loss was NaN or infinite {limit} times in a row "
                f"(max_consecutive_nonfinite_steps={limit}). Training stopped; the checkpoints already written are "
                "kept. Likely causes: a learning rate too high, fp16 overflow (use bf16), or corrupt data."
            )
        warnings.warn(
            f"Step {step}: the training loss is {loss.detach().float().sum().item()} on at least one process; this "
            f"optimizer step is skipped, {self._consecutive_nonfinite_losses} in a row.",
            stacklevel=2,
        )
        return sum(parameter.sum() for parameter in model.parameters() if parameter.requires_grad) * 0.0
