"""VPPO (Visually-Perceptive Policy Optimization) on Hugging Face TRL."""

from .config import VPPOConfig
from .core import advantage_scales, token_dependency, top_dependency_mask, trajectory_dependency
from .trainer import VPPOTrainer

__version__ = "0.1.0"

__all__ = [
    "VPPOConfig",
    "VPPOTrainer",
    "advantage_scales",
    "token_dependency",
    "top_dependency_mask",
    "trajectory_dependency",
]
