"""Tiny, offline, random-init vision-language models for tests, the CPU demo and benchmarks.

Nothing here touches the Hugging Face Hub: the tokenizer is a byte-level BPE trained on a built-in corpus, the
processors are the real processor classes configured for small images, and the models are the real model classes
built from tiny configs: the Qwen-VL builders (``build_tiny_vlm``, used by the demo and benchmarks) and every other
family GRPOTrainer trains, from one declarative table (``VLM_FAMILIES``, built by ``build_family``). Using the real
classes (rather than mocks) is what makes the tests meaningful: TRL's ``GRPOTrainer`` treats them as VLMs, the
processors emit each family's own image tensors, and the models run their real vision and merging code paths.
"""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

__all__ = [
    "CHAT_TEMPLATE",
    "COLOURS",
    "COLOUR_QUESTION",
    "FAMILIES",
    "SPECIAL_TOKENS",
    "VLM_FAMILIES",
    "Family",
    "build_family",
    "build_family_tokenizer",
    "build_model",
    "build_processor",
    "build_tiny_vlm",
    "build_tokenizer",
    "cached_family",
    "colour_reward",
    "exit_cleanly",
    "family_available",
    "make_colour_dataset",
    "make_shape_image",
    "save_tiny_workspace",
    "suppressed_token_ids",
    "tiny_main",
]

# The Qwen-VL families of `build_tiny_vlm` (the others are `VLM_FAMILIES`, below).
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
COLOURS = ("red", "green", "blue", "yellow")
COLOUR_QUESTION = "What colour is the shape? Answer with one word."

# Added tokens in the order (and with the special flag) of the real Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizers, so
# that the relative layout of the ids matches the real checkpoints (they come right after the BPE vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Not special in the real tokenizers (they are kept by ``skip_special_tokens=True`` decoding).
_NON_SPECIAL_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# The real Qwen2-VL chat template (identical to Qwen2.5-VL's, and to TRL's ``chat_templates/qwen2_5_vl.jinja``).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

_PATCH_SIZE = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}
_MERGE_SIZE = 2
_TEMPORAL_PATCH_SIZE = 2


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


_WORDS = """
the a an and or but if then so because of to in on at by for with from into over under above below near between
is are was were be been being has have had do does did can could will would should may might must shall
i you he she it we they me him her us them my your his its our their this that these those what which who whom
whose where when why how all any both each few more most other some such no nor not only own same than too very
one two three four five six seven eight nine ten hundred thousand first second third last next half double
red green blue yellow white black orange purple pink brown grey gray colour color shape circle square triangle
rectangle ellipse box line point dot corner edge side centre center left right top bottom middle large small big
little long short tall wide narrow round flat bright dark light heavy empty full
image picture photo scene object region pixel patch token model vision language text question answer reasoning
think step final result value number sum product difference ratio equation solve find compute calculate check
prove show explain describe count compare choose select give write read look see observe notice
cat dog bird fish tree house car road river sky sun moon star cloud rain snow water fire stone book table chair
window door room city world person people child teacher student friend team robot computer
time day night year week hour minute morning evening today tomorrow yesterday
make take get go come know say tell ask use work try call need feel become leave put mean keep let begin seem
help talk turn start run move live believe hold bring happen provide sit stand lose pay meet include continue
set learn change lead understand watch follow stop create speak allow add spend grow open walk win offer
remember love consider appear buy wait serve die send expect build stay fall cut reach kill remain
good new old great high different important public bad same able young early late hard easy true false
correct wrong possible likely sure clear simple real whole free
user assistant system helpful please thank yes maybe because therefore however
"""


