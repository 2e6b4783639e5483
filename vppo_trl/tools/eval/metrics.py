"""Evaluation metrics as small pure functions: avg@k, unbiased pass@k, maj@k, and paired bootstrap intervals."""

import math
from collections.abc import Sequence

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """
    Unbiased pass@k of one problem (Chen et al., 2021): the probability that at least one of `k` samples drawn
    without replacement from the `num_samples` generated is correct, `1 - C(n - c, k) / C(n, k)`.
    """
    if not 0 < k <= num_samples:
        raise ValueError(f"pass@k needs 0 < k <= number of samples, got k={k} with {num_samples} samples.")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct={num_correct} must lie in [0, {num_samples}].")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def majority_correct(answers: Sequence[str | None], scores: Sequence[float]) -> float:
    """
    maj@k of one problem: the score of the most frequent extracted answer (samples without an answer do not vote;
    a tie goes to the answer that appeared first). Answers are compared after removing whitespace. 0 when no sample
    has an answer.
    """
    votes: dict[str, list[float]] = {}
    for answer, score in zip(answers, scores, strict=True):
        if answer is not None:
            votes.setdefault("".join(answer.split()), []).append(score)
    if not votes:
        return 0.0
    winner = max(votes.values(), key=len)  # max keeps the first of equal counts, i.e. the earliest answer
    return winner[0]


def pass_at_k_values(k: int) -> list[int]:
    """The k values reported for `k` samples per problem: 1, 2, 4, ... up to `k`, and `k` itself."""
    values = [1]
    while values[-1] * 2 < k:
        values.append(values[-1] * 2)
    return sorted(set(values) | {k})


def benchmark_metrics(samples_by_problem: dict[str, list[dict]], k: int) -> dict:
    """
    Metrics of one benchmark from its graded samples (dicts with `score`, `extracted` and `length`), each problem
    holding `k` samples: avg@k (mean accuracy over all samples), pass@j for j in [`pass_at_k_values`], maj@k, the
    share of samples without a boxed answer, the mean response length in tokens, and each problem's mean score.
    """
    if not samples_by_problem:
        raise ValueError("No graded problems: nothing to compute metrics on.")
    per_problem, majority, passes = {}, [], {j: [] for j in pass_at_k_values(k)}
    lengths, unboxed = [], 0
    for problem_id, samples in samples_by_problem.items():
        scores = [sample["score"] for sample in samples]
        correct = sum(1 for score in scores if score > 0)
        per_problem[problem_id] = sum(scores) / len(scores)
        for j in passes:
            passes[j].append(pass_at_k(len(scores), correct, j))
        majority.append(majority_correct([sample["extracted"] for sample in samples], scores))
        lengths.extend(sample["length"] for sample in samples)
        unboxed += sum(1 for sample in samples if sample["extracted"] is None)
    return {
        "problems": len(per_problem),
        "samples": len(lengths),
        f"avg@{k}": float(np.mean(list(per_problem.values()))),
        "pass@k": {str(j): float(np.mean(values)) for j, values in passes.items()},
        f"maj@{k}": float(np.mean(majority)),
        "no_boxed_share": unboxed / len(lengths),
        "mean_length": float(np.mean(lengths)),
        "per_problem": per_problem,
    }


def paired_bootstrap(
    baseline: Sequence[Sequence[float]],
    candidate: Sequence[Sequence[float]],
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[list[tuple[float, float, float]], tuple[float, float, float]]:
    """
    Paired bootstrap of `candidate - baseline` over problems, per benchmark and for the mean over benchmarks.

    `baseline[b][i]` and `candidate[b][i]` are the scores of problem `i` of benchmark `b` (the same problems, in
    the same order). Each resample draws, in every benchmark, as many problems as it has, with replacement, the same
    draw for both models (that is the pairing); the mean over benchmarks is the mean of the resampled benchmark
    differences. Returns `(difference, low, high)` per benchmark and for the mean, at the `confidence` level
    (percentile interval). The draws come from `numpy.random.default_rng(seed)`, benchmark after benchmark.
    """
    if len(baseline) != len(candidate) or not baseline:
        raise ValueError("paired_bootstrap needs the same, non-empty list of benchmarks on both sides.")
    rng = np.random.default_rng(seed)
    tail = (1.0 - confidence) / 2 * 100
    per_benchmark, resampled = [], []
    for base, cand in zip(baseline, candidate, strict=True):
        differences = np.asarray(cand, dtype=float) - np.asarray(base, dtype=float)
        if differences.size == 0 or len(base) != len(cand):
            raise ValueError("Each benchmark needs the same, non-empty list of problems on both sides.")
        draws = rng.integers(0, differences.size, size=(resamples, differences.size))
        means = differences[draws].mean(axis=1)
        resampled.append(means)
        low, high = np.percentile(means, [tail, 100 - tail])
        per_benchmark.append((float(differences.mean()), float(low), float(high)))
    overall = np.mean(resampled, axis=0)
    low, high = np.percentile(overall, [tail, 100 - tail])
    mean_difference = float(np.mean([difference for difference, _, _ in per_benchmark]))
    return per_benchmark, (mean_difference, float(low), float(high))
