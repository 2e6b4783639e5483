"""The algorithm's pure functions against hand-computed cases."""

import math
from decimal import Decimal
from fractions import Fraction

import pytest
import torch

from vppo_trl import advantage_scales, token_dependency, top_dependency_mask, trajectory_dependency
from vppo_trl.method.core import (
    entropy_penalty,
    guard_openness,
    guarded_advantage_scales,
    guarded_filter_ratio,
    kept_dependency_sums,
    kept_token_counts,
    kl_token_dependency,
    random_token_mask,
    sign_balanced_scales,
    sign_scale_gap,
    top_entropy_mask,
)


def k3(d: float) -> float:
    return min(max(math.exp(d) - d - 1, 0.0), 10.0)


class TestTokenDependency:
    def test_hand_computed_values(self):
        logps = torch.tensor([[-1.0, -2.0, -0.5]])
        perturbed = torch.tensor([[-1.5, -1.0, -0.5]])
        mask = torch.tensor([[1, 1, 1]])
        expected = torch.tensor([[k3(-0.5), k3(1.0), 0.0]])
        torch.testing.assert_close(token_dependency(logps, perturbed, mask), expected)

    def test_zero_where_masked_even_for_garbage(self):
        logps = torch.tensor([[-1.0, float("nan"), -math.inf]])
        perturbed = torch.tensor([[-3.0, 0.0, 0.0]])
        mask = torch.tensor([[1, 0, 0]])
        out = token_dependency(logps, perturbed, mask)
        assert out[0, 1] == 0 and out[0, 2] == 0
        assert out[0, 0] == pytest.approx(k3(-2.0))

    def test_extreme_log_probs_are_clamped_and_finite(self):
        logps = torch.tensor([[-1e30, 0.0, -math.inf, 0.0]])
        perturbed = torch.tensor([[0.0, -1e30, 0.0, -math.inf]])
        out = token_dependency(logps, perturbed, torch.ones(1, 4))
        assert torch.isfinite(out).all()
        # d = +20 saturates at the upper clamp; d = -20 gives exp(-20) + 19, also clamped to 10.
        torch.testing.assert_close(out, torch.full((1, 4), 10.0))

    @pytest.mark.parametrize("d", [1e-3, 3e-4, -1e-3, -3e-4])
    def test_small_log_ratios_are_accurate(self, d):
        # float32 exp(d) - d - 1 is 5% off at 1e-3 and gives 0 at 3e-4; expm1(d) - d stays within 1e-3 relative.
        logps = torch.tensor([[-1.0]])
        perturbed = logps + d
        exact_d = perturbed.double() - logps.double()  # the float32 log-ratio the function sees, in float64
        expected = (torch.expm1(exact_d) - exact_d).float()
        out = token_dependency(logps, perturbed, torch.ones(1, 1))
        assert out.item() > 0
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=0)

    def test_never_negative_and_zero_for_identical(self):
        logps = torch.randn(4, 7)
        out = token_dependency(logps, logps, torch.ones(4, 7))
        assert (out == 0).all()
        out = token_dependency(logps, torch.randn(4, 7), torch.ones(4, 7))
        assert (out >= 0).all()


