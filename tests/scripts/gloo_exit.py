"""One rank of a two-process gloo run that ends while gloo's worker threads still hold collectives' tensors, as a
trainer's run ends: its process groups outlive `destroy_process_group()` because something still refers to them.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python gloo_exit.py {clean,plain}

`plain` ends as the multi-process scripts used to (destroy the group, return): the worker threads then release the
tensors while the interpreter finalises and the process aborts ("terminate called without an active exception") in
about half the runs here. `clean` ends with `vppo_trl.testing.exit_cleanly`.
"""

import sys

import torch
import torch.distributed as dist

from vppo_trl.testing import exit_cleanly

KEPT = {}  # a reference that outlives the group's destruction, as a DDP wrapper or DeepSpeed's group registry keeps


def main(ending: str) -> None:
    dist.init_process_group("gloo")
    KEPT["group"] = dist.new_group([0, 1])
    dist.barrier()
    for _ in range(50):  # asynchronous collectives on Python tensors, still in the worker threads at the end
        dist.all_reduce(torch.ones(50_000), group=KEPT["group"], async_op=True)
    if ending == "clean":
        exit_cleanly()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
