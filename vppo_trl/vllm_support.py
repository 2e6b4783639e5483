"""What VPPOTrainer adds to TRL's vLLM modes where they cannot run as they are: server mode refused without CUDA,
and the colocated engine's weight sync on vLLM's CPU build."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trl.generation.vllm_generation import VLLMGeneration

    from .method.config import VPPOConfig


def refuse_vllm_server_without_cuda(args: VPPOConfig) -> None:
    """
    TRL's server mode sends the trained weights to `trl vllm-serve` through vLLM's NCCL weight-transfer engine, which
    needs a CUDA device on the trainer's side. Without one, TRL first waits for the server (`vllm_server_timeout`)
    and then fails in the weight sync; here the run is refused before anything starts.
    """
    if args.use_vllm and args.vllm_mode == "server" and args.device.type != "cuda":
        raise ValueError(
            f"vllm_mode='server' needs a CUDA device, and this process trains on '{args.device}': TRL sends the "
            "trained weights to the vLLM server over NCCL (vLLM's weight-transfer engine), which runs only on CUDA, "
            "so the server would keep generating from the initial weights. Use vllm_mode='colocate', which runs a "
            "vLLM engine inside each training process and loads the weights in place (on CPU too, with vLLM's CPU "
            "build)."
        )


def engine_dropped_weights(generation: VLLMGeneration) -> bool:
    """Whether the colocated engine left empty parameters behind after loading (vLLM's CPU build, which packs linear
    weights for its kernels): TRL's per-tensor weight load cannot load into those."""
    model = generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    return any(param.numel() == 0 for param in model.parameters())


def reload_colocated_weights(generation: VLLMGeneration) -> None:
    """
    The colocated engine's weight sync where the engine dropped its weights (`engine_dropped_weights`), in place of
    TRL's `VLLMGeneration.sync_weights`.

    TRL hands each tensor to the engine model's `load_weights`. vLLM's CPU build packs every linear layer's weight
    into its GEMM kernel's format once loaded and leaves an empty parameter behind, so that call fails
    ("'Parameter' object has no attribute 'weight_loader'"). vLLM's own in-place reload restores the layers, loads
    the checkpoint-format tensors and packs them again. The tensors are TRL's (`_iter_named_params`: gathered one at a
    time under ZeRO-3 on every rank, LoRA merged).

    The reload also empties the model runner's image caches, which were computed with the old vision tower; the
    engine's other ends of them (the scheduler's record of cached encoder outputs, the processed-input cache) are
    emptied with it, else an image seen before is scheduled as cached and vLLM fails ("Encoder cache miss").
    """
    llm = generation.llm
    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=generation._iter_named_params(), is_checkpoint_format=True)
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()
    llm.reset_prefix_cache()
