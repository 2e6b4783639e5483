"""Does VPPOTrainer run the paper's recipes on a GPU? One command, sized for the few minutes a GPU is at hand.

Four parts, each on random-init models of the recipes' real architectures in bf16 (nothing downloaded), each writing
its section of one JSON file as soon as it ends, so that a run cut at a time limit still returns what it measured:

1. ``overhead``: GRPO vs VPPO steps interleaved on the Qwen2.5-VL-7B architecture (benchmarks/step_overhead),
   VPPO measuring every row, then with half the prompt groups uniform (skipped);
2. ``lora``: recipes/qwen2_5_vl_3b_lora_single_gpu.yaml on the 3B architecture: only the adapter moves, and the
   perturbed pass runs through it;
3. ``qwen3``: recipes/qwen3_vl_8b.yaml's VPPO settings on the Qwen3-VL-8B architecture (16-px patches);
4. ``zero3``: the 7B recipe under ``accelerate launch --config_file recipes/accelerate/zero3.yaml``: a checkpoint,
   and a second launch resuming from it that loads its weights and continues.

Usage, from the repository root::

    python -m benchmarks.gpu_check --device cuda --preset real --json gpu_check.json
    python -m benchmarks.gpu_check --device cpu --preset tiny --json tiny.json

See benchmarks/README.md for what each figure means.
"""
