"""Tiny, offline, random-init vision-language models for tests, the CPU demo and benchmarks.

Nothing here touches the Hugging Face Hub: the tokenizer is a byte-level BPE trained on a built-in corpus, the
processors are the real processor classes configured for small images, and the models are the real model classes
built from tiny configs: the Qwen-VL builders (``build_tiny_vlm``, used by the demo and benchmarks) and every other
family GRPOTrainer trains, from one declarative table (``VLM_FAMILIES``, built by ``build_family``). Using the real
classes (rather than mocks) is what makes the tests meaningful: TRL's ``GRPOTrainer`` treats them as VLMs, the
processors emit each family's own image tensors, and the models run their real vision and merging code paths.
"""

from .colour_task import COLOUR_QUESTION, COLOURS, colour_reward, make_colour_dataset, make_shape_image
from .families import (
    VLM_FAMILIES,
    Family,
    build_family,
    build_family_tokenizer,
    cached_family,
    family_available,
    family_training_settings,
)
from .processes import exit_cleanly
from .tiny_qwen import (
    CHAT_TEMPLATE,
    FAMILIES,
    SPECIAL_TOKENS,
    build_model,
    build_processor,
    build_tiny_vlm,
    build_tokenizer,
    suppressed_token_ids,
)
from .vllm_models import VLLM_FAMILIES, VLLM_HEAD_DIM, build_vllm_model, save_vllm_model, vllm_cpu_keeps_weights
from .workspace import TINY_DATASET_FILE, TINY_MODEL_DIR, save_tiny_workspace, tiny_main

__all__ = [
    "CHAT_TEMPLATE",
    "COLOURS",
    "COLOUR_QUESTION",
    "FAMILIES",
    "SPECIAL_TOKENS",
    "TINY_DATASET_FILE",
    "TINY_MODEL_DIR",
    "VLLM_FAMILIES",
    "VLLM_HEAD_DIM",
    "VLM_FAMILIES",
    "Family",
    "build_family",
    "build_family_tokenizer",
    "build_model",
    "build_processor",
    "build_tiny_vlm",
    "build_tokenizer",
    "build_vllm_model",
    "cached_family",
    "colour_reward",
    "exit_cleanly",
    "family_available",
    "family_training_settings",
    "make_colour_dataset",
    "make_shape_image",
    "save_tiny_workspace",
    "save_vllm_model",
    "suppressed_token_ids",
    "tiny_main",
    "vllm_cpu_keeps_weights",
]
