"""Evaluate like the paper: avg@k on the paper's eight benchmarks with the training prompt and grader.

`vppo-trl eval` (or `python -m vppo_trl.tools.eval`) generates `k` samples per problem, grades them with the training
reward (`vppo_trl.rewards.accuracy_reward`), and reports avg@k, pass@k, maj@k, the share of answers without a
`\\boxed{}` and the mean response length, per benchmark and averaged over benchmarks. `vppo-trl eval compare`
compares runs with paired bootstrap intervals. From Python: [`evaluate`], [`regrade`], [`compare`].
"""

from .benchmarks import BENCHMARKS, Benchmark, load_benchmark, resolve_benchmarks
from .cli import main
from .metrics import benchmark_metrics, majority_correct, paired_bootstrap, pass_at_k
from .run import EvalConfig, compare, evaluate, regrade

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "EvalConfig",
    "benchmark_metrics",
    "compare",
    "evaluate",
    "load_benchmark",
    "main",
    "majority_correct",
    "paired_bootstrap",
    "pass_at_k",
    "regrade",
    "resolve_benchmarks",
]
