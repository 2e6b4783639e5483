"""The state VPPOTrainer's parts share, in one place, and the order its mixins must have.

VPPOTrainer is GRPOTrainer plus mixins that each do one thing (the measurement passes, dynamic sampling, exact resume,
the non-finite-loss guard, image-less processes). A few facts are read by more than one of them; they live in
[`SharedState`] (`trainer.shared`), whose fields say who writes and who reads each. Everything else a mixin keeps
is private to it. The mixins cooperate through `super()`, so their order in the bases matters where one extends what
another defines; [`MIXIN_ORDER`] lists those constraints, and a class that breaks one fails when it is defined.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .perturbations import PixelLayout

# (earlier, later, why): `earlier` must come before `later` in the method resolution order of any class using both.
MIXIN_ORDER = (
    (
        "VisualDependencyPassesMixin",
        "DynamicSamplingMixin",
        "the passes add their per-completion fields to each generation round that dynamic sampling runs "
        "(`_generate_and_score_round`)",
    ),
    (
        "DynamicSamplingMixin",
        "ExactResumeMixin",
        "dynamic sampling adds its prompt-stream position to the training state that exact resume saves "
        "(`_training_state`) and defers the RNG restore until its stream is rebuilt (`_load_rng_state`)",
    ),
)


@dataclass
class SharedState:
    """What more than one part of VPPOTrainer reads (`trainer.shared`); any other attribute is private to its part."""

    forward_passes_must_match: bool
    """Parameters are sharded (ZeRO-3, FSDP) over several processes, so every process must run the same forward
    passes. Fixed at start. Read by the passes, the trainer and `ImagelessProcessMixin`."""

    has_dropout: bool
    """The model has dropout, so train-mode log-probs cannot stand in for VPPO's eval-mode ones. Fixed at start. Read
    by the passes and the trainer."""

    pixel_layout: PixelLayout | None = None
    """How the processor lays images out in `pixel_values`. Written by `VisualDependencyPassesMixin` once it has
    checked the model; read by the passes and the spotlight callback."""

    perturbation_round: int = 0
    """Generation batches measured so far: part of each perturbation's seed. Written by VPPOTrainer (one per
    generation batch) and restored on resume; read by the passes."""

    resumed: dict[str, Any] | None = None
    """The checkpoint's per-process training state while `train` resumes from it. Written by `ExactResumeMixin`;
    read by it and by `DynamicSamplingMixin` (the prompt stream's position)."""

    spotlight_capture: Callable[..., None] | None = None
    """Set by `SpotlightCallback` on the steps it writes; VPPOTrainer calls it with what it measured for the batch."""


def check_mixin_order(cls: type) -> None:
    """Raise a `TypeError` naming the mixins and the reason when `cls`'s bases break a [`MIXIN_ORDER`] constraint."""
    names = [klass.__name__ for klass in cls.__mro__]
    for earlier, later, why in MIXIN_ORDER:
        if earlier in names and later in names and names.index(earlier) > names.index(later):
            raise TypeError(f"{cls.__name__}: {earlier} must come before {later} in the class's bases, since {why}.")
    if "GRPOTrainer" in names:
        grpo = names.index("GRPOTrainer")
        late = [
            klass.__name__
            for klass in cls.__mro__[grpo:]
            if issubclass(klass, SharedStateMixin) and klass is not SharedStateMixin
        ]
        if late:
            raise TypeError(
                f"{cls.__name__}: {', '.join(late)} must come before GRPOTrainer in the class's bases, or "
                "GRPOTrainer's methods would hide theirs."
            )


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a train-mode forward of `model` is random: a dropout layer (LoRA's included) or attention dropout."""
    dropout_layers = (
        torch.nn.Dropout,
        torch.nn.Dropout1d,
        torch.nn.Dropout2d,
        torch.nn.Dropout3d,
        torch.nn.AlphaDropout,
        torch.nn.FeatureAlphaDropout,
    )
    for module in model.modules():
        attention_dropout = getattr(module, "attention_dropout", None)  # a probability in transformers' attention
        if (isinstance(module, dropout_layers) and module.p > 0) or (
            isinstance(attention_dropout, float | int) and attention_dropout > 0
        ):
            return True
    return False


class SharedStateMixin:
    """
    Base of VPPOTrainer's mixins. It sits after all of them, right above GRPOTrainer, so `self.shared` exists before
    any mixin's `__init__` goes on after `super().__init__()`; and every subclass's mixin order is checked when it is
    defined.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_mixin_order(cls)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared = SharedState(
            forward_passes_must_match=self.accelerator.num_processes > 1
            and (is_deepspeed_zero3_enabled() or self.is_fsdp_enabled),
            has_dropout=has_dropout(self.model),
        )
