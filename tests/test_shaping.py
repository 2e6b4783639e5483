"""The shaping of a generation batch (TGF, TAS, the cold-start guard) as one pure function, on plain tensors."""

import math
import threading
from dataclasses import fields
from fractions import Fraction

import pytest
import torch

from vppo_trl import VPPOConfig
from vppo_trl.method.core import (
    advantage_scales,
    guard_openness,
    guarded_advantage_scales,
    guarded_filter_ratio,
    kept_token_counts,
    sign_balanced_scales,
    top_dependency_mask,
    trajectory_dependency,
)
from vppo_trl.method.shaping import ShapingSettings, shape_advantages


def batch(rows: int = 8, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A generation batch's measurement: ragged masks, k3-like dependencies, GRPO-like advantages (some zero)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length) < lengths.unsqueeze(-1)).long()
    dependency = torch.rand(rows, length, generator=generator) ** 4 * mask
    advantages = torch.randn(rows, generator=generator)
    advantages[::4] = 0.0
    shapeable = advantages != 0
    return {
        "advantages": advantages,
        "dependency": dependency,
        "mask": mask,
        "measured": torch.ones(rows, dtype=torch.bool),
        "shapeable": shapeable,
        "with_image": torch.ones(rows, dtype=torch.bool),
    }


def shape(settings: ShapingSettings, inputs: dict, **kwargs):
    return shape_advantages(
        settings,
        inputs["advantages"],
        inputs["dependency"],
        inputs["mask"],
        inputs["measured"],
        inputs["shapeable"],
        inputs["with_image"],
        **kwargs,
    )


def test_settings_have_vppo_configs_defaults_and_read_a_config():
    config = VPPOConfig(output_dir="unused", use_cpu=True, cold_start_guard=True, token_filter_ratio=0.3)
    defaults = VPPOConfig.__dataclass_fields__
    for setting in fields(ShapingSettings):
        assert setting.default == defaults[setting.name].default, setting.name
    assert ShapingSettings.of(config) == ShapingSettings(cold_start_guard=True, token_filter_ratio=0.3)


def test_vppo_is_tgf_mask_times_tas_scale_times_advantage():
    inputs = batch()
    shaped = shape(ShapingSettings(), inputs)
    keep = top_dependency_mask(inputs["dependency"], inputs["mask"], 0.4)
    scales = advantage_scales(trajectory_dependency(inputs["dependency"], inputs["mask"]), inputs["shapeable"])
    torch.testing.assert_close(shaped.keep, keep, rtol=0, atol=0)
    torch.testing.assert_close(shaped.scales, scales, rtol=0, atol=0)
    expected = (inputs["advantages"] * scales).unsqueeze(-1) * keep
    torch.testing.assert_close(shaped.advantages, expected, rtol=0, atol=0)
    metrics = shaped.metrics()
    assert metrics["vppo/token_fraction"] == pytest.approx(keep.sum().item() / inputs["mask"].sum().item())
    assert metrics["vppo/advantage_scale_mean"] == pytest.approx(1.0, abs=1e-6)
    assert not any(name.startswith("vppo/guard") for name in metrics)


def test_everything_off_is_grpo():
    inputs = batch()
    shaped = shape(ShapingSettings(token_filter_ratio=1.0, advantage_shaping=False), inputs)
    assert shaped.advantages is not inputs["advantages"] and shaped.advantages.shape == inputs["advantages"].shape
    torch.testing.assert_close(shaped.advantages, inputs["advantages"], rtol=0, atol=0)
    assert torch.equal(shaped.keep, inputs["mask"].bool()) and torch.equal(shaped.scales, torch.ones(8))


def test_only_measured_completions_are_filtered():
    inputs = batch()
    inputs["measured"] = inputs["shapeable"].clone()  # skip_zero_advantage: the others were not measured
    shaped = shape(ShapingSettings(advantage_shaping=False), inputs)
    unmeasured = ~inputs["measured"]
    assert torch.equal(shaped.keep[unmeasured], inputs["mask"][unmeasured].bool())
    assert shaped.metrics()["vppo/skipped_fraction"] == pytest.approx(unmeasured.float().mean().item())


def test_guard_blend_and_balance_follow_the_core_functions():
    inputs = batch()
    settings = ShapingSettings(cold_start_guard=True, cold_start_guard_floor=1e-3, cold_start_guard_full=1.0)
    shaped = shape(settings, inputs)
    assert 0.0 < shaped.openness < 1.0  # part-open
    assert shaped.filter_ratio == guarded_filter_ratio(0.4, shaped.openness)
    assert shaped.openness == guard_openness(shaped.guard_dependency, 1e-3, 1.0)
    keep = top_dependency_mask(inputs["dependency"], inputs["mask"], shaped.filter_ratio)
    scales = advantage_scales(trajectory_dependency(inputs["dependency"], inputs["mask"]), inputs["shapeable"])
    scales = sign_balanced_scales(
        guarded_advantage_scales(scales, shaped.openness), inputs["advantages"], inputs["shapeable"]
    )
    torch.testing.assert_close(shaped.keep, keep, rtol=0, atol=0)
    torch.testing.assert_close(shaped.scales, scales, rtol=0, atol=0)
    metrics = shaped.metrics()
    assert (
        metrics["vppo/guard_openness"] == shaped.openness and metrics["vppo/guard_filter_ratio"] == shaped.filter_ratio
    )
    assert "vppo/guard_sign_gap" in metrics


@pytest.mark.parametrize("length", [512, 2048, 4096, 8192, 65536])
def test_a_part_open_guard_keeps_exact_counts_of_long_completions(length):
    """At a kept-token dependency of 0.06 the default guard is 47.7% open: TGF keeps ceil(0.7137... n) tokens."""
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length // 3 :] = 0  # and a shorter one
    dependency = torch.full((2, length), 0.06) * mask
    dependency[:, 0] = 0.061  # not all equal, so that the kept tokens are a choice
    inputs = {
        "advantages": torch.tensor([1.0, -1.0]),
        "dependency": dependency,
        "mask": mask,
        "measured": torch.ones(2, dtype=torch.bool),
        "shapeable": torch.ones(2, dtype=torch.bool),
        "with_image": torch.ones(2, dtype=torch.bool),
    }
    shaped = shape(ShapingSettings(cold_start_guard=True), inputs)
    assert 0.4 < shaped.openness < 0.5
    valid = mask.sum(-1).tolist()
    ratio = Fraction(repr(shaped.filter_ratio))
    assert shaped.keep.sum(-1).tolist() == [math.ceil(ratio * n) for n in valid]
    assert shaped.keep[:, 0].all()
    token_fraction = shaped.metrics()["vppo/token_fraction"]
    assert token_fraction == pytest.approx(shaped.keep.sum().item() / sum(valid))
    assert token_fraction == pytest.approx(shaped.filter_ratio, abs=2 / min(valid))


def test_random_and_entropy_criteria():
    inputs = batch()
    settings = ShapingSettings(token_filter_criterion="random", advantage_shaping=False)
    first = shape(settings, inputs, generator=torch.Generator().manual_seed(1)).keep
    again = shape(settings, inputs, generator=torch.Generator().manual_seed(1)).keep
    assert torch.equal(first, again)
    assert first.sum(-1).tolist() == kept_token_counts(inputs["mask"].sum(-1), 0.4).tolist()
    entropies = torch.rand(inputs["mask"].shape, generator=torch.Generator().manual_seed(2))
    by_entropy = shape(ShapingSettings(token_filter_criterion="entropy"), inputs, entropies=entropies).keep
    assert torch.equal(by_entropy, top_dependency_mask(entropies, inputs["mask"], 0.4))
    with pytest.raises(ValueError, match="needs the original-image entropies"):
        shape(ShapingSettings(token_filter_criterion="entropy"), inputs)


class SimulatedProcesses:
    """The collectives of `size` processes simulated by threads: `gather` concatenates, `reduce_sum` adds up."""

    def __init__(self, size: int):
        self.barrier = threading.Barrier(size)
        self.slots: list = [None] * size

    def collectives(self, rank: int) -> dict:
        def exchange(tensor):
            self.slots[rank] = tensor
            self.barrier.wait()
            values = list(self.slots)
            self.barrier.wait()
            return values

        return {
            "gather": lambda tensor: torch.cat(exchange(tensor)),
            "reduce_sum": lambda tensor: torch.stack(exchange(tensor)).sum(0),
            "process_index": rank,
        }


@pytest.mark.parametrize(
    "settings",
    [
        ShapingSettings(),
        ShapingSettings(cold_start_guard=True, cold_start_guard_floor=1e-3, cold_start_guard_full=1.0),
    ],
    ids=["vppo", "guard"],
)
def test_two_processes_shape_their_halves_as_one_process_shapes_the_whole_batch(settings):
    inputs = batch(rows=8)
    whole = shape(settings, inputs)
    processes = SimulatedProcesses(2)
    results = [None, None]

    def run(rank):
        half = {name: value[4 * rank : 4 * rank + 4] for name, value in inputs.items()}
        results[rank] = shape(settings, half, **processes.collectives(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.testing.assert_close(torch.cat([result.advantages for result in results]), whole.advantages)
    for result in results:
        torch.testing.assert_close(result.all_scales, whole.all_scales)
        assert (
            result.openness == pytest.approx(whole.openness) if settings.cold_start_guard else result.openness is None
        )
        assert result.metrics() == pytest.approx(whole.metrics())


def test_settings_that_divide_zero_by_zero_are_refused_with_the_fields_named():
    with pytest.raises(
        ValueError, match=r"advantage_scale_min=0.0 must be > 0 with cold_start_guard and cold_start_guard_balance"
    ):
        ShapingSettings(advantage_scale_min=0.0, cold_start_guard=True)
    ShapingSettings(advantage_scale_min=0.0, cold_start_guard=True, cold_start_guard_balance=False)  # no balance
    ShapingSettings(advantage_scale_min=0.0)  # no guard, no balance
    with pytest.raises(ValueError, match=r"advantage_scale_max=0.0 must be > 0"):
        ShapingSettings(advantage_scale_min=0.0, advantage_scale_max=0.0)