class TestKLDependency:
    def test_matches_torch_kl_div(self):
        logits, perturbed = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
        expected = torch.nn.functional.kl_div(
            perturbed.log_softmax(-1), logits.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        torch.testing.assert_close(kl_token_dependency(logits, perturbed), expected)

    def test_mask_and_identical(self):
        logits = torch.randn(1, 4, 5)
        mask = torch.tensor([[1, 1, 0, 0]])
        out = kl_token_dependency(logits, torch.randn(1, 4, 5), mask)
        assert (out[0, 2:] == 0).all() and (out[0, :2] > 0).all()
        torch.testing.assert_close(kl_token_dependency(logits, logits), torch.zeros(1, 4), atol=1e-6, rtol=0)


class TestTopDependencyMask:
    def test_exact_ceil_rounding(self):
        # float: 0.4 * 15 = 6.000000000000001 -> 7; exact: 6
        assert kept_token_counts(torch.tensor([15]), 0.4).item() == 6
        assert kept_token_counts(torch.tensor([0, 1, 2, 3, 10, 11]), 0.4).tolist() == [0, 1, 1, 2, 4, 5]
        assert kept_token_counts(torch.tensor([7]), 1.0).item() == 7
        assert kept_token_counts(torch.tensor([10]), 0.3).item() == 3  # float gives 3.0000000000000004 -> 4

    def test_counts_are_exact_for_any_ratio_and_length(self):
        """
        ceil(ratio * n) for the guard's blended ratios (17-digit decimals) and users' floats, every n up to 2,048 and
        long completions up to 65,536 and beyond: exactly the decimal's count, never below 1 for n >= 1, never above n.
        """
        blends = [
            guarded_filter_ratio(ratio, guard_openness(statistic, 0.02, 0.2))
            for ratio in (0.4, 0.3, 1 / 3)
            for statistic in torch.logspace(math.log10(0.021), math.log10(0.199), 40, dtype=torch.float64).tolist()
        ]
        user = [1 / 3, 0.1 + 0.2, 2 / 3, 0.4, 0.7, 0.05, 1e-3, 0.999999, 1.0, 1e-12, 0.123456789012345]
        lengths = list(range(2049)) + [4095, 4096, 8191, 8192, 10_000, 32_768, 65_535, 65_536, 10**6, 2**31 - 1]
        counts = torch.tensor(lengths)
        for ratio in blends + user:
            fraction = Fraction(repr(ratio))
            kept = kept_token_counts(counts, ratio).tolist()
            assert kept == [math.ceil(fraction * n) for n in lengths], ratio
            assert kept[0] == 0 and all(1 <= k <= n for k, n in zip(kept[1:], lengths[1:], strict=True)), ratio
        assert any(len(repr(ratio)) >= 18 for ratio in blends)  # the ratios that overflowed int64

    @pytest.mark.parametrize(
        ("ratio", "length", "kept"),
        [("0.4", 15, 6), ("0.3", 10, 3), ("0.35", 20, 7), ("0.7", 10, 7), ("0.15", 20, 3), ("0.1", 8192, 820)],
    )
    def test_few_digit_ratios_keep_the_decimal_count(self, ratio, length, kept):
        assert math.ceil(Decimal(ratio) * length) == kept  # float arithmetic gives one more for the first four
        assert kept_token_counts(torch.tensor([length]), float(ratio)).item() == kept

    def test_long_completions_under_a_part_open_guard_keep_their_count(self):
        ratio = guarded_filter_ratio(0.4, guard_openness(0.06, 0.02, 0.2))  # 0.7137272471682025
        for length in (512, 2048, 4096, 8192):
            out = top_dependency_mask(torch.rand(2, length), torch.ones(2, length), ratio)
            assert out.sum(-1).tolist() == [math.ceil(Fraction(repr(ratio)) * length)] * 2
        third = top_dependency_mask(torch.rand(1, 8192), torch.ones(1, 8192), 1 / 3)
        assert third.sum().item() == 2731

    def test_selects_largest(self):
        dependency = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.2]])
        mask = torch.ones(1, 5)
        out = top_dependency_mask(dependency, mask, 0.4)  # ceil(2.0) = 2
        assert out.tolist() == [[False, True, False, True, False]]

    def test_ties_earlier_position_wins(self):
        dependency = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5]])
        out = top_dependency_mask(dependency, torch.ones(1, 5), 0.4)
        assert out.tolist() == [[True, True, False, False, False]]
        dependency = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.5]])
        out = top_dependency_mask(dependency, torch.ones(1, 5), 0.4)
        assert out.tolist() == [[False, True, False, True, False]]

    def test_never_selects_padding_and_empty_rows(self):
        dependency = torch.tensor([[0.0, 0.1, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0]])
        mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
        out = top_dependency_mask(dependency, mask, 0.5)
        assert out.tolist() == [[False, True, False, False], [False, False, False, False]]

    def test_ratio_one_keeps_every_valid_token(self):
        mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
        out = top_dependency_mask(torch.rand(2, 4), mask, 1.0)
        assert torch.equal(out, mask.bool())

    def test_per_row_counts(self):
        mask = torch.tensor([[1] * 15 + [0] * 5, [1] * 20])
        out = top_dependency_mask(torch.rand(2, 20), mask, 0.4)
        assert out.sum(-1).tolist() == [6, 8]

    @pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
    def test_bad_ratio(self, ratio):
        with pytest.raises(ValueError, match="ratio"):
            top_dependency_mask(torch.rand(1, 3), torch.ones(1, 3), ratio)


