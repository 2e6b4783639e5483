"""Two trainers taking turns: the worker processes, the pipes between them and the driver, and the per-step
timers and memory readings a worker keeps.

The driver starts one process per role, waits until both are set up, then hands the baton GRPO, VPPO, GRPO, ...:
each worker runs one training step per turn and blocks until its next one, so only one trainer ever runs at a time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re
import resource
import select
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .settings import ROLES, Settings

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerProcess:
    """One trainer in its own process, spoken to with JSON lines over a pair of pipes."""

    def __init__(self, role: str, settings: Settings, log_path: Path):
        self.role = role
        self.log_path = log_path
        self.timeout = settings.turn_timeout_s
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        command = [
            sys.executable,
            "-m",
            "benchmarks.step_overhead",
            "--worker-role",
            role,
            "--worker-settings",
            json.dumps(asdict(settings)),
            "--worker-fds",
            f"{to_worker_r},{from_worker_w}",
        ]
        self.log = open(log_path, "w")  # closed in close(): it lives as long as the worker
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if settings.vllm:  # each worker's engine sets up a process group of one: on a port of its own
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        self.process = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(to_worker_r, from_worker_w),
            env=env,
            cwd=ROOT,
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self.to_worker = os.fdopen(to_worker_w, "w")
        self.from_worker_fd = from_worker_r
        self.buffer = b""

    def send(self, message: dict) -> None:
        self.to_worker.write(json.dumps(message) + "\n")
        self.to_worker.flush()

    def receive(self, event: str) -> dict:
        """Wait for the next message, which must be `event`; fail with the worker's log tail if it died."""
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buffer:
            if time.monotonic() > deadline:
                self.fail(f"no '{event}' within {self.timeout:.0f} s")
            ready, _, _ = select.select([self.from_worker_fd], [], [], 1.0)
            if ready:
                chunk = os.read(self.from_worker_fd, 1 << 16)
                if not chunk:
                    self.process.wait(timeout=60)
                    self.fail(f"exited with code {self.process.returncode} before '{event}'")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        if message.get("event") == "error":
            self.fail(message.get("error", "unknown error"))
        if message.get("event") != event:
            self.fail(f"expected '{event}', got {message.get('event')!r}")
        return message

    def fail(self, reason: str) -> None:
        self.log.flush()
        tail = self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""
        raise RuntimeError(f"{self.role} worker: {reason}\n--- log tail ({self.log_path}) ---\n{tail}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        with contextlib.suppress(OSError):  # a dead worker's pipe
            self.to_worker.close()
        os.close(self.from_worker_fd)
        self.log.close()


def run_benchmark(
    settings: Settings, log_dir: Path, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Start both workers, hand the baton GRPO, VPPO, GRPO, ... and collect every step's record.

    `on_progress` gets the run so far after each GRPO/VPPO pair, so that a run cut short still leaves figures.
    """
    run: dict[str, Any] = {"load_average_start": os.getloadavg(), "git": git_state()}
    started = time.time()

    def so_far() -> dict[str, Any]:
        return {**run, "load_average_end": os.getloadavg(), "wall_s": time.time() - started}

    workers = {role: WorkerProcess(role, settings, log_dir / f"{role}.log") for role in ROLES}
    try:
        # Set-up (imports, model, trainer, accelerate) runs in both at once: nothing is timed until both are ready.
        run["ready"] = {role: worker.receive("ready") for role, worker in workers.items()}
        run["fingerprints"] = {role: message["fingerprint"] for role, message in run["ready"].items()}
        if run["fingerprints"]["grpo"] != run["fingerprints"]["vppo"]:
            # Costs do not depend on weight values (same shapes, fixed lengths), so go on, but say so loudly.
            print(f"WARNING: the two trainers start from different weights: {run['fingerprints']}", file=sys.stderr)
        run["records"] = {role: [] for role in ROLES}
        run["finished"] = {}
        for _ in range(settings.total_steps):
            for role in ROLES:
                workers[role].send({"cmd": "go"})
                run["records"][role].append(workers[role].receive("step"))
            if on_progress is not None:
                on_progress(so_far())
        for role in ROLES:  # one after the other, so that their shutdowns do not overlap either
            workers[role].send({"cmd": "finish"})
            run["finished"][role] = workers[role].receive("finished")
            workers[role].process.wait(timeout=300)
    finally:
        for worker in workers.values():
            worker.close()
    return so_far()


# ---------------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------------


class Channel:
    """The worker's end of the baton: JSON lines in, JSON lines out."""

    def __init__(self, fds: str):
        read_fd, write_fd = (int(fd) for fd in fds.split(","))
        self.inbox = os.fdopen(read_fd, "r")
        self.outbox = os.fdopen(write_fd, "w")

    def send(self, message: dict) -> None:
        self.outbox.write(json.dumps(message) + "\n")
        self.outbox.flush()

    def wait_for(self, command: str) -> None:
        line = self.inbox.readline()
        if not line:
            raise SystemExit("the driver went away")
        received = json.loads(line).get("cmd")
        if received != command:
            raise RuntimeError(f"expected command {command!r}, got {received!r}")


class Memory:
    """Per-segment peak memory: CUDA allocator peak on GPU, the process's peak RSS (resettable VmHWM) on CPU."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.can_reset_rss = False
        if not self.cuda:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
                self.can_reset_rss = True

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        elif self.can_reset_rss:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.cuda:
            return int(self.torch.cuda.max_memory_allocated())
        if self.can_reset_rss:
            match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) * 1024
        return max_rss_bytes()

    def current(self) -> int:
        if self.cuda:
            return int(self.torch.cuda.memory_allocated())
        match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) * 1024 if match else 0


class Recorder:
    """Timings of wrapped trainer methods during one step, with device synchronisation around each."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.memory = Memory(device)
        self.times: dict[str, list[float]] = defaultdict(list)
        self.values: dict[str, Any] = {}
        self.segment_peaks: list[int] = []
        self.perturbed_inputs: set[int] = set()
        self.last_perturbed: Any = None
        self.batch: dict[str, Any] | None = None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def start_step(self) -> None:
        self.times.clear()
        self.values.clear()
        self.segment_peaks.clear()
        self.perturbed_inputs.clear()
        self.last_perturbed = None
        self.batch = None

    def timed(self, name: str | Callable[..., str], fn: Callable, condition: Callable[[], bool] | None = None):
        """`fn` wrapped so that each call's synchronised duration is appended to `times[name]`."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if condition is not None and not condition():
                return fn(*args, **kwargs)
            label = name(*args, **kwargs) if callable(name) else name
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.times[label].append(time.perf_counter() - start)

        return wrapper

    def total(self, name: str) -> float:
        return float(sum(self.times.get(name, [])))

    def count(self, name: str) -> int:
        return len(self.times.get(name, []))


# ---------------------------------------------------------------------------------------------------------------
# Where the figures come from: the software, the machine, the code state
# ---------------------------------------------------------------------------------------------------------------


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the package had uncommitted changes (figures belong to a code state)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    changed = git("status", "--porcelain", "--untracked-files=no", "vppo_trl")
    return {"commit": git("rev-parse", "HEAD"), "package_modified": changed.splitlines() if changed else []}
