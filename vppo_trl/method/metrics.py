"""VPPO's logged metrics, as pure functions: per-process sums, then ratios of the sums over all processes."""

import torch

from .core import trajectory_dependency


def dependency_sums(
    dependency: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, measured: torch.Tensor, with_image: torch.Tensor
) -> dict[str, torch.Tensor]:
    """
    Counts and sums of one process's generation batch, to be added up over processes before taking ratios.

    Args:
        dependency: `[B, T]` token dependencies; mask: `[B, T]` loss mask; keep: `[B, T]` tokens TGF trains;
        measured: `[B]` completions whose dependency was measured; with_image: `[B]` completions with an image.
    """
    valid = mask.bool() & measured.unsqueeze(-1)
    selected = valid & keep
    rejected = valid & ~keep
    return {
        "tokens": valid.sum(),
        "selected_tokens": selected.sum(),
        "rejected_tokens": rejected.sum(),
        "dependency": (dependency * valid).sum(),
        "selected_dependency": (dependency * selected).sum(),
        "rejected_dependency": (dependency * rejected).sum(),
        "trajectory_dependency": (trajectory_dependency(dependency, mask) * measured).sum(),
        "samples": measured.sum(),
        "skipped": (with_image & ~measured).sum(),
        "with_image": with_image.sum(),
    }


def dependency_metrics(totals: dict[str, float], scales: torch.Tensor, shapeable: torch.Tensor) -> dict[str, float]:
    """The `vppo/...` metrics from the summed `dependency_sums` and the TAS scales of the whole batch."""
    metrics = {}
    ratios = {
        "vppo/token_fraction": ("selected_tokens", "tokens"),
        "vppo/dependency_mean": ("dependency", "tokens"),
        "vppo/dependency_selected_mean": ("selected_dependency", "selected_tokens"),
        "vppo/dependency_rejected_mean": ("rejected_dependency", "rejected_tokens"),
        "vppo/trajectory_dependency_mean": ("trajectory_dependency", "samples"),
        "vppo/skipped_fraction": ("skipped", "with_image"),
    }
    for name, (numerator, denominator) in ratios.items():
        if totals[denominator] > 0:  # no such token or sample in the batch: nothing to log
            metrics[name] = totals[numerator] / totals[denominator]
    shaped = scales[shapeable.bool()] if bool(shapeable.any()) else torch.ones(1)
    low, mean, high = torch.stack([shaped.min(), shaped.mean(), shaped.max()]).tolist()
    metrics.update(
        {
            "vppo/advantage_scale_min": low,
            "vppo/advantage_scale_mean": mean,
            "vppo/advantage_scale_max": high,
            "vppo/beta_max": high,
        }
    )
    return metrics


def guard_metrics(kept_dependency: float | None, openness: float, filter_ratio: float) -> dict[str, float]:
    """
    The cold-start guard's `vppo/guard_...` metrics: its statistic (the mean dependency of the tokens TGF keeps at
    its configured ratio; absent when no completion has a policy gradient), its openness (0: GRPO, 1: VPPO) and the
    TGF ratio it applied.
    """
    metrics = {"vppo/guard_openness": openness, "vppo/guard_filter_ratio": filter_ratio}
    if kept_dependency is not None:
        metrics["vppo/guard_dependency"] = kept_dependency
    return metrics
