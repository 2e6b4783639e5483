"""Tiny random VLMs that vLLM can serve: the test models with attention heads wide enough for vLLM's CPU kernels.

vLLM's CPU attention has no kernel for the 16-wide heads of the other test models (`Unsupported CPU attention
configuration: head_dim=16`); 32 works. vLLM loads a model from a folder, so :func:`save_vllm_model` writes one.

vLLM's CPU build also packs each linear layer's weight for its kernels once a model is loaded and drops the
parameter, so that TRL's colocate weight sync, which loads the trainer's weights into the engine's parameters, fails
(`'Parameter' object has no attribute 'weight_loader'`); GPU builds keep them. :func:`vllm_cpu_keeps_weights` makes
engines started in this process keep them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .colour_task import COLOURS
from .families import build_family
from .tiny_qwen import FAMILIES, build_tiny_vlm

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VLLM_HEAD_DIM = 32
"""Width of every attention head (text and vision) of the models built here."""

VLLM_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "mistral3")
"""Families seen loading and generating in vLLM 0.31's CPU build (`tests/test_vllm.py`)."""


def _widen_heads(config: Any, hidden_size: int, head_dim: int) -> None:
    """Give the attention of `config` (a text or vision config) `hidden_size / head_dim` heads of `head_dim`."""
    if hidden_size % head_dim:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of the head width {head_dim}")
    heads = hidden_size // head_dim
    config.num_attention_heads = heads
    if getattr(config, "num_key_value_heads", None) is not None:
        config.num_key_value_heads = max(1, heads // 2)
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = head_dim


def build_vllm_model(
    family: str, extra_words: Sequence[str] = COLOURS, seed: int = 0, head_dim: int = VLLM_HEAD_DIM
) -> tuple[PreTrainedModel, Any]:
    """A tiny random model of `family` (one of `VLLM_FAMILIES`) with `head_dim`-wide heads, and its real processor.

    Qwen-VL families come from :func:`build_tiny_vlm`; the others from :func:`build_family`, their model rebuilt
    (same seed) from its config with the heads widened. Same tokenizer and processor as those builders.
    """
    if family not in VLLM_FAMILIES:
        raise ValueError(f"{family!r} is not one of the families checked with vLLM: {VLLM_FAMILIES}")
    if family in FAMILIES:
        return build_tiny_vlm(family, extra_words=extra_words, seed=seed, head_dim=head_dim)
    model, processor = build_family(family, extra_words=extra_words, seed=seed)
    config = copy.deepcopy(model.config)
    text, vision = config.get_text_config(), config.vision_config
    _widen_heads(text, text.hidden_size, head_dim)
    _widen_heads(vision, vision.hidden_size, head_dim)
    torch.manual_seed(seed)
    widened = type(model)(config)
    widened.generation_config = model.generation_config
    widened.eval()
    return widened, processor


def save_vllm_model(
    path: str | Path, family: str, extra_words: Sequence[str] = COLOURS, seed: int = 0, head_dim: int = VLLM_HEAD_DIM
) -> Path:
    """Write :func:`build_vllm_model`'s model and processor to `path` (what vLLM and the trainers load); return it."""
    path = Path(path)
    model, processor = build_vllm_model(family, extra_words=extra_words, seed=seed, head_dim=head_dim)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _plain_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
    """vLLM's CPU GEMM dispatch, its plain fallback case only: `F.linear` on the layer's own weight, kept."""
    layer.cpu_linear = torch.nn.functional.linear


@contextlib.contextmanager
def vllm_cpu_keeps_weights() -> Iterator[None]:
    """Within this context, vLLM engines started in this process (TRL's colocate mode runs them in the training
    process) keep their linear layers' weights as parameters, as GPU builds do, so that TRL's weight sync loads into
    them and generation uses them. Costs vLLM's CPU build its packed kernels (irrelevant for these tiny models)."""
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm
    utils.dispatch_cpu_unquantized_gemm = _plain_linear
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = dispatch