def _corpus(extra_words: Sequence[str]) -> list[str]:
    """~2,500 short English/maths lines (deterministic) plus the words that must become single tokens."""
    rng = random.Random(1234)
    words = _WORDS.split()
    # The fixed chat/prompt strings are repeated so that they tokenise compactly, as in a real tokenizer.
    lines = [COLOUR_QUESTION, "You are a helpful assistant.", "user\nassistant\nsystem\n"] * 50
    lines.append("Think step by step and give the final answer.")
    for _ in range(2000):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        lines.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
    for _ in range(200):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op, val = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        lines.append(f"What is {a} {op} {b}? The answer is {val}.")
        lines.append(f"Let x = {a}. Then 2x + {b} = {2 * a + b}, so the final answer is \\boxed{{{2 * a + b}}}.")
    # Repeat each extra word (bare, after a space, capitalised) often enough that BPE merges it into one token
    # before anything else: its pair counts dominate every other pair in the corpus.
    for word in extra_words:
        lines.extend([f"{word}\n{word} {word}. {word}, {word.capitalize()}"] * 1000)
    return lines


def build_tokenizer(extra_words: Sequence[str] = (), vocab_size: int = 1500) -> PreTrainedTokenizerFast:
    """Train a small Qwen2-style byte-level BPE tokenizer with the real Qwen-VL special tokens and chat template.

    Each of ``extra_words`` is guaranteed to encode as ONE token, both bare (``"red"``, as a completion right after
    ``"assistant\\n"`` starts) and after a space (``" red"``); a ``ValueError`` is raised if that cannot be met.
    The vocabulary (~1,500 BPE entries, then the Qwen added tokens) depends on ``extra_words``: size models with
    ``len(tokenizer)``.
    The result is a real :class:`transformers.Qwen2Tokenizer` (a ``PreTrainedTokenizerFast``), so it saves and
    reloads offline with ``AutoTokenizer`` / ``AutoProcessor``.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    extra_words = tuple(dict.fromkeys(extra_words))
    for word in extra_words:
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"extra word {word!r} must be non-empty and contain no whitespace")
    vocab, merges = _trained_bpe(extra_words, vocab_size)
    vocab = dict(vocab)
    # Like the real checkpoints, the added tokens come right after the BPE vocabulary, in Qwen's order. Putting them
    # into the vocab makes ``add_tokens`` below reuse these ids instead of appending in its own order.
    for token in (*SPECIAL_TOKENS, *_NON_SPECIAL_ADDED_TOKENS):
        vocab[token] = len(vocab)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in _NON_SPECIAL_ADDED_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE

    for word in extra_words:
        for text in (word, " " + word):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1 or tokenizer.decode(ids) != text:
                raise ValueError(
                    f"extra word {text!r} did not become a single token ({ids}); use letters only, since Qwen's "
                    "pre-tokenizer splits digits and punctuation off"
                )
    return tokenizer


@functools.cache
def _trained_bpe(extra_words: tuple[str, ...], vocab_size: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Vocabulary and merges of a byte-level BPE trained on :func:`_corpus` (deterministic, so trained once)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Same normaliser / pre-tokeniser / decoder as the real Qwen2 tokenizer, so training and use split text alike.
    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size + len(extra_words) * 24,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(extra_words), trainer=trainer)
    # The merges are only exposed through the JSON serialisation.
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges)
    return dict(bpe.get_vocab()), merges


# ---------------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------------


def _pixel_budget(family: str, image_size: int) -> dict[str, int]:
    """min/max pixels so that an ``image_size`` square keeps (about) its size, rounded to the patch-merge grid."""
    factor = _PATCH_SIZE[family] * _MERGE_SIZE
    side = max(factor, round(image_size / factor) * factor)
    return {"min_pixels": factor * factor, "max_pixels": side * side}


def build_processor(
    family: str, tokenizer: PreTrainedTokenizerFast | None = None, image_size: int = 56
) -> ProcessorMixin:
    """The real processor of ``family`` configured so that an ``image_size`` square image gives a few image tokens.

    ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` with the real ``Qwen2VLImageProcessor``
    (14-px patches, CLIP normalisation for Qwen2/2.5-VL; 16-px patches, 0.5/0.5 normalisation for Qwen3-VL) and the
    real video processor the constructor expects. With the default 56 px: 2x2 merged patches = 4 ``<|image_pad|>``.
    A new tokenizer (``build_tokenizer()``) is trained when none is given.
    """
    _check_family(family)
    from transformers import Qwen2VLImageProcessor

    if tokenizer is None:
        tokenizer = build_tokenizer()
    budget = _pixel_budget(family, image_size)
    common = {
        "patch_size": _PATCH_SIZE[family],
        "merge_size": _MERGE_SIZE,
        "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
    }
    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
        size = {"shortest_edge": budget["min_pixels"], "longest_edge": budget["max_pixels"]}
        image_processor = Qwen2VLImageProcessor(size=dict(size), **norm, **common)
        # Video sizes count pixels over all frames of a temporal patch (see Qwen3-VL's video smart_resize).
        video_size = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"] * 8}
        video_processor = Qwen3VLVideoProcessor(size=video_size, **norm, **common)
        return Qwen3VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=CHAT_TEMPLATE,
        )

    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(**budget, **common)
    video_processor = Qwen2VLVideoProcessor(**budget, cap_pixels_per_frame=True, **common)
    processor_cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def suppressed_token_ids(processor_or_tokenizer: Any) -> list[int]:
    """Ids a policy must never emit: image/video pad and vision start/end (also ``<|vision_pad|>``).

    TRL 1.16 already suppresses ``<|image_pad|>`` while sampling, but its training log-probs use the full vocabulary,
    so a small policy can learn to park probability on these ids; callers mask them (e.g. ``suppress_tokens``).
    """
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    vocab = tokenizer.get_vocab()
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
    return [vocab[name] for name in names if name in vocab]


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def _mrope_section(head_dim: int) -> list[int]:
    """(temporal, height, width) rotary sections summing to ``head_dim / 2``, in Qwen's 1:1.5:1.5 proportion."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    half = head_dim // 2
    spatial = (3 * half) // 8
    return [half - 2 * spatial, spatial, spatial]


def _heads(hidden: int, head_dim: int = 16) -> int:
    if hidden % head_dim:
        raise ValueError(f"hidden size {hidden} must be a multiple of {head_dim}")
    return hidden // head_dim


def build_model(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    text_hidden: int = 64,
    text_layers: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised ``*ForConditionalGeneration`` of ``family`` with a tiny config matching ``tokenizer``.

    Heads are 16 wide (``text_hidden`` / ``vision_hidden`` must be multiples of 16). The vocabulary is
    ``len(tokenizer)`` and all special-token ids (image/video pad, vision start/end, bos/eos/pad) come from the
    tokenizer, so the model works with :func:`build_processor` and TRL without resizing. Deterministic in ``seed``.
    """
    _check_family(family)
    vocab = tokenizer.get_vocab()
    ids = {
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
    }
    endoftext, im_end = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    text_heads = _heads(text_hidden)
    head_dim = text_hidden // text_heads
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_hidden,
        "intermediate_size": 2 * text_hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "num_key_value_heads": max(1, text_heads // 2),
        "max_position_embeddings": 4096,
        "bos_token_id": endoftext,
        "eos_token_id": im_end,
        "pad_token_id": endoftext,
    }
    vision = {
        "depth": vision_layers,
        "num_heads": _heads(vision_hidden),
        "patch_size": _PATCH_SIZE[family],
        "spatial_merge_size": _MERGE_SIZE,
        "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
    }
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as config_cls
        from transformers import Qwen2VLForConditionalGeneration as model_cls

        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": _mrope_section(head_dim),
        }
        # Qwen2-VL's vision config names its width ``embed_dim``; ``hidden_size`` is the merger's output (= text).
        vision |= {"embed_dim": vision_hidden, "hidden_size": text_hidden, "mlp_ratio": 2}
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as config_cls
        from transformers import Qwen2_5_VLForConditionalGeneration as model_cls

        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": _mrope_section(head_dim),
        }
        vision |= {
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "out_hidden_size": text_hidden,
            # Window attention everywhere but the last block (the real 32-layer model uses 7, 15, 23, 31).
            "fullatt_block_indexes": [vision_layers - 1],
            "window_size": 112,
        }
    else:
        from transformers import Qwen3VLConfig as config_cls
        from transformers import Qwen3VLForConditionalGeneration as model_cls

        text["head_dim"] = head_dim
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": _mrope_section(head_dim),
            "mrope_interleaved": True,
        }
        # DeepStack feeds features of these vision blocks into the first len(...) text layers.
        n_deepstack = max(1, min(3, text_layers, vision_layers - 1))
        vision |= {
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "out_hidden_size": text_hidden,
            "num_position_embeddings": 8 * 8,  # must be a square: a learned 8x8 grid, interpolated per image
            "deepstack_visual_indexes": list(range(n_deepstack)),
        }
    config = config_cls(text_config=text, vision_config=vision, **ids, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    model.eval()
    generation = model.generation_config
    generation.bos_token_id = endoftext
    generation.eos_token_id = [im_end, endoftext]
    generation.pad_token_id = endoftext
    return model


def build_tiny_vlm(
    family: str, extra_words: Sequence[str] = (), seed: int = 0, image_size: int = 56, **kw: Any
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Tokenizer + real processor + tiny model of ``family`` in one call; ``kw`` goes to :func:`build_model`."""
    tokenizer = build_tokenizer(extra_words)
    processor = build_processor(family, tokenizer, image_size=image_size)
    model = build_model(family, tokenizer, seed=seed, **kw)
    return model, processor


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


# ---------------------------------------------------------------------------------------------------------------
# Colour task
# ---------------------------------------------------------------------------------------------------------------

_RGB = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20)}


def make_shape_image(colour: str, rng: random.Random, size: int = 56, shape: str | None = None) -> Image.Image:
    """White ``size``-px RGB image with one rectangle or ellipse of a jittered ``colour``, 50-80% of the side.

    Shapes this large are what a ~0.2M-parameter Qwen2.5-VL was seen to learn on CPU; smaller ones stayed at chance.
    """
    if colour not in _RGB:
        raise ValueError(f"Unknown colour {colour!r}; expected one of {COLOURS}")
    shape = shape or rng.choice(("rectangle", "ellipse"))
    if shape not in ("rectangle", "ellipse"):
        raise ValueError(f"Unknown shape {shape!r}; expected 'rectangle' or 'ellipse'")
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in _RGB[colour])
    width = rng.randint(math.ceil(0.5 * size), int(0.8 * size))
    height = rng.randint(math.ceil(0.5 * size), int(0.8 * size))
    left, top = rng.randint(0, size - width), rng.randint(0, size - height)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (left, top, left + width - 1, top + height - 1)
    if shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:
        draw.ellipse(box, fill=fill)
    return image


def make_colour_dataset(n: int, seed: int = 0, size: int = 56) -> Dataset:
    """``n`` rows of the colour task in TRL's conversational multimodal layout (``prompt``, ``images``, ``answer``).

    The prompt text never names the colour, so the reward can only be earned by looking at the image.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    rows: dict[str, list] = {"prompt": [], "images": [], "answer": []}
    for _ in range(n):
        colour = rng.choice(COLOURS)
        rows["prompt"].append(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": COLOUR_QUESTION}]}]
        )
        rows["images"].append([make_shape_image(colour, rng, size=size)])
        rows["answer"].append(colour)
    return Dataset.from_dict(rows)


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, list):  # structured content blocks
            content = "".join(block.get("text") or "" for block in content if isinstance(block, dict))
        parts.append(content or "")
    return "".join(parts)


def colour_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the completion, stripped and lower-cased, starts with the right colour word."""
    rewards = []
    for completion, colour in zip(completions, answer, strict=True):
        text = _completion_text(completion).strip().lower()
        word = text.split(maxsplit=1)[0].strip(".,;:!?\"'") if text else ""
        rewards.append(1.0 if word == colour.lower() else 0.0)
    return rewards


# ---------------------------------------------------------------------------------------------------------------
# The model and data of recipes/cpu_demo.yaml
# ---------------------------------------------------------------------------------------------------------------

TINY_MODEL_DIR = "tiny-qwen2.5-vl"
TINY_DATASET_FILE = "tiny-colour.parquet"


def save_tiny_workspace(output_dir: str | os.PathLike, num_rows: int = 256, seed: int = 0) -> dict[str, Path]:
    """Write what ``recipes/cpu_demo.yaml`` trains on to ``output_dir``: a tiny random Qwen2.5-VL with its processor
    (``tiny-qwen2.5-vl/``) and ``num_rows`` rows of the colour task (``tiny-colour.parquet``: ``problem``,
    ``images``, ``answer``). Returns both paths."""
    from datasets import Dataset

    folder = Path(output_dir)
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, seed=seed)
    paths = {"model": folder / TINY_MODEL_DIR, "dataset": folder / TINY_DATASET_FILE}
    model.save_pretrained(paths["model"])
    processor.save_pretrained(paths["model"])
    rng = random.Random(seed)
    answers = [rng.choice(COLOURS) for _ in range(num_rows)]
    rows = {"problem": [COLOUR_QUESTION] * num_rows, "images": [[make_shape_image(c, rng)] for c in answers]}
    Dataset.from_dict({**rows, "answer": answers}).to_parquet(paths["dataset"])
    return paths


@dataclass
class TinyWorkspaceArguments:
    """Flags of `vppo-trl tiny`."""

    output_dir: str = field(default=".", metadata={"help": "Folder to write tiny-qwen2.5-vl/ and the parquet to."})
    num_rows: int = field(default=256, metadata={"help": "Rows of the colour dataset."})
    seed: int = field(default=0, metadata={"help": "Seed of the model's weights and of the images."})


def tiny_main(argv: list[str] | None = None, prog: str = "vppo-trl tiny") -> dict[str, Path]:
    """`vppo-trl tiny`: build the model and data of recipes/cpu_demo.yaml locally (nothing is downloaded)."""
    from .command_line import CommandLineParser

    parser = CommandLineParser(
        TinyWorkspaceArguments,
        prog=prog,
        description="Write the tiny Qwen2.5-VL and colour dataset that recipes/cpu_demo.yaml trains on.",
    )
    (args,) = parser.parse_dataclasses(argv)
    if args.num_rows < 1:
        parser.error(f"--num-rows must be >= 1, got {args.num_rows}")
    paths = save_tiny_workspace(args.output_dir, args.num_rows, args.seed)
    print(f"Wrote {paths['model']}/ and {paths['dataset']} ({args.num_rows} rows).")
    return paths


# ---------------------------------------------------------------------------------------------------------------
# The end of a multi-process script
# ---------------------------------------------------------------------------------------------------------------


def exit_cleanly() -> NoReturn:
    """End a script run by ``accelerate launch`` (tests, benchmarks) once its results are written: every rank past
    its last collective, the process group destroyed, the output flushed, then ``os._exit(0)``.

    Why not a plain return: after ``destroy_process_group()`` the trainer's DDP wrapper or DeepSpeed engine (and
    DeepSpeed's group registry) still hold the gloo process groups, so their worker threads outlive ``main``. When one
    of them releases a finished collective's tensors while the interpreter finalises, it must take the GIL; Python
    then ends that thread with ``pthread_exit`` inside a C++ destructor, and ``std::terminate`` aborts the process
    ("terminate called without an active exception", SIGABRT) after a run that succeeded. Without finalisation no
    thread can get there; Python's own ``multiprocessing`` ends its child processes with ``os._exit`` too.
    """
    import logging
    import sys

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