class TestAblationMasks:
    """The paper's Table 4 controls keep exactly as many tokens as TGF, chosen at random or by entropy."""

    def test_entropy_keeps_the_most_uncertain_tokens_with_tgf_counts_and_ties(self):
        entropy = torch.tensor([[0.1, 2.0, 0.3, 1.5, 0.2], [0.7, 0.7, 0.7, 0.7, 9.0]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
        out = top_entropy_mask(entropy, mask, 0.4)  # ceil(2.0) = 2 and ceil(1.6) = 2
        assert out.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]

    def test_random_keeps_exactly_ceil_ratio_n_valid_tokens(self):
        mask = torch.tensor([[1] * 15 + [0] * 5, [1] * 20, [1, 1, 1] + [0] * 17, [0] * 20])
        generator = torch.Generator().manual_seed(0)
        for _ in range(20):
            out = random_token_mask(mask, 0.4, generator)
            assert out.sum(-1).tolist() == [6, 8, 2, 0]  # exact ceil: 0.4 x 15 keeps 6, not 7
            assert not (out & ~mask.bool()).any()

    def test_random_is_reproducible_from_the_generator_seed(self):
        mask = torch.ones(4, 30)
        first = random_token_mask(mask, 0.4, torch.Generator().manual_seed(3))
        again = random_token_mask(mask, 0.4, torch.Generator().manual_seed(3))
        other = random_token_mask(mask, 0.4, torch.Generator().manual_seed(4))
        assert torch.equal(first, again)
        assert not torch.equal(first, other)

    def test_random_is_uniform_over_the_valid_positions(self):
        # 4,000 draws of 2 out of 5 valid positions: each is kept 40% of the time (binomial sd 0.8%), padding never.
        mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]]).expand(4000, 7)
        out = random_token_mask(mask, 0.4, torch.Generator().manual_seed(0))
        frequency = out.float().mean(0)
        assert torch.allclose(frequency[:5], torch.full((5,), 0.4), atol=0.04)
        assert frequency[5:].eq(0).all()

    def test_ratio_one_keeps_everything_and_bad_ratio_is_refused(self):
        mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
        assert torch.equal(random_token_mask(mask, 1.0), mask.bool())
        assert torch.equal(top_entropy_mask(torch.rand(2, 3), mask, 1.0), mask.bool())
        with pytest.raises(ValueError, match="ratio"):
            random_token_mask(mask, 0.0)


class TestTrajectoryDependency:
    def test_mean_over_valid_and_empty(self):
        dependency = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 2.0]])
        mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
        assert trajectory_dependency(dependency, mask).tolist() == [2.0, 0.0]


