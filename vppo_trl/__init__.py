"""VPPO (Visually-Perceptive Policy Optimization) on Hugging Face TRL."""

from .config import VPPOConfig

__version__ = "0.1.0"

__all__ = ["VPPOConfig"]
