"""Tiny random Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) with a locally trained tokenizer and the real
processor classes: what the demo, the benchmarks and most tests train."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .colour_task import COLOUR_QUESTION

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

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


def _heads(hidden: int, head_dim: int) -> int:
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
    head_dim: int = 16,
) -> PreTrainedModel:
    """A randomly initialised ``*ForConditionalGeneration`` of ``family`` with a tiny config matching ``tokenizer``.

    Attention heads (text and vision) are ``head_dim`` wide, so ``text_hidden`` / ``vision_hidden`` must be multiples
    of it; vLLM's CPU attention needs at least 32 (see :mod:`vppo_trl.testing.vllm_models`). The vocabulary is
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
    text_heads = _heads(text_hidden, head_dim)
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
        "num_heads": _heads(vision_hidden, head_dim),
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
