"""VPPO's advantage shaping of one generation batch, as one pure function over tensors.

[`shape_advantages`] takes what the measurement gave for a generation batch (each token's visual dependency, the loss
mask, GRPO's advantages, which completions were measured) and returns the advantages TGF and TAS turn them into, with
everything the logged metrics need ([`ShapedBatch`]). It does, in this order:

1. the cold-start guard's openness, from the kept tokens' mean dependency summed over all processes (if the guard
   is on);
2. TGF's kept tokens, at the configured ratio or the guard's blend of it, by the configured criterion (dependency,
   random, entropy), in the measured completions (the others keep every token);
3. TAS's scales over the whole generation batch of all processes, blended and sign-balanced by the guard (if on);
4. the shaped advantages `alpha_i * A_i * m[i, t]`, and the dependency sums of the metrics, over all processes.

The statistics that span processes go through the two collectives it is given, `gather` (concatenate a tensor over
processes) and `reduce_sum` (add it up over processes); both default to the identity, for one process, so that the
function can be called and tested on plain tensors. `VPPOTrainer` passes its accelerator's and the spotlight the
identity (one prompt group); both call this same function with [`ShapingSettings`] read from [`VPPOConfig`].
"""

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .core import (
    advantage_scales,
    guard_openness,
    guarded_advantage_scales,
    guarded_filter_ratio,
    kept_dependency_sums,
    random_token_mask,
    sign_balanced_scales,
    sign_scale_gap,
    top_dependency_mask,
    top_entropy_mask,
    trajectory_dependency,
)
from .metrics import dependency_metrics, dependency_sums, guard_metrics

Collective = Callable[[torch.Tensor], torch.Tensor]


def one_process(tensor: torch.Tensor) -> torch.Tensor:
    """The collectives of a single process: the tensor itself."""
    return tensor


@dataclass(frozen=True)
class ShapingSettings:
    """The [`VPPOConfig`] fields that shape a generation batch's advantages, with its defaults (see its docstring)."""

    token_filter_ratio: float = 0.4
    token_filter_criterion: str = "dependency"
    advantage_shaping: bool = True
    advantage_scale_min: float = 0.9
    advantage_scale_max: float | None = None
    advantage_scale_max_cap: float | None = None
    cold_start_guard: bool = False
    cold_start_guard_floor: float = 0.02
    cold_start_guard_full: float = 0.2
    cold_start_guard_balance: bool = True

    def __post_init__(self):
        # The settings whose arithmetic would divide 0 by 0 somewhere in a batch, refused before any batch.
        balanced = self.advantage_shaping and self.cold_start_guard and self.cold_start_guard_balance
        if balanced and self.advantage_scale_min <= 0:
            raise ValueError(
                f"advantage_scale_min={self.advantage_scale_min} must be > 0 with cold_start_guard and "
                "cold_start_guard_balance on: the balance divides each side of the advantage's sign by its mean TAS "
                "scale, which is 0 when that side's only completion has the lowest dependency (scale "
                "advantage_scale_min). Raise advantage_scale_min or set cold_start_guard_balance=False."
            )
        if self.advantage_shaping and self.advantage_scale_max is not None and self.advantage_scale_max <= 0:
            raise ValueError(
                f"advantage_scale_max={self.advantage_scale_max} must be > 0: every TAS scale would be 0, and every "
                "advantage with it."
            )

    @classmethod
    def of(cls, config) -> "ShapingSettings":
        """The shaping settings of a [`VPPOConfig`] (or of any object with these fields)."""
        return cls(**{setting.name: getattr(config, setting.name) for setting in fields(cls)})


@dataclass
class ShapedBatch:
    """What [`shape_advantages`] gives for one process's share of a generation batch."""

    advantages: torch.Tensor
    """The shaped advantages: `[B, T]` per token when TGF is configured (`token_filter_ratio < 1`), else `[B]`."""
    keep: torch.Tensor
    """`[B, T]` bool, the tokens that keep their policy gradient (TGF's choice in the measured completions)."""
    scales: torch.Tensor
    """`[B]` this process's TAS scales (1 where TAS is off or a completion is not shaped)."""
    all_scales: torch.Tensor
    """`[N]` the TAS scales of the whole generation batch, all processes."""
    all_shapeable: torch.Tensor
    """`[N]` bool, the completions of the whole generation batch that TAS's statistics cover."""
    filter_ratio: float
    """The ratio TGF applied: `token_filter_ratio`, or the guard's blend of it."""
    totals: dict[str, float]
    """[`dependency_sums`] added up over processes: the counts and sums the `vppo/...` metrics are ratios of."""
    openness: float | None = None
    """The cold-start guard's openness (None without the guard)."""
    guard_dependency: float | None = None
    """The guard's statistic, the kept tokens' mean dependency (None without the guard or without a completion with a
    policy gradient)."""
    sign_gap: float | None = None
    """The TAS scale gap between the two sides of the advantage's sign that the guard's balance removed (None when the
    balance did not run or one side is empty)."""

    def metrics(self) -> dict[str, float]:
        """The `vppo/...` metrics of the batch: dependencies, TGF's kept share, TAS's scales, the guard."""
        metrics = dependency_metrics(self.totals, self.all_scales, self.all_shapeable)
        if self.openness is not None:
            metrics.update(guard_metrics(self.guard_dependency, self.openness, self.filter_ratio))
        if self.sign_gap is not None:
            metrics["vppo/guard_sign_gap"] = self.sign_gap
        return metrics


