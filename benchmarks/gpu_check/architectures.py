"""The models of the paper's recipes, by architecture: the real widths and vocabularies with random weights (nothing
is downloaded), or `vppo_trl.testing`'s tiny model of the same family for the CPU run.

Qwen2.5-VL-7B comes from benchmarks/step_overhead; the values below are those of the Qwen2.5-VL-3B-Instruct and
Qwen3-VL-8B-Instruct checkpoints' config.json.
"""

from __future__ import annotations

from typing import Any

from benchmarks.step_overhead.workload import (
    QWEN25_VL_7B_TEXT,
    QWEN25_VL_7B_VISION,
    build_random_model,
    qwen25_vl_7b_arch_config,
    qwen25_vl_arch_config,
    special_token_ids,
)

QWEN25_VL_3B_TEXT = {
    **QWEN25_VL_7B_TEXT,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_window_layers": 70,
}
QWEN25_VL_3B_VISION = {**QWEN25_VL_7B_VISION, "out_hidden_size": 2048}
QWEN25_VL_3B_VOCAB = 151936

QWEN3_VL_8B_TEXT = {
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
}
QWEN3_VL_8B_VISION = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "in_channels": 3,
    "hidden_act": "gelu_pytorch_tanh",
    "out_hidden_size": 4096,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
    "initializer_range": 0.02,
}
QWEN3_VL_8B_VOCAB = 151936

# Architecture name -> the `vppo_trl.testing` family of its tiny stand-in.
FAMILIES = {"qwen2_5_vl_7b": "qwen2_5_vl", "qwen2_5_vl_3b": "qwen2_5_vl", "qwen3_vl_8b": "qwen3_vl"}


def qwen3_vl_8b_config(tokenizer, text_layers: int | None = None, vision_layers: int | None = None):
    """Qwen3-VL-8B-Instruct's config with the local tokenizer's ids; fewer vision layers keep DeepStack's taps that
    still exist (or the last block)."""
    from transformers import Qwen3VLConfig

    ids = special_token_ids(tokenizer)
    text = dict(QWEN3_VL_8B_TEXT)
    text.update(
        vocab_size=max(QWEN3_VL_8B_VOCAB, len(tokenizer)),
        num_hidden_layers=text_layers or text["num_hidden_layers"],
        bos_token_id=ids["endoftext"],
        eos_token_id=ids["im_end"],
        pad_token_id=ids["endoftext"],
    )
    vision = dict(QWEN3_VL_8B_VISION)
    depth = vision_layers or vision["depth"]
    taps = [i for i in vision["deepstack_visual_indexes"] if i < depth] or [depth - 1]
    vision.update(depth=depth, deepstack_visual_indexes=taps)
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )


def architecture_config(architecture: str, tokenizer, text_layers: int | None, vision_layers: int | None):
    if architecture == "qwen2_5_vl_7b":
        return qwen25_vl_7b_arch_config(tokenizer, text_layers or 28, vision_layers or 32)
    if architecture == "qwen2_5_vl_3b":
        return qwen25_vl_arch_config(
            tokenizer,
            QWEN25_VL_3B_TEXT,
            QWEN25_VL_3B_VISION,
            QWEN25_VL_3B_VOCAB,
            tie_word_embeddings=True,
            text_layers=text_layers,
            vision_layers=vision_layers,
        )
    if architecture == "qwen3_vl_8b":
        return qwen3_vl_8b_config(tokenizer, text_layers, vision_layers)
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(FAMILIES)}")


def build_policy(
    architecture: str,
    tiny: bool,
    device: str,
    dtype: str,
    image_size: int,
    seed: int = 0,
    text_layers: int | None = None,
    vision_layers: int | None = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Model and processor: the architecture with random weights on `device`, or its family's tiny model."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    from vppo_trl.testing import build_model, build_processor, build_tokenizer

    family = FAMILIES[architecture]
    tokenizer = build_tokenizer()
    processor = build_processor(family, tokenizer, image_size=image_size)
    if tiny:
        model = build_model(family, tokenizer, seed=seed, dtype=getattr(torch, dtype))
        return model.to(device), processor
    config = architecture_config(architecture, tokenizer, text_layers, vision_layers)
    model_cls = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    return build_random_model(model_cls, config, device, dtype, seed, attn_implementation), processor
