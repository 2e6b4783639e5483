"""Every VLM family GRPOTrainer trains, as one declarative table (``VLM_FAMILIES``) and one builder
(``build_family``): tiny random models from each family's config class with its real processor, special tokens and
chat template."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .colour_task import COLOURS
from .tiny_qwen import CHAT_TEMPLATE, FAMILIES, SPECIAL_TOKENS, _trained_bpe, build_tiny_vlm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# ---------------------------------------------------------------------------------------------------------------
# Every family GRPOTrainer trains: one declarative table, one builder
# ---------------------------------------------------------------------------------------------------------------


class Token(str):
    """A special token in a family's config table, replaced by its id in the family's tokenizer."""


VOCAB = "<vocabulary size>"  # replaced by the tokenizer's length


def _turns(begin: str, user: str, assistant: str, end: str, image: str, system: str | None = None) -> str:
    """A chat template in the shape of the real ones: `begin`, then each message as `<role start>content<end>`
    (images as `image`, text as is), then the assistant's start when a generation prompt is asked for. `user`,
    `assistant` and `system` are the turn openings; without `system`, a system message is put before the first user
    turn's content (Gemma's and LLaVA's way)."""
    opening = {"user": user, "assistant": assistant, "system": system if system is not None else user}
    roles = "{% set openings = " + repr(opening) + " %}"
    content = (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or 'image' in part %}"
        + image.replace("{", "{{ '{' }}")
        + "{% elif 'text' in part "
        "%}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    )
    return (
        roles + begin + "{% for message in messages %}{{ openings[message['role']] }}" + content + end + "{% endfor %}"
        "{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


@dataclass(frozen=True)
class Family:
    """
    How to build a tiny random model of one VLM family with its real processor, offline.

    Names are transformers class names, so that an entry costs no import until it is built and a family missing from
    the installed transformers is named, not crashed on. Config values may hold `Token("...")` (the token's id in the
    family's tokenizer) and `VOCAB` (the tokenizer's length, read after the processor has added its own tokens).
    """

    model: str
    processor: str
    image_processor: str
    chat_template: str
    config: dict[str, Any]
    eos: str
    pad: str
    bos: str | None = None
    named_tokens: dict[str, str] = field(default_factory=dict)
    """Special tokens the real tokenizer exposes as attributes (`image_token`, `boi_token`, ...)."""
    special_tokens: tuple[str, ...] = ()
    """Other special tokens of the real tokenizer (turn markers, ...)."""
    image_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    companions: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """Other parts the processor's constructor takes (video processor, audio feature extractor): class, kwargs."""
    stop_tokens: tuple[str, ...] = ()
    """Tokens that end a generation besides `eos` (the real generation config's)."""
    multi_image: bool = True
    """Whether GRPOTrainer trains it on prompts with several images."""
    mixed_image_counts: bool = True
    """Whether GRPOTrainer trains it on batches whose prompts hold different numbers of images (text-only ones
    beside prompts with images)."""
    training_settings: dict[str, Any] = field(default_factory=dict)
    """GRPOConfig settings GRPOTrainer needs to train the family on batches of prompts of different lengths (the
    same with a real checkpoint)."""


def _text(**overrides: Any) -> dict[str, Any]:
    """A 2-layer, 64-wide decoder with 16-wide heads, the vocabulary of the family's tokenizer."""
    return {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        **overrides,
    }


def _vision(**overrides: Any) -> dict[str, Any]:
    """A 2-layer, 32-wide ViT (CLIP / SigLIP shape)."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        **overrides,
    }


def _qwen_ids() -> dict[str, Token]:
    return {
        "image_token_id": Token("<|image_pad|>"),
        "video_token_id": Token("<|video_pad|>"),
        "vision_start_token_id": Token("<|vision_start|>"),
        "vision_end_token_id": Token("<|vision_end|>"),
    }


_QWEN_TEXT_IDS = {"bos_token_id": Token("<|endoftext|>"), "eos_token_id": Token("<|im_end|>"),
                  "pad_token_id": Token("<|endoftext|>")}  # fmt: skip
_QWEN3_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 64,
}
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
_QWEN3_VL_PROCESSOR = {
    "processor": "Qwen3VLProcessor",
    "image_processor": "Qwen2VLImageProcessor",
    "image_processor_kwargs": {
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
    },
    "companions": {
        "video_processor": (
            "Qwen3VLVideoProcessor",
            {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
             "size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64 * 8}},
        )
    },
    "chat_template": CHAT_TEMPLATE,
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
    "special_tokens": SPECIAL_TOKENS,
    "stop_tokens": ("<|endoftext|>",),
}  # fmt: skip
_QWEN3_5_TEXT = _text(
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                     "mrope_section": [0, 1, 1], "mrope_interleaved": True},
    linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"], **_QWEN_TEXT_IDS,
)  # fmt: skip
_SIGLIP_NORM = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}

VLM_FAMILIES: dict[str, Family] = {
    "qwen3_vl_moe": Family(
        model="Qwen3VLMoeForConditionalGeneration",
        config={
            "text_config": _text(
                rope_parameters=_QWEN_ROPE,
                moe_intermediate_size=32,
                num_experts=4,
                num_experts_per_tok=2,
                decoder_sparse_step=1,
                **_QWEN_TEXT_IDS,
            ),
            "vision_config": {**_QWEN3_VISION, "deepstack_visual_indexes": [0]},
            **_qwen_ids(),
        },  # fmt: skip
        **_QWEN3_VL_PROCESSOR,
    ),
    "qwen3_5": Family(
        model="Qwen3_5ForConditionalGeneration",
        config={"text_config": _QWEN3_5_TEXT, "vision_config": _QWEN3_VISION, **_qwen_ids()},
        **_QWEN3_VL_PROCESSOR,
    ),
    "qwen3_5_moe": Family(
        model="Qwen3_5MoeForConditionalGeneration",
        config={
            "text_config": {
                **_QWEN3_5_TEXT,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 32,
                "num_experts": 4,
                "num_experts_per_tok": 2,
            },
            "vision_config": _QWEN3_VISION,
            **_qwen_ids(),
        },  # fmt: skip
        **_QWEN3_VL_PROCESSOR,
    ),
    "gemma3": Family(
        model="Gemma3ForConditionalGeneration",
        processor="Gemma3Processor",
        image_processor="Gemma3ImageProcessor",
        image_processor_kwargs={"size": {"height": 56, "width": 56}, **_SIGLIP_NORM},
        processor_kwargs={"image_seq_length": 4},
        chat_template=_turns(
            "{{ bos_token }}",
            "<start_of_turn>user\n",
            "<start_of_turn>model\n",
            "<end_of_turn>\n",
            "<start_of_image>",
        ),  # fmt: skip
        config={
            "text_config": _text(
                sliding_window=64,
                layer_types=["sliding_attention", "full_attention"],
                pad_token_id=Token("<pad>"),
                eos_token_id=Token("<eos>"),
                bos_token_id=Token("<bos>"),
            ),
            "vision_config": _vision(image_size=56, patch_size=14),
            "mm_tokens_per_image": 4,
            "boi_token_index": Token("<start_of_image>"),
            "eoi_token_index": Token("<end_of_image>"),
            "image_token_index": Token("<image_soft_token>"),
        },  # fmt: skip
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },  # fmt: skip
        special_tokens=("<start_of_turn>", "<end_of_turn>"),
        stop_tokens=("<end_of_turn>",),
    ),
    "gemma4": Family(
        model="Gemma4ForConditionalGeneration",
        processor="Gemma4Processor",
        image_processor="Gemma4ImageProcessor",
        image_processor_kwargs={"patch_size": 4, "max_soft_tokens": 70, "pooling_kernel_size": 3, **_SIGLIP_NORM},
        companions={
            "feature_extractor": ("Gemma4AudioFeatureExtractor", {}),
            "video_processor": ("Gemma4VideoProcessor", {"patch_size": 4, "max_soft_tokens": 70}),
        },
        processor_kwargs={"image_seq_length": 70},
        chat_template=_turns(
            "{{ bos_token }}", "<|turn>user\n", "<|turn>model\n", "<turn|>\n", "<|image|>", system="<|turn>system\n"
        ),  # fmt: skip
        config={
            "text_config": _text(
                sliding_window=64,
                layer_types=["sliding_attention", "full_attention"],
                hidden_size_per_layer_input=8,
                vocab_size_per_layer_input=VOCAB,
                global_head_dim=16,
                pad_token_id=Token("<pad>"),
                eos_token_id=Token("<eos>"),
                bos_token_id=Token("<bos>"),
            ),
            "vision_config": _vision(
                patch_size=4, pooling_kernel_size=3, head_dim=16, num_key_value_heads=2, position_embedding_size=64
            ),
            "boi_token_id": Token("<|image>"),
            "eoi_token_id": Token("<image|>"),
            "image_token_id": Token("<|image|>"),
            "video_token_id": Token("<|video|>"),
            "boa_token_id": Token("<|audio>"),
            "eoa_token_index": Token("<audio|>"),
            "audio_token_id": Token("<|audio|>"),
        },  # fmt: skip
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        named_tokens={
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "image_token": "<|image|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
            "audio_token": "<|audio|>",
        },  # fmt: skip
        special_tokens=("<|turn>", "<turn|>", "<|video|>"),
        stop_tokens=("<turn|>",),
    ),
    "llava": Family(
        model="LlavaForConditionalGeneration",
        processor="LlavaProcessor",
        image_processor="CLIPImageProcessor",
        image_processor_kwargs={"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}},
        processor_kwargs={
            "patch_size": 14,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        },
        chat_template=_turns("", "USER: ", "ASSISTANT:", " ", "<image>\n", system=""),
        config={
            "text_config": {
                "model_type": "llama",
                **_text(bos_token_id=Token("<s>"), eos_token_id=Token("</s>"), pad_token_id=Token("<pad>")),
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                **_vision(image_size=28, patch_size=14, projection_dim=32),
            },
            "image_token_index": Token("<image>"),
            "image_seq_length": 4,
            "vision_feature_layer": -1,
        },  # fmt: skip
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        named_tokens={"image_token": "<image>"},
    ),
    "llava_next": Family(
        model="LlavaNextForConditionalGeneration",
        processor="LlavaNextProcessor",
        image_processor="LlavaNextImageProcessor",
        image_processor_kwargs={
            "size": {"shortest_edge": 28},
            "crop_size": {"height": 28, "width": 28},
            "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]],
        },  # fmt: skip
        processor_kwargs={
            "patch_size": 14,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        },
        chat_template=_turns("", "[INST] ", "", " [/INST]", "<image>\n"),
        config={
            "text_config": {
                "model_type": "mistral",
                **_text(bos_token_id=Token("<s>"), eos_token_id=Token("</s>"), pad_token_id=Token("<pad>")),
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                **_vision(image_size=28, patch_size=14, projection_dim=32),
            },
            "image_token_index": Token("<image>"),
            "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]],
            "vision_feature_layer": -1,
        },  # fmt: skip
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        named_tokens={"image_token": "<image>"},
        special_tokens=("[INST]", "[/INST]"),
    ),
    "llava_onevision": Family(
        model="LlavaOnevisionForConditionalGeneration",
        processor="LlavaOnevisionProcessor",
        image_processor="LlavaOnevisionImageProcessor",
        image_processor_kwargs={
            "size": {"height": 28, "width": 28},
            "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]],
            **_SIGLIP_NORM,
        },  # fmt: skip
        companions={"video_processor": ("LlavaOnevisionVideoProcessor", {"size": {"height": 28, "width": 28}})},
        processor_kwargs={"num_image_tokens": 4, "vision_feature_select_strategy": "full"},
        chat_template=_turns(
            "",
            "<|im_start|>user ",
            "<|im_start|>assistant\n",
            "<|im_end|>\n",
            "<image>\n",
            system="<|im_start|>system\n",
        ),  # fmt: skip
        config={
            "text_config": {"model_type": "qwen2", **_text(**_QWEN_TEXT_IDS)},
            "vision_config": {"model_type": "siglip_vision_model", **_vision(image_size=28, patch_size=14)},
            "image_token_index": Token("<image>"),
            "video_token_index": Token("<video>"),
            "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]],
            "vision_aspect_ratio": "anyres_max_9",
        },  # fmt: skip
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named_tokens={"image_token": "<image>", "video_token": "<video>"},
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        stop_tokens=("<|endoftext|>",),
        # TRL 1.16's loss forward does not pass `batch_num_images`, which this model needs for several images.
        multi_image=False,
    ),
    "idefics3": Family(
        model="Idefics3ForConditionalGeneration",
        processor="Idefics3Processor",
        image_processor="Idefics3ImageProcessor",
        image_processor_kwargs={"size": {"longest_edge": 56}, "max_image_size": {"longest_edge": 28}},
        processor_kwargs={"image_seq_len": 4},
        chat_template=_turns(
            "<|begin_of_text|>", "User:", "Assistant:", "<end_of_utterance>\n", "<image>", system="System:"
        ),  # fmt: skip
        config={
            "text_config": {
                "model_type": "llama",
                **_text(
                    bos_token_id=Token("<|begin_of_text|>"),
                    eos_token_id=Token("<end_of_utterance>"),
                    pad_token_id=Token("<|finetune_right_pad_id|>"),
                ),
            },
            "vision_config": _vision(image_size=28, patch_size=14),
            "image_token_id": Token("<image>"),
            "scale_factor": 1,
        },  # fmt: skip
        bos="<|begin_of_text|>",
        eos="<end_of_utterance>",
        pad="<|finetune_right_pad_id|>",
        special_tokens=(
            "<fake_token_around_image>",
            "<image>",
            "<global-img>",
            "<end_of_utterance>",
            *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
        ),  # fmt: skip
    ),
    "smolvlm": Family(
        model="SmolVLMForConditionalGeneration",
        processor="SmolVLMProcessor",
        image_processor="SmolVLMImageProcessor",
        image_processor_kwargs={"size": {"longest_edge": 56}, "max_image_size": {"longest_edge": 28}},
        companions={"video_processor": ("SmolVLMVideoProcessor", {})},
        processor_kwargs={"image_seq_len": 4},
        chat_template=_turns(
            "<|im_start|>", "User:", "Assistant:", "<end_of_utterance>\n", "<image>", system="System:"
        ),  # fmt: skip
        config={
            "text_config": {
                "model_type": "llama",
                **_text(
                    bos_token_id=Token("<|im_start|>"),
                    eos_token_id=Token("<end_of_utterance>"),
                    pad_token_id=Token("<|im_end|>"),
                ),
            },
            "vision_config": _vision(image_size=28, patch_size=14),
            "image_token_id": Token("<image>"),
            "scale_factor": 1,
        },  # fmt: skip
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        named_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        special_tokens=(*(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),),
    ),  # fmt: skip
    "internvl": Family(
        model="InternVLForConditionalGeneration",
        processor="InternVLProcessor",
        image_processor="GotOcr2ImageProcessor",
        image_processor_kwargs={"size": {"height": 28, "width": 28}, "max_patches": 4},
        companions={"video_processor": ("InternVLVideoProcessor", {"size": {"height": 28, "width": 28}})},
        processor_kwargs={"image_seq_length": 1},
        chat_template=_turns(
            "",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>\n",
            "<IMG_CONTEXT>\n",
            system="<|im_start|>system\n",
        ),  # fmt: skip
        config={
            "text_config": {"model_type": "qwen2", **_text(**_QWEN_TEXT_IDS)},
            "vision_config": _vision(image_size=[28, 28], patch_size=[14, 14], num_attention_heads=2),
            "image_token_id": Token("<IMG_CONTEXT>"),
            "image_seq_length": 1,
        },
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        stop_tokens=("<|endoftext|>",),
    ),  # fmt: skip
    "glm4v": Family(
        model="Glm4vForConditionalGeneration",
        processor="Glm4vProcessor",
        image_processor="Glm4vImageProcessor",
        image_processor_kwargs={
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 2,
            "size": {"shortest_edge": 28 * 28, "longest_edge": 56 * 56},
        },
        companions={
            "video_processor": ("Glm4vVideoProcessor", {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2})
        },
        chat_template=_turns(
            "[gMASK]<sop>",
            "<|user|>\n",
            "<|assistant|>\n",
            "",
            "<|begin_of_image|><|image|><|end_of_image|>",
            system="<|system|>\n",
        ),
        config={
            "text_config": _text(
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 1e4,
                    "mrope_section": [2, 1, 1],
                    "partial_rotary_factor": 0.5,
                },
                pad_token_id=Token("<|endoftext|>"),
                eos_token_id=Token("<|user|>"),
            ),
            "vision_config": {
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 64,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "image_size": 28,
            },
            "image_token_id": Token("<|image|>"),
            "video_token_id": Token("<|video|>"),
            "image_start_token_id": Token("<|begin_of_image|>"),
            "image_end_token_id": Token("<|end_of_image|>"),
            "video_start_token_id": Token("<|begin_of_video|>"),
            "video_end_token_id": Token("<|end_of_video|>"),
        },
        eos="<|user|>",
        pad="<|endoftext|>",
        named_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
        special_tokens=(
            "<|endoftext|>",
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|assistant|>",
            "<|begin_of_image|>",
            "<|end_of_image|>",
            "<|begin_of_video|>",
            "<|end_of_video|>",
        ),
        stop_tokens=("<|endoftext|>",),
    ),  # fmt: skip
    "mistral3": Family(
        model="Mistral3ForConditionalGeneration",
        processor="PixtralProcessor",
        image_processor="PixtralImageProcessor",
        image_processor_kwargs={"size": {"longest_edge": 56}, "patch_size": 14},
        processor_kwargs={"patch_size": 14, "spatial_merge_size": 2},
        chat_template=_turns("{{ bos_token }}", "[INST]", "", "[/INST]", "[IMG]", system="[SYSTEM_PROMPT]"),
        config={
            "text_config": {
                "model_type": "mistral",
                **_text(bos_token_id=Token("<s>"), eos_token_id=Token("</s>"), pad_token_id=Token("<pad>")),
            },
            "vision_config": {
                "model_type": "pixtral",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "head_dim": 16,
                "image_size": 56,
                "patch_size": 14,
            },
            "image_token_index": Token("[IMG]"),
            "spatial_merge_size": 2,
            "vision_feature_layer": -1,
        },
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        special_tokens=("[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]"),
        # PixtralProcessor returns tensors by default, so the unpadded prompt ids of TRL's `apply_chat_template` call
        # cannot be stacked once two prompts tokenise to different lengths (images of different sizes have different
        # token counts): lists, as TRL expects them.
        training_settings={"chat_template_kwargs": {"return_tensors": None}},
    ),  # fmt: skip
    "paligemma": Family(
        model="PaliGemmaForConditionalGeneration",
        processor="PaliGemmaProcessor",
        image_processor="SiglipImageProcessor",
        image_processor_kwargs={"size": {"height": 28, "width": 28}, "image_seq_length": 4, **_SIGLIP_NORM},
        # PaliGemma has no chat turns: the processor puts the image tokens and <bos> before the prompt's text.
        chat_template=_turns("", "", "", "", ""),
        config={
            "text_config": {
                "model_type": "gemma",
                **_text(bos_token_id=Token("<bos>"), eos_token_id=Token("<eos>"), pad_token_id=Token("<pad>")),
            },
            "vision_config": {
                "model_type": "siglip_vision_model",
                **_vision(image_size=28, patch_size=14, projection_dim=64),
            },
            "image_token_index": Token("<image>"),
            "projection_dim": 64,
            "hidden_size": 64,
            "vocab_size": VOCAB,
        },
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        named_tokens={"image_token": "<image>"},
        # Its processor returns the prompts' `labels`, one array per prompt, which TRL 1.16's generation stacks with
        # `np.array`: that fails once prompts hold different numbers of images (and so of tokens).
        mixed_image_counts=False,
    ),  # fmt: skip
    "lfm2_vl": Family(
        model="Lfm2VlForConditionalGeneration",
        processor="Lfm2VlProcessor",
        image_processor="Lfm2VlImageProcessor",
        image_processor_kwargs={
            "encoder_patch_size": 14,
            "tile_size": 28,
            "min_image_tokens": 1,
            "max_image_tokens": 4,
            "min_tiles": 2,
            "max_tiles": 4,
            "downsample_factor": 2,
            **_SIGLIP_NORM,
        },
        chat_template=_turns(
            "<|startoftext|>",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>\n",
            "<image>",
            system="<|im_start|>system\n",
        ),
        config={
            "text_config": {
                "model_type": "lfm2",
                **_text(
                    full_attn_idxs=[1],
                    conv_L_cache=3,
                    bos_token_id=Token("<|startoftext|>"),
                    eos_token_id=Token("<|im_end|>"),
                    pad_token_id=Token("<|pad|>"),
                ),
            },
            "vision_config": {"model_type": "siglip2_vision_model", **_vision(patch_size=14, num_patches=64)},
            "image_token_id": Token("<image>"),
            "projector_hidden_size": 64,
            "downsample_factor": 2,
        },
        bos="<|startoftext|>",
        eos="<|im_end|>",
        pad="<|pad|>",
        named_tokens={
            "image_token": "<image>",
            "image_start_token": "<|image_start|>",
            "image_end_token": "<|image_end|>",
            "image_thumbnail_token": "<|img_thumbnail|>",
        },
        special_tokens=("<|im_start|>", *(f"<|img_row_{r}_col_{c}|>" for r in range(1, 5) for c in range(1, 5))),
    ),  # fmt: skip
}


def family_training_settings(name: str) -> dict[str, Any]:
    """The GRPOConfig settings family `name` needs (`Family.training_settings`; none for the Qwen-VL builders)."""
    family = VLM_FAMILIES.get(name)
    return copy.deepcopy(family.training_settings) if family is not None else {}


def _resolve(value: Any, tokenizer: PreTrainedTokenizerFast) -> Any:
    """`value` with every `Token` replaced by its id and `VOCAB` by the tokenizer's length."""
    if isinstance(value, Token):
        token_id = tokenizer.convert_tokens_to_ids(str(value))
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != value:
            raise ValueError(f"{value!r} is not a token of the tokenizer")
        return token_id
    if isinstance(value, str) and value == VOCAB:
        return len(tokenizer)
    if isinstance(value, dict):
        return {key: _resolve(item, tokenizer) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, tokenizer) for item in value]
    return value


