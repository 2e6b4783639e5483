"""Shared by every test file: what a session builds once, and which tests the transformers 5.17.0 pass of CI runs."""

from __future__ import annotations

import pytest
from processes import WarmPython


@pytest.fixture(scope="session")
def warm_python():
    """Start `python ...` commands (scripts to SIGKILL, benchmarks run as their command line) in processes forked from
    one that imported torch, transformers, TRL and vppo_trl once for the session (tests/processes.py)."""
    warm = WarmPython()
    yield warm
    warm.close()