def shape_advantages(
    settings: ShapingSettings,
    advantages: torch.Tensor,
    dependency: torch.Tensor,
    mask: torch.Tensor,
    measured: torch.Tensor,
    shapeable: torch.Tensor,
    with_image: torch.Tensor,
    *,
    entropies: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    process_index: int = 0,
    gather: Collective = one_process,
    reduce_sum: Collective = one_process,
) -> ShapedBatch:
    """
    TGF and TAS (and the cold-start guard) folded into one process's share of a generation batch's advantages.

    Every process calls it on its own rows, with the same settings, and gets the same guard openness and the same
    scales of the whole batch; it issues the same collectives on every process, in the same order: one `reduce_sum`
    with the guard on, two `gather`s (three with the guard's balance) and one `reduce_sum` of the metrics' sums.

    Args:
        settings: TGF's, TAS's and the guard's settings.
        advantages: `[B]` GRPO's advantages.
        dependency: `[B, T]` token dependencies (0 where not measured).
        mask: `[B, T]` loss mask (completion tokens, less tool outputs).
        measured: `[B]` bool, the completions whose dependency was measured: TGF filters only these.
        shapeable: `[B]` bool, the completions TAS's statistics cover (measured, with an image, a token and a
            non-zero advantage); the guard reads these too.
        with_image: `[B]` bool, the completions with an image and a token (for `vppo/skipped_fraction`).
        entropies: `[B, T]` original-image entropies, for `token_filter_criterion="entropy"`.
        generator: the random source of `token_filter_criterion="random"`.
        process_index: this process's rank: its rows are `[process_index * B, (process_index + 1) * B)` of the
            gathered batch (every process holds `B` completions).
        gather: concatenates a tensor over processes, in rank order (`Accelerator.gather`).
        reduce_sum: adds a tensor up over processes (`Accelerator.reduce(..., "sum")`).
    """
    openness, guard_dependency, ratio = None, None, settings.token_filter_ratio
    if settings.cold_start_guard:
        sums = kept_dependency_sums(dependency, mask, shapeable, settings.token_filter_ratio)
        total, count = reduce_sum(sums).tolist()
        guard_dependency = total / count if count > 0 else None
        openness = 0.0
        if guard_dependency is not None:
            openness = guard_openness(
                guard_dependency, settings.cold_start_guard_floor, settings.cold_start_guard_full
            )
        ratio = guarded_filter_ratio(settings.token_filter_ratio, openness)
    keep = mask.bool()
    if ratio < 1.0:
        filtered = filtered_tokens(settings.token_filter_criterion, ratio, dependency, mask, entropies, generator)
        keep = torch.where(measured.unsqueeze(-1), filtered, keep)

    all_dependency = gather(trajectory_dependency(dependency, mask))
    all_shapeable = gather(shapeable)
    all_scales, sign_gap = torch.ones_like(all_dependency), None
    if settings.advantage_shaping:
        all_scales = advantage_scales(
            all_dependency,
            all_shapeable,
            settings.advantage_scale_min,
            settings.advantage_scale_max,
            settings.advantage_scale_max_cap,
        )
        if settings.cold_start_guard:
            all_scales = guarded_advantage_scales(all_scales, openness)
            if settings.cold_start_guard_balance:
                all_advantages = gather(advantages)
                sign_gap = sign_scale_gap(all_scales, all_advantages, all_shapeable)
                all_scales = sign_balanced_scales(all_scales, all_advantages, all_shapeable)
    first = process_index * len(advantages)
    scales = all_scales[first : first + len(advantages)]
    shaped = advantages * scales.to(advantages.dtype)
    if settings.token_filter_ratio < 1.0:  # per-token advantages whenever TGF is configured, whatever the guard does
        shaped = shaped.unsqueeze(-1) * keep.to(shaped.dtype)

    sums = dependency_sums(dependency, mask, keep, measured, with_image)
    totals = reduce_sum(torch.stack(list(sums.values())).float()).tolist()
    return ShapedBatch(
        advantages=shaped,
        keep=keep,
        scales=scales,
        all_scales=all_scales,
        all_shapeable=all_shapeable,
        filter_ratio=ratio,
        totals=dict(zip(sums, totals, strict=True)),
        openness=openness,
        guard_dependency=guard_dependency,
        sign_gap=sign_gap,
    )


def filtered_tokens(
    criterion: str,
    ratio: float,
    dependency: torch.Tensor,
    mask: torch.Tensor,
    entropies: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TGF's kept tokens at `ratio` by `criterion`: by dependency (VPPO), at random, or by entropy (the ablations)."""
    if criterion == "random":
        return random_token_mask(mask, ratio, generator)
    if criterion == "entropy":
        if entropies is None:
            raise ValueError("token_filter_criterion='entropy' needs the original-image entropies.")
        return top_entropy_mask(entropies, mask, ratio)
    if criterion != "dependency":
        raise ValueError(f"Unknown token_filter_criterion {criterion!r}.")
    return top_dependency_mask(dependency, mask, ratio)
