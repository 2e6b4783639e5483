"""VPPO's logged metrics on a hand-computed batch."""

import pytest
import torch

from vppo_trl.method.metrics import dependency_metrics, dependency_sums, guard_metrics


def test_dependency_metrics_by_hand():
    dependency = torch.tensor([[4.0, 2.0, 0.0], [1.0, 3.0, 5.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    keep = torch.tensor([[True, False, False], [False, True, True], [True, True, True]])
    measured = torch.tensor([True, True, False])  # the third completion was skipped (zero advantage)
    with_image = torch.tensor([True, True, True])
    sums = dependency_sums(dependency, mask, keep, measured, with_image)
    totals = {name: float(value) for name, value in sums.items()}
    assert totals["tokens"] == 5 and totals["selected_tokens"] == 3 and totals["rejected_tokens"] == 2
    scales = torch.tensor([0.9, 1.3, 1.0])
    metrics = dependency_metrics(totals, scales, torch.tensor([True, True, False]))
    assert metrics["vppo/token_fraction"] == pytest.approx(3 / 5)
    assert metrics["vppo/dependency_mean"] == pytest.approx((4 + 2 + 1 + 3 + 5) / 5)
    assert metrics["vppo/dependency_selected_mean"] == pytest.approx((4 + 3 + 5) / 3)
    assert metrics["vppo/dependency_rejected_mean"] == pytest.approx((2 + 1) / 2)
    assert metrics["vppo/trajectory_dependency_mean"] == pytest.approx((3 + 3) / 2)
    assert metrics["vppo/skipped_fraction"] == pytest.approx(1 / 3)
    assert (metrics["vppo/advantage_scale_min"], metrics["vppo/advantage_scale_max"]) == pytest.approx((0.9, 1.3))
    assert metrics["vppo/advantage_scale_mean"] == pytest.approx(1.1)
    assert metrics["vppo/beta_max"] == metrics["vppo/advantage_scale_max"]


def test_nothing_measured_logs_no_ratio_and_unit_scales():
    zeros = torch.zeros(2, 3)
    sums = dependency_sums(
        zeros, torch.ones(2, 3), zeros.bool(), torch.tensor([False, False]), torch.tensor([False, False])
    )
    metrics = dependency_metrics({k: float(v) for k, v in sums.items()}, torch.ones(2), torch.tensor([False, False]))
    assert sorted(metrics) == [
        "vppo/advantage_scale_max",
        "vppo/advantage_scale_mean",
        "vppo/advantage_scale_min",
        "vppo/beta_max",
    ]
    assert set(metrics.values()) == {1.0}


def test_guard_metrics():
    assert guard_metrics(0.02, 0.3, 0.82) == {
        "vppo/guard_openness": 0.3,
        "vppo/guard_filter_ratio": 0.82,
        "vppo/guard_dependency": 0.02,
    }
    assert "vppo/guard_dependency" not in guard_metrics(None, 0.0, 1.0)  # no completion with a gradient