class TestAdvantageScales:
    def test_fixed_range(self):
        scores = torch.tensor([0.0, 0.5, 1.0, 0.25])
        out = advantage_scales(scores, torch.ones(4, dtype=torch.bool), beta_min=0.9, beta_max=1.1)
        torch.testing.assert_close(out, torch.tensor([0.9, 1.0, 1.1, 0.95]))

    def test_dynamic_range_has_mean_one(self):
        scores = torch.tensor([0.2, 0.4, 1.7, 0.9, 0.3])
        out = advantage_scales(scores, torch.ones(5, dtype=torch.bool), beta_min=0.9)
        assert out.mean().item() == pytest.approx(1.0, abs=1e-6)
        assert out.min().item() == pytest.approx(0.9)
        u = (scores - 0.2) / 1.5
        beta_max = 0.9 + 0.1 / (u.mean().item() + 1e-8)
        assert out.max().item() == pytest.approx(beta_max, rel=1e-6)

    def test_excluded_samples_get_one_and_do_not_count(self):
        scores = torch.tensor([0.0, 1.0, 50.0, -3.0])
        valid = torch.tensor([True, True, False, False])
        out = advantage_scales(scores, valid, beta_min=0.5, beta_max=1.5)
        assert out.tolist() == [0.5, 1.5, 1.0, 1.0]

    def test_all_equal_or_single_valid_gives_ones(self):
        assert advantage_scales(torch.full((3,), 0.7), torch.ones(3, dtype=torch.bool)).tolist() == [1.0] * 3
        single = advantage_scales(torch.tensor([0.1, 9.0]), torch.tensor([True, False]))
        assert single.tolist() == [1.0, 1.0]
        assert advantage_scales(torch.rand(3), torch.zeros(3, dtype=torch.bool)).tolist() == [1.0] * 3
        nearly = advantage_scales(torch.tensor([0.5, 0.5 + 1e-7]), torch.ones(2, dtype=torch.bool))
        assert nearly.tolist() == [1.0, 1.0]

    def test_monotone_in_dependency(self):
        scores = torch.rand(16)
        out = advantage_scales(scores, torch.ones(16, dtype=torch.bool))
        order = scores.argsort()
        assert (out[order].diff() >= 0).all()
        assert torch.isfinite(out).all()

    def test_dynamic_beta_max_is_unbounded_and_the_cap_bounds_it(self):
        n = 32
        scores = torch.full((n,), 1e-3)
        scores[0] = 2e-3  # one outlier among near-equal completions
        valid = torch.ones(n, dtype=torch.bool)
        free = advantage_scales(scores, valid, beta_min=0.9)
        assert free.max().item() == pytest.approx(0.9 + 0.1 * n, rel=1e-5)
        capped = advantage_scales(scores, valid, beta_min=0.9, beta_max_cap=2.0)
        assert capped.max().item() == pytest.approx(2.0)
        assert capped[1:].tolist() == pytest.approx([0.9] * (n - 1))
        assert capped.mean().item() < 1.0  # where the cap binds, the mean scale is below 1
        spread = torch.linspace(0.0, 1.0, n)  # beta_max = 0.9 + 0.1 / 0.5 = 1.1: the cap does not bind
        torch.testing.assert_close(
            advantage_scales(spread, valid, beta_max_cap=2.0), advantage_scales(spread, valid), rtol=0, atol=0
        )

    def test_cap_is_unused_with_a_fixed_range(self):
        scores = torch.tensor([0.0, 0.5, 1.0])
        out = advantage_scales(scores, torch.ones(3, dtype=torch.bool), 0.5, beta_max=3.0, beta_max_cap=1.5)
        torch.testing.assert_close(out, torch.tensor([0.5, 1.75, 3.0]))


def guarded_advantages(dependency, mask, advantages, ratio=0.4, floor=0.02, full=0.2):
    """VPPO's per-token advantages under the cold-start guard, from the guard's pure functions."""
    rows = advantages != 0
    total, count = kept_dependency_sums(dependency, mask, rows, ratio).tolist()
    openness = guard_openness(total / count, floor, full)
    keep = top_dependency_mask(dependency, mask, guarded_filter_ratio(ratio, openness))
    scales = guarded_advantage_scales(advantage_scales(trajectory_dependency(dependency, mask), rows), openness)
    return openness, (advantages * scales).unsqueeze(-1) * keep * mask