def family_available(name: str) -> str | None:
    """`None` when the installed transformers has family `name`, otherwise the reason it has not."""
    import transformers

    family = VLM_FAMILIES.get(name)
    if family is None:
        return None if name in FAMILIES else f"unknown family {name!r}"
    missing = [
        cls for cls in (family.model, family.processor, family.image_processor) if not hasattr(transformers, cls)
    ]
    if missing:
        return f"transformers {transformers.__version__} has no {', '.join(missing)}"
    return None


def build_family_tokenizer(name: str, extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """The byte-level BPE of :func:`build_tokenizer` with family `name`'s special tokens (named ones as attributes,
    `image_token`, `boi_token`, ..., as in the real checkpoints) and its chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    family = VLM_FAMILIES[name]
    vocab, merges = _trained_bpe(tuple(dict.fromkeys(extra_words)), 1500)
    vocab = dict(vocab)
    named = dict(family.named_tokens)
    tokens = [family.bos, family.eos, family.pad, *named.values(), *family.special_tokens]
    for token in dict.fromkeys(token for token in tokens if token):
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        extra_special_tokens=named,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    others = [token for token in family.special_tokens if token not in named.values()]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in others], special_tokens=True)
    tokenizer.chat_template = family.chat_template
    return tokenizer


@functools.cache
def cached_family(name: str) -> tuple[PreTrainedModel, Any]:
    """:func:`build_family` of `name` with the colour words, built once per process: copy the model before training
    it (``copy.deepcopy``), and do not change the processor."""
    return build_family(name)


def build_family(name: str, extra_words: Sequence[str] = COLOURS, seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """A tiny random model of family `name` (a key of `FAMILIES` or `VLM_FAMILIES`) and its real processor.

    Raises `RuntimeError` naming the reason when the installed transformers lacks the family (see
    :func:`family_available`).
    """
    import transformers

    if name in FAMILIES:
        return build_tiny_vlm(name, extra_words=extra_words, seed=seed)
    reason = family_available(name)
    if reason:
        raise RuntimeError(reason)
    family = VLM_FAMILIES[name]
    tokenizer = build_family_tokenizer(name, extra_words)
    image_processor = getattr(transformers, family.image_processor)(**family.image_processor_kwargs)
    parts = {key: getattr(transformers, cls)(**kwargs) for key, (cls, kwargs) in family.companions.items()}
    processor = getattr(transformers, family.processor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=family.chat_template,
        **parts,
        **family.processor_kwargs,
    )
    tokenizer = processor.tokenizer  # some processors add tokens of their own
    model_cls = getattr(transformers, family.model)
    config = model_cls.config_class(**_resolve(family.config, tokenizer))
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    generation = model.generation_config
    stops = [tokenizer.convert_tokens_to_ids(token) for token in (family.eos, *family.stop_tokens)]
    generation.eos_token_id = stops if len(stops) > 1 else stops[0]
    generation.pad_token_id = tokenizer.convert_tokens_to_ids(family.pad)
    if family.bos:
        generation.bos_token_id = tokenizer.convert_tokens_to_ids(family.bos)
    return model, processor
