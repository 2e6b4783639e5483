"""How a multi-process script run by ``accelerate launch`` ends (the library's own ending, shared with the entry
point: see :func:`vppo_trl.clean_exit.exit_cleanly`)."""

from ..clean_exit import exit_cleanly

__all__ = ["exit_cleanly"]