class TestColdStartGuard:
    def synthetic_batch(self, perceptual: bool):
        generator = torch.Generator().manual_seed(0)
        # A policy that does not read the image: every log-prob moves by a little noise, so dependencies are ~1e-3.
        log_ratio = 0.05 * torch.randn(16, 6, generator=generator)
        logps = torch.full((16, 6), -1.0)
        dependency = token_dependency(logps, logps + log_ratio, torch.ones(16, 6))
        if perceptual:
            dependency[:, 4] = 1.0 + torch.rand(16, generator=generator)  # the token that reads the image
        mask = torch.ones(16, 6)
        mask[::3, 5] = 0
        advantages = torch.randn(16, generator=generator)
        return dependency, mask, advantages

    def test_noise_only_closes_the_guard_and_gives_grpo_weighting(self):
        dependency, mask, advantages = self.synthetic_batch(perceptual=False)
        assert 1e-4 < dependency.mean() < 2e-3  # the noise level of a policy that does not look
        openness, weighted = guarded_advantages(dependency, mask, advantages)
        assert openness == 0.0
        torch.testing.assert_close(weighted, advantages.unsqueeze(-1) * mask, rtol=0, atol=0)

    def test_a_clear_perceptual_token_opens_it_and_leaves_vppo_in_place(self):
        dependency, mask, advantages = self.synthetic_batch(perceptual=True)
        openness, weighted = guarded_advantages(dependency, mask, advantages)
        assert openness == 1.0
        keep = top_dependency_mask(dependency, mask, 0.4)
        assert keep[:, 4].all()  # TGF keeps the perceptual token of every completion
        scales = advantage_scales(trajectory_dependency(dependency, mask), advantages != 0)
        torch.testing.assert_close(weighted, (advantages * scales).unsqueeze(-1) * keep * mask, rtol=0, atol=0)

    def test_openness_is_log_linear_between_floor_and_full(self):
        assert guard_openness(0.0, 0.01, 0.1) == 0.0
        assert guard_openness(0.01, 0.01, 0.1) == 0.0
        assert guard_openness(math.sqrt(0.01 * 0.1), 0.01, 0.1) == pytest.approx(0.5)
        assert guard_openness(0.1, 0.01, 0.1) == 1.0
        assert guard_openness(7.0, 0.01, 0.1) == 1.0

    def test_half_open_blends_ratio_and_scales_towards_grpo(self):
        assert guarded_filter_ratio(0.4, 0.0) == 1.0
        assert guarded_filter_ratio(0.4, 0.5) == pytest.approx(0.7)
        assert guarded_filter_ratio(0.3, 1.0) == 0.3  # exactly the configured ratio when open
        scales = advantage_scales(torch.tensor([0.0, 0.1, 0.2, 1.0]), torch.ones(4, dtype=torch.bool))
        half = guarded_advantage_scales(scales, 0.5)
        torch.testing.assert_close(half, (scales + 1.0) / 2)
        assert half.mean().item() == pytest.approx(1.0, abs=1e-6) and half.min().item() >= 0.9

    def test_sign_balance_keeps_grpo_credit_on_each_side_and_tas_order_within_it(self):
        advantages = torch.tensor([1.5, 0.5, -0.5, -1.0, -1.0, 0.0, 2.0])
        valid = torch.tensor([True, True, True, True, True, True, False])
        # k3's tilt: the wrong (negative) answers have the larger dependencies, so the larger scales
        scales = advantage_scales(torch.tensor([0.1, 0.2, 0.9, 0.8, 1.0, 0.5, 3.0]), valid)
        assert sign_scale_gap(scales, advantages, valid) > 0.1
        balanced = sign_balanced_scales(scales, advantages, valid)
        shaped = balanced * advantages
        rows = valid & (advantages != 0)
        # each side hands out GRPO's credit, so the batch's net is GRPO's
        for side in (advantages > 0, advantages < 0):
            assert shaped[side & rows].sum().item() == pytest.approx(advantages[side & rows].sum().item())
        assert shaped[rows].sum().item() == pytest.approx(advantages[rows].sum().item())
        assert sign_scale_gap(balanced, advantages, valid) == pytest.approx(0.0, abs=1e-6)
        # within a side, TAS's ratios are kept; rows outside TAS or with no advantage are untouched
        assert (balanced[0] / balanced[1]).item() == pytest.approx((scales[0] / scales[1]).item())
        assert (balanced[2] / balanced[4]).item() == pytest.approx((scales[2] / scales[4]).item())
        assert balanced[5] == scales[5] and balanced[6] == scales[6] == 1.0

    def test_sign_balance_of_grpo_scales_is_grpo(self):
        advantages = torch.randn(16, generator=torch.Generator().manual_seed(3))
        ones = torch.ones(16)
        balanced = sign_balanced_scales(ones, advantages, torch.ones(16, dtype=torch.bool))
        torch.testing.assert_close(balanced, ones, rtol=0, atol=0)
        assert sign_scale_gap(ones, advantages, advantages > 0) is None  # one side only: no gap to read

    def test_statistic_reads_the_kept_tokens_of_the_rows_with_a_gradient(self):
        dependency = torch.tensor([[0.5, 0.1, 0.0, 0.2], [9.0, 9.0, 9.0, 9.0], [0.3, 0.0, 0.0, 0.0]])
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
        rows = torch.tensor([True, False, True])
        # ratio 0.5 keeps 2 of 4 (0.5, 0.2) and 1 of 2 (0.3); the second completion has no gradient
        assert kept_dependency_sums(dependency, mask, rows, 0.5).tolist() == pytest.approx([1.0, 3.0])


