"""How a multi-process run started by ``accelerate launch`` ends: the training entry point and the test scripts."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch


def exit_cleanly() -> NoReturn:
    """End a script run by ``accelerate launch`` (the training entry point, tests, benchmarks) once its results are
    written: every rank past its last collective, the process group destroyed, the output flushed, then
    ``os._exit(0)``.

    Why not a plain return: after ``destroy_process_group()`` the trainer's DDP wrapper or DeepSpeed engine (and
    DeepSpeed's group registry) still hold the gloo process groups, so their worker threads outlive ``main``. When one
    of them releases a finished collective's tensors while the interpreter finalises, it must take the GIL; Python
    then ends that thread with ``pthread_exit`` inside a C++ destructor, and ``std::terminate`` aborts the process
    ("terminate called without an active exception", SIGABRT) after a run that succeeded. Without finalisation no
    thread can get there; Python's own ``multiprocessing`` ends its child processes with ``os._exit`` too.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
