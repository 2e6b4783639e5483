"""VPPO (Visually-Perceptive Policy Optimization) on Hugging Face TRL."""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use, so that `vppo-trl --help` and the pure functions do not pay for importing TRL.
_EXPORTS = {
    "VPPOConfig": ".method.config",
    "VPPOTrainer": ".trainer",
    "advantage_scales": ".method.core",
    "token_dependency": ".method.core",
    "top_dependency_mask": ".method.core",
    "trajectory_dependency": ".method.core",
}

__all__ = [
    "VPPOConfig",
    "VPPOTrainer",
    "advantage_scales",
    "token_dependency",
    "top_dependency_mask",
    "trajectory_dependency",
]

if TYPE_CHECKING:
    from .method.config import VPPOConfig
    from .method.core import advantage_scales, token_dependency, top_dependency_mask, trajectory_dependency
    from .trainer import VPPOTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
