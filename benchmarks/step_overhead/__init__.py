"""The price of perception: GRPOTrainer and VPPOTrainer steps side by side, with the extra passes timed apart.

VPPO's only extra cost is scoring each generation batch a second time on perturbed images. This benchmark measures
it against its floor, one plain no-grad forward of the same batch, with everything else equal:

- two worker processes, one GRPOTrainer and one VPPOTrainer, each running its own real ``trainer.train()`` loop
  (optimiser, gradient clipping, scheduler and logging included), built from the same seed (same initial weights,
  checked by a fingerprint), the same data in the same order, the same settings;
- steps interleaved GRPO, VPPO, GRPO, ... by a baton: a worker blocks in ``on_step_end`` until the driver hands it
  the next turn, so only one trainer ever runs at a time and nothing of one leaks into the other's timers;
- completions of one fixed length (``min_new_tokens = max_new_tokens``; asserted on every batch);
- synchronised timers (``torch.cuda.synchronize`` on GPU) around the step and around wrapped trainer methods.

Why two processes rather than one: a peak-memory figure is per process (``torch.cuda.max_memory_allocated``, peak
RSS), so one process holding both trainers could not tell their peaks apart, and the trainers would share
process-wide state (global RNG, accelerate's GradientState). Separate processes keep each figure its own.

The parts: ``settings`` (presets, command line), ``harness`` (processes, baton, timers, memory), ``workload`` (the
model, data, reward and trainer both roles share), ``measure`` (one instrumented worker), ``report`` (the summary).

Usage, from the repository root::

    python -m benchmarks.step_overhead --device cpu --model tiny --steps 8 --json tiny.json
    python -m benchmarks.step_overhead --device cuda --model 7b-arch --steps 8 --warmup 2 --json k3.json

See benchmarks/README.md for the method and benchmarks/RESULTS.md for figures.
"""