def test_entropy_penalty():
    logps = torch.tensor([[-1.0, -3.0, -100.0], [-2.0, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert entropy_penalty(logps, mask).item() == pytest.approx(7.0 / 5)
    assert entropy_penalty(logps, torch.zeros(2, 3)).item() == 0.0


@pytest.mark.parametrize(
    ("loss_type", "normalizer", "expected"),
    [
        ("bnpo", None, 7.0 / 5),  # token mean of the batch
        ("grpo", None, (4.0 / 2 + 3.0 / 3) / 2),  # mean of per-completion token means
        ("sapo", None, (4.0 / 2 + 3.0 / 3) / 2),
        ("dr_grpo", 4, 7.0 / (2 * 4)),  # token sum / (completions x max completion length)
        ("dapo", 10, 7.0 / 10),  # token sum / the accumulated batch's token count
        ("cispo", 10, 7.0 / 10),
        ("vespo", torch.tensor(10.0), 7.0 / 10),
        ("luspo", None, (4.0 + 3.0) / 2),  # mean of per-completion token sums
    ],
)
def test_entropy_penalty_follows_the_loss_type(loss_type, normalizer, expected):
    logps = torch.tensor([[-1.0, -3.0, -100.0], [-2.0, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert entropy_penalty(logps, mask, loss_type, normalizer).item() == pytest.approx(expected)


def test_entropy_penalty_micro_batches_add_up_to_the_batch_token_mean():
    """dapo: each micro-batch divides by the whole batch's token count, so their sum is the batch's token mean."""
    logps = torch.randn(6, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0] * 5])
    total = mask.sum()
    summed = sum(entropy_penalty(logps[rows], mask[rows], "dapo", total) for rows in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(summed, entropy_penalty(logps, mask, "bnpo"))


def test_entropy_penalty_errors():
    with pytest.raises(ValueError, match="needs the normalizer"):
        entropy_penalty(torch.zeros(1, 2), torch.ones(1, 2), "dapo")
    with pytest.raises(ValueError, match="Unknown loss_type"):
        entropy_penalty(torch.zeros(1, 2), torch.ones(1, 2), "ppo", 1)
