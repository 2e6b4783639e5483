"""What the tests that start processes share: DeepSpeed's op folder, a free port, the ZeRO-3 CPU config, and Python
commands started from an interpreter that has already imported torch, transformers, TRL and vppo_trl.

A tiny training run takes a few seconds; the interpreter it runs in spends 7-25 s (by the machine's load) importing
its libraries first. The tests that must run a script in its own process (to SIGKILL it, to run a benchmark as its
command line does) start it here instead: a child forked from multiprocessing's fork server, which imported those
libraries once for the session and started no thread. The child is a fresh process in every other respect (its own
pid, memory, signals, exit status); `-m module` and script paths are run as `python` runs them (runpy, `sys.argv`,
`sys.path[0]`). Like every multiprocessing child it ends without the interpreter's finalisation (no `atexit`
handlers): a test of what happens at exit needs a fresh interpreter.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import socket
import sys
from pathlib import Path

# DeepSpeed compiles its CPU op once per folder (about a minute): share one folder between tests and runs.
TORCH_EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
    Path.home() / ".cache" / "vppo-trl-torch-extensions"
)

ZERO3_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
  zero3_save_16bit_model: true
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Imported once by the fork server: what the scripts and benchmarks started here import.
PRELOADED = ("torch", "transformers", "trl", "peft", "datasets", "vppo_trl.trainer", "vppo_trl.testing")


def run_python(arguments: list[str], log_path: str, env: dict[str, str], cwd: str) -> None:
    """The child's side: `python *arguments` in `cwd` with `env` added, stdout and stderr appended to `log_path`."""
    os.chdir(cwd)
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    if "OMP_NUM_THREADS" in env:  # the OpenMP runtime read the variable when the fork server imported torch
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if arguments[0] == "-m":
        sys.argv = [arguments[1], *arguments[2:]]
        sys.path.insert(0, cwd)
        runpy.run_module(arguments[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(arguments)
        sys.path.insert(0, str(Path(arguments[0]).resolve().parent))
        runpy.run_path(arguments[0], run_name="__main__")


class WarmPython:
    """Starts `python ARGUMENTS...` as children of a fork server with `PRELOADED` imported (one per session)."""

    def __init__(self):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(PRELOADED))

    def start(
        self, arguments: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> multiprocessing.Process:
        """Start `python *arguments`; `join()` the returned process, then read its `exitcode` (-9: SIGKILL)."""
        process = self.context.Process(
            target=run_python,
            args=(list(arguments), str(log_path), dict(env or {}), str(cwd or Path.cwd())),
            name=f"python {' '.join(map(str, arguments))[:60]}",
        )
        process.start()
        return process

    def run(
        self,
        arguments: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 900,
    ) -> int:
        """Run `python *arguments` to its end; its exit code."""
        process = self.start(arguments, log_path, env, cwd)
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise TimeoutError(f"python {' '.join(map(str, arguments))} ran over {timeout} s; log: {log_path}")
        return process.exitcode

    def close(self) -> None:
        """Stop the fork server (it would also end with the test session's process)."""
        from multiprocessing import forkserver

        forkserver._forkserver._stop()
