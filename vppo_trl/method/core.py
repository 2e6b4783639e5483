"""VPPO's math as pure functions on tensors.

Shapes: `B` completions, `T` completion positions, `V` vocabulary. `mask` is the completion mask (1 for a generated
token, 0 for padding). Section numbers refer to the project's VPPO specification.
"""

import math
from fractions import Fraction

import torch

LOG_RATIO_CLAMP = 20.0
DEPENDENCY_CLAMP = 10.0
DEGENERATE_RANGE = 1e-6
DYNAMIC_RANGE_EPS = 1e-8


def token_dependency(logps: torch.Tensor, perturbed_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """
    Visual dependency of each sampled token, estimated from its log-probs with and without the image (k3 estimator).

    With `d = clamp(perturbed_logps - logps, -20, 20)`, the dependency is `clamp(exp(d) - d - 1, 0, 10)`: a
    non-negative, sampled-token estimate of KL(pi(.|image) || pi(.|perturbed image)), as in the official code. It is
    computed as `expm1(d) - d`, which keeps its accuracy for small `d` (float32 `exp(d) - d - 1` loses it to
    cancellation: 5% off at d = 1e-3, 0 at d = 3e-4), so near-ties in TGF are decided by the values, not by rounding.
    It is exactly 0 where `mask` is 0, and never NaN, even for infinite log-probs.

    Args:
        logps: `[B, T]` log-probs of the sampled tokens given the image.
        perturbed_logps: `[B, T]` log-probs of the same tokens given the perturbed image.
        mask: `[B, T]` completion mask.

    Returns:
        `[B, T]` float tensor of dependencies.
    """
    log_ratio = torch.nan_to_num(perturbed_logps.float() - logps.float(), nan=0.0)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    dependency = (torch.expm1(log_ratio) - log_ratio).clamp(0.0, DEPENDENCY_CLAMP)
    return torch.where(mask.bool(), dependency, torch.zeros_like(dependency))


def kl_token_dependency(
    logits: torch.Tensor, perturbed_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """
    Full-vocabulary visual dependency, KL(pi(.|image) || pi(.|perturbed image)) per position (paper Def. 3.1).

    Computed in float32. Callers bound memory by passing a chunk of positions at a time. A position whose logits are
    not finite (fp16 overflow, a corrupt image) gets 0, never NaN or infinity.

    Args:
        logits: `[..., V]` logits given the image (already divided by the sampling temperature).
        perturbed_logits: `[..., V]` logits given the perturbed image.
        mask: optional `[...]` mask; the result is exactly 0 where it is 0.

    Returns:
        `[...]` float tensor of non-negative KL divergences.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    perturbed_logp = torch.log_softmax(perturbed_logits.float(), dim=-1)
    kl = torch.sum(logp.exp() * (logp - perturbed_logp), dim=-1).clamp(min=0.0)
    kl = torch.where(torch.isfinite(kl), kl, torch.zeros_like(kl))
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


def kept_token_counts(valid_counts: torch.Tensor, ratio: float) -> torch.Tensor:
    """
    `ceil(ratio * n)` for each count `n`, in exact decimal arithmetic, for any float `ratio` in (0, 1] and any `n`.

    The ratio is read as the shortest decimal that gives the float back (`repr`): the one the user wrote (`0.4 = 2/5`),
    so `ceil(0.4 * 15)` is 6, where float arithmetic gives 7. The product is taken in Python's unbounded integers,
    once per distinct count: a ratio such as the cold-start guard's blend has a 17-digit numerator, and `n` times it
    overflows int64 from a few hundred tokens on. The result is at least 1 for `n >= 1` and never more than `n`.
    """
    fraction = Fraction(repr(float(ratio)))
    numerator, denominator = fraction.numerator, fraction.denominator
    counts, positions = torch.unique(valid_counts.long(), return_inverse=True)
    kept = [-(-count * numerator // denominator) for count in counts.tolist()]
    return torch.tensor(kept, dtype=torch.long, device=valid_counts.device)[positions]


def top_dependency_mask(dependency: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """
    Token-level Gradient Filtering: keep the `ceil(ratio * n_i)` most image-dependent tokens of each completion.

    Ties are broken by position (the earlier token wins). Padding positions are never kept.

    Args:
        dependency: `[B, T]` token dependencies.
        mask: `[B, T]` completion mask.
        ratio: share of each completion's valid tokens to keep, in (0, 1].

    Returns:
        `[B, T]` bool mask of the kept tokens.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    valid = mask.bool()
    keys = torch.where(valid, dependency.float(), torch.full_like(dependency, -math.inf, dtype=torch.float32))
    # A stable descending sort keeps equal keys in position order, so the earlier position ranks first.
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(keys.size(-1), device=keys.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    keep_counts = kept_token_counts(valid.sum(-1), ratio)
    return (rank < keep_counts.unsqueeze(-1)) & valid


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """
    Entropy-based token filter (paper ablation, Table 4): keep the `ceil(ratio * n_i)` tokens of each completion where
    the policy's predictive entropy on the original image is highest.

    The same selection as `top_dependency_mask` (exact counts, ties to the earlier token), ranked by entropy instead of
    visual dependency: it tests whether TGF's gain comes from looking at the image or only from training the uncertain
    "forking" tokens.

    Args:
        entropy: `[B, T]` per-token entropies of the policy given the original image.
        mask: `[B, T]` completion mask.
        ratio: share of each completion's valid tokens to keep, in (0, 1].

    Returns:
        `[B, T]` bool mask of the kept tokens.
    """
    return top_dependency_mask(entropy, mask, ratio)


def random_token_mask(mask: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    Random token filter (paper ablation, Table 4): keep `ceil(ratio * n_i)` tokens of each completion chosen uniformly
    at random, as many as TGF keeps, so that only the choice of tokens differs.

    Args:
        mask: `[B, T]` completion mask.
        ratio: share of each completion's valid tokens to keep, in (0, 1].
        generator: the random source (on `mask`'s device); the same generator state gives the same mask.

    Returns:
        `[B, T]` bool mask of the kept tokens.
    """
    # The top-k of i.i.d. uniform keys is a uniform draw of k positions among the valid ones.
    keys = torch.rand(mask.shape, generator=generator, device=mask.device)
    return top_dependency_mask(keys, mask, ratio)


def trajectory_dependency(dependency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """
    Mean token dependency of each completion over its valid tokens (0 for an empty completion).

    Returns:
        `[B]` float tensor.
    """
    mask = mask.to(dependency.dtype)
    return (dependency * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def advantage_scales(
    trajectory_dependency: torch.Tensor,
    valid: torch.Tensor,
    beta_min: float = 0.9,
    beta_max: float | None = None,
    beta_max_cap: float | None = None,
) -> torch.Tensor:
    """
    Trajectory-level Advantage Shaping: a scale for each completion's advantage that grows with its mean dependency.

    Over the samples marked `valid`, dependencies are min-max normalised to `u` in [0, 1] and mapped linearly to
    `[beta_min, beta_max]`. With `beta_max=None` (dynamic range, official code), `beta_max` is chosen so that the mean
    scale over the valid samples is 1: `beta_min + (1 - beta_min) / mean(u)`, which has no bound (one outlier among
    `n` near-equal samples gets about `0.9 + 0.1 n`). `beta_max_cap` bounds that dynamic `beta_max`; where it binds,
    the mean scale is below 1. If the valid dependencies span less than 1e-6, or no sample is valid, every scale is
    1. Samples not marked valid get exactly 1.

    Args:
        trajectory_dependency: `[B]` mean dependency of each completion.
        valid: `[B]` bool, the samples that take part in the statistics.
        beta_min: smallest scale.
        beta_max: largest scale, or `None` for the dynamic range.
        beta_max_cap: upper bound of the dynamic `beta_max`, or `None` for none (official code). Unused with a fixed
            `beta_max`.

    Returns:
        `[B]` float tensor of scales.
    """
    valid = valid.bool()
    values = trajectory_dependency.float()
    ones = torch.ones_like(values)
    if not bool(valid.any()):
        return ones
    low = values[valid].min()
    high = values[valid].max()
    spread = high - low
    if float(spread) <= DEGENERATE_RANGE:
        return ones
    normalised = ((values - low) / spread).clamp(0.0, 1.0)
    if beta_max is None:
        beta_max = beta_min + (1.0 - beta_min) / (normalised[valid].mean() + DYNAMIC_RANGE_EPS)
        if beta_max_cap is not None:
            beta_max = beta_max.clamp(max=beta_max_cap)
    scales = beta_min + (beta_max - beta_min) * normalised
    return torch.where(valid, scales, ones)


def kept_dependency_sums(
    dependency: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, ratio: float
) -> torch.Tensor:
    """
    Sum and count of the dependencies of the tokens TGF keeps at `ratio` (the `ceil(ratio * n_i)` most image-dependent
    of each completion) in the completions marked `rows`: the cold-start guard's statistic, to be added up over
    processes before dividing.

    Args:
        dependency: `[B, T]` token dependencies.
        mask: `[B, T]` completion mask.
        rows: `[B]` bool, the completions that take part (those with a policy gradient).
        ratio: TGF's configured ratio, in (0, 1].

    Returns:
        `[2]` float tensor: the sum of the kept tokens' dependencies and their number.
    """
    kept = top_dependency_mask(dependency, mask, ratio) & rows.bool().unsqueeze(-1)
    return torch.stack([(dependency.float() * kept).sum(), kept.sum().float()])


def guard_openness(kept_dependency: float, floor: float, full: float) -> float:
    """
    How far the cold-start guard lets TGF and TAS act, from 0 (plain GRPO) to 1 (VPPO as configured).

    The kept tokens' mean dependency (in nats, a KL estimate) is read on a log scale: 0 at or below `floor`, 1 at or
    above `full`, `log(kept_dependency / floor) / log(full / floor)` in between. A policy that does not read the image
    has dependencies of about 1e-3 (the image jitters its predictions); a token that reads it, 0.1 to 1.

    Args:
        kept_dependency: mean dependency of the tokens TGF keeps at its configured ratio (`kept_dependency_sums`).
        floor: dependency at and below which the guard is closed, > 0.
        full: dependency at and above which the guard is fully open, > `floor`.
    """
    if kept_dependency <= floor:
        return 0.0
    return min(1.0, math.log(kept_dependency / floor) / math.log(full / floor))


def guarded_filter_ratio(ratio: float, openness: float) -> float:
    """TGF's ratio under the guard: 1 (every token trained, GRPO) when closed, `ratio` when open, linear between."""
    if openness >= 1.0:
        return ratio  # exactly the configured ratio, so that TGF keeps exactly its configured counts
    return 1.0 - openness * (1.0 - ratio)


def guarded_advantage_scales(scales: torch.Tensor, openness: float) -> torch.Tensor:
    """
    TAS scales under the guard: 1 (GRPO) when closed, `scales` when open, linear between.

    A linear blend keeps the mean scale of the dynamic range at 1 and its smallest scale at or above `beta_min`.
    """
    return 1.0 + openness * (scales - 1.0)


def sign_balanced_scales(scales: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """
    TAS scales rescaled so that, on each side of the advantage's sign, their `|advantage|`-weighted mean is 1.

    TAS is meant to move credit towards the more image-dependent completions, not to change how much credit the batch
    hands out. With k3 it also does the second: an unlikely sampled token (most often a wrong answer) moves more when
    the image is perturbed, so wrong completions get larger scales than right ones, the shaped advantages no longer
    add up to GRPO's total, and the update pushes every sampled answer down. Balancing each side keeps the batch's
    total positive and total negative credit exactly GRPO's, and within each side keeps TAS's order and ratios.
    Scales can then fall below `beta_min`.

    Args:
        scales: `[B]` TAS scales.
        advantages: `[B]` advantages before shaping.
        valid: `[B]` bool, the completions TAS shaped.

    Returns:
        `[B]` float tensor; the scales of completions not `valid`, or with a zero advantage, are unchanged.
    """
    balanced = scales.float().clone()
    weights = advantages.float().abs()
    for side in (advantages > 0, advantages < 0):
        rows = side & valid.bool()
        if bool(rows.any()):
            mean = (balanced[rows] * weights[rows]).sum() / weights[rows].sum()
            balanced[rows] = balanced[rows] / mean
    return balanced


def sign_scale_gap(scales: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor) -> float | None:
    """
    `|advantage|`-weighted mean TAS scale of the negative-advantage completions minus that of the positive ones: how
    far TAS's scales follow the reward (0 with both sides balanced). None without both signs among `valid`.
    """
    weights = advantages.float().abs()
    means = []
    for side in (advantages < 0, advantages > 0):
        rows = side & valid.bool()
        if not bool(rows.any()):
            return None
        means.append(float((scales[rows].float() * weights[rows]).sum() / weights[rows].sum()))
    return means[0] - means[1]


# GRPO loss types whose loss is a token sum divided by a token count that the caller supplies (TRL's
# `num_items_in_batch`, rescaled to one accumulation window): a token mean over the whole accumulated batch.
TOKEN_SUM_LOSS_TYPES = ("dapo", "cispo", "vespo")


def entropy_penalty(
    logps: torch.Tensor, mask: torch.Tensor, loss_type: str = "bnpo", normalizer: float | torch.Tensor | None = None
) -> torch.Tensor:
    """
    Sampled-token entropy estimate `-logp` over the valid completion tokens, aggregated as GRPO aggregates its
    per-token loss for `loss_type` (paper App. E; the official code adds it to its token-mean loss, so both weigh
    tokens alike).

    Added to the loss with a positive coefficient it lowers the policy's entropy, which keeps VPPO from collapsing.

    Args:
        logps: `[B, T]` log-probs of the sampled tokens under the current policy.
        mask: `[B, T]` completion mask.
        loss_type: GRPO's loss type. `"grpo"`, `"sapo"`: mean over completions of each one's token mean; `"bnpo"`:
            token mean over this batch; `"dr_grpo"`: token sum / (B x `normalizer`); `"dapo"`, `"cispo"`, `"vespo"`:
            token sum / `normalizer`; `"luspo"`: mean over completions of each one's token sum.
        normalizer: for `"dr_grpo"`, the maximum completion length; for `"dapo"`, `"cispo"`, `"vespo"`, the token
            count the loss divides by (the whole accumulated batch's, so that micro-batch penalties add up to its
            token mean). Unused otherwise.

    Returns:
        A scalar tensor.
    """
    mask = mask.to(logps.dtype)
    negative_logps = -(logps * mask)
    if loss_type in ("grpo", "sapo"):
        return (negative_logps.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return negative_logps.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "luspo":
        return negative_logps.sum(-1).mean()
    if loss_type not in (*TOKEN_SUM_LOSS_TYPES, "dr_grpo"):
        raise ValueError(f"Unknown loss_type {loss_type!r}.")
    if normalizer is None:
        raise ValueError(f"loss_type={loss_type!r} needs the normalizer its loss divides by.")
    if loss_type == "dr_grpo":
        return negative_logps.sum() / (logps.size(0) * normalizer)
    return negative_logps.sum() / normalizer
