"""Tests for ``vppo_trl.testing``: the tiny offline Qwen-VL builders really work with transformers and TRL."""

import random

import pytest
import torch
from PIL import Image

from vppo_trl.testing import (
    COLOUR_QUESTION,
    COLOURS,
    FAMILIES,
    SPECIAL_TOKENS,
    VLLM_FAMILIES,
    VLLM_HEAD_DIM,
    VLM_FAMILIES,
    build_model,
    build_processor,
    build_tiny_vlm,
    build_tokenizer,
    cached_family,
    colour_reward,
    family_available,
    make_colour_dataset,
    make_shape_image,
    save_vllm_model,
    suppressed_token_ids,
)

PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}
PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
MODEL_CLASS = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": COLOUR_QUESTION}]}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(COLOURS)


def _inputs(processor, n: int = 1, size: int = 56):
    rng = random.Random(0)
    text = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    images = [make_shape_image(COLOURS[i % 4], rng, size=size) for i in range(n)]
    processor.tokenizer.padding_side = "left"
    return processor(text=[text] * n, images=images, return_tensors="pt", padding=True)


# --- tokenizer ---------------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens(tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in SPECIAL_TOKENS]
    # Qwen's order, contiguous, right after the BPE vocabulary; <think> etc. follow as non-special added tokens.
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert 1000 <= ids[0] <= 2000
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token is None
    for token in (*SPECIAL_TOKENS, "<think>", "</think>", "<tool_call>"):
        assert tokenizer.encode(token, add_special_tokens=False) == [vocab[token]]
    assert "<|image_pad|>" in tokenizer.all_special_tokens
    assert "<think>" not in tokenizer.all_special_tokens
    text = "<|im_start|>assistant\n<think>a</think>red<|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == "assistant\n<think>a</think>red"
    assert len(tokenizer) == max(tokenizer.get_vocab().values()) + 1


@pytest.mark.parametrize("word", COLOURS)
def test_extra_words_are_single_tokens(tokenizer, word):
    for text in (word, " " + word):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1
        assert tokenizer.decode(ids) == text
    # and in context, right after the generation prompt
    ids = tokenizer.encode(f"<|im_start|>assistant\n{word}<|im_end|>")
    assert tokenizer.convert_ids_to_tokens(ids)[-2] == word


def test_extra_words_custom_and_invalid():
    tok = build_tokenizer(["photosynthesis", "magenta"])
    assert len(tok.encode("photosynthesis")) == 1 and len(tok.encode(" magenta")) == 1
    with pytest.raises(ValueError):
        build_tokenizer(["two words"])
    with pytest.raises(ValueError):  # Qwen's pre-tokenizer splits digits and punctuation off
        build_tokenizer(["v1.5"])


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{COLOUR_QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )


# --- processor / model -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_processor(family, tokenizer):
    processor = build_processor(family, tokenizer)
    assert type(processor).__name__ == PROCESSOR_CLASS[family]
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert processor.image_processor.patch_size == PATCH[family]
    assert processor.tokenizer is tokenizer
    batch = _inputs(processor, n=2)
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= set(batch)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert batch["pixel_values"].shape == (2 * 16, 3 * 2 * PATCH[family] ** 2)
    n_pad = (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum(dim=1)
    assert n_pad.tolist() == [4, 4]
    # a bigger image gives more tokens: 112 px -> 4x4 merged patches
    big = _inputs(build_processor(family, tokenizer, image_size=112), size=112)
    assert (big["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 16
    assert set(suppressed_token_ids(processor)) == {
        tokenizer.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_model_forward_and_generate(family, tokenizer):
    processor = build_processor(family, tokenizer)
    model = build_model(family, tokenizer, seed=1)
    assert type(model).__name__ == MODEL_CLASS[family]
    config, text = model.config, model.config.get_text_config()
    vocab = tokenizer.get_vocab()
    assert text.vocab_size == len(tokenizer)
    assert config.image_token_id == vocab["<|image_pad|>"] == processor.image_token_id
    assert config.video_token_id == vocab["<|video_pad|>"]
    assert config.vision_start_token_id == vocab["<|vision_start|>"]
    assert text.pad_token_id == tokenizer.pad_token_id and text.eos_token_id == tokenizer.eos_token_id
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    if family == "qwen3_vl":
        n = config.vision_config.num_position_embeddings
        assert int(n**0.5) ** 2 == n
        assert 0 < len(config.vision_config.deepstack_visual_indexes) <= text.num_hidden_layers

    batch = _inputs(processor, n=2)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(logits).all()
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, suppress_tokens=suppressed_token_ids(processor))
    new = out[:, batch["input_ids"].shape[1] :]
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 3
    assert not set(new.flatten().tolist()) & set(suppressed_token_ids(processor))

    # seeded: same seed -> same weights, other seed -> different weights
    same, other = build_model(family, tokenizer, seed=1), build_model(family, tokenizer, seed=2)
    first = next(iter(model.state_dict()))
    assert torch.equal(model.state_dict()[first], same.state_dict()[first])
    assert not torch.equal(model.state_dict()[first], other.state_dict()[first])


def test_model_dtype_and_sizes(tokenizer):
    model = build_model("qwen2_5_vl", tokenizer, dtype=torch.bfloat16, text_hidden=32, text_layers=1)
    assert model.dtype == torch.bfloat16
    assert model.config.get_text_config().num_hidden_layers == 1
    processor = build_processor("qwen2_5_vl", tokenizer)
    batch = _inputs(processor)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits.float()).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_offline(family, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = build_tiny_vlm(family, COLOURS, seed=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    processor2 = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True)
    assert type(processor2) is type(processor) and type(model2) is type(model)
    assert processor2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert processor2.tokenizer.encode(" red") == processor.tokenizer.encode(" red")
    assert processor2.image_processor.patch_size == PATCH[family]
    a, b = _inputs(processor), _inputs(processor2)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(**a).logits, model2(**b).logits)
    assert model2.generation_config.eos_token_id == model.generation_config.eos_token_id


# --- colour task -------------------------------------------------------------------------------------------------


def test_shape_image():
    rng = random.Random(0)
    for colour in COLOURS:
        for shape in ("rectangle", "ellipse"):
            image = make_shape_image(colour, rng, shape=shape)
            assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (56, 56)
            pixels = list(image.getdata())
            coloured = [p for p in pixels if p != (255, 255, 255)]
            # 50-80% of the side each way: at least 0.25 * pi / 4 of the area, at most 64%
            assert 0.18 * len(pixels) < len(coloured) <= 0.65 * len(pixels)
            r, g, b = (sum(c[i] for c in coloured) / len(coloured) for i in range(3))
            dominant = {"red": r > max(g, b), "green": g > max(r, b), "blue": b > max(r, g), "yellow": min(r, g) > b}
            assert dominant[colour], (colour, r, g, b)
    assert make_shape_image("red", random.Random(5)).tobytes() == make_shape_image("red", random.Random(5)).tobytes()
    with pytest.raises(ValueError):
        make_shape_image("purple", rng)


def test_colour_dataset_and_reward():
    ds = make_colour_dataset(12, seed=1)
    assert len(ds) == 12 and set(ds.column_names) == {"prompt", "images", "answer"}
    row = ds[0]
    assert row["answer"] in COLOURS
    assert len(row["images"]) == 1 and isinstance(row["images"][0], Image.Image)
    (message,) = row["prompt"]
    assert message["role"] == "user"
    assert [c["type"] for c in message["content"]] == ["image", "text"]
    assert message["content"][1]["text"] == COLOUR_QUESTION
    assert not any(colour in COLOUR_QUESTION.lower() for colour in COLOURS)
    assert make_colour_dataset(12, seed=1)["answer"] == ds["answer"]

    answer = ["red", "blue", "green", "yellow", "red", "blue"]
    completions = [
        [{"role": "assistant", "content": " Red."}],
        [{"role": "assistant", "content": "red"}],
        "green",
        [{"role": "assistant", "content": [{"type": "text", "text": "yellow, surely"}]}],
        "reddish",
        "",
    ]
    assert colour_reward(completions, answer) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


# --- TRL ---------------------------------------------------------------------------------------------------------


def _noise_reward(completions, **kwargs):
    # Makes advantages non-zero (colour_reward is 0 everywhere for a random policy) so that gradients flow.
    return [random.random() for _ in completions]


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_trainer_runs(family, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    random.seed(0)
    model, processor = build_tiny_vlm(family, COLOURS)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[colour_reward, _noise_reward],
        args=args,
        train_dataset=make_colour_dataset(16),
        processing_class=processor,
    )
    assert trainer._is_vlm

    seen = []
    generate_and_score = trainer._generate_and_score_completions

    def spy(inputs):
        out = generate_and_score(inputs)
        seen.append(out)
        return out

    trainer._generate_and_score_completions = spy
    visual = trainer.model.model.visual
    before = {name: p.detach().clone() for name, p in visual.named_parameters()}
    trainer.train()

    assert trainer.state.global_step == 2
    assert seen, "no batch was generated"
    for batch in seen:
        # 8 completions, each with its own copy of the 4x4-patch image
        assert batch["pixel_values"].shape == (8 * 16, 3 * 2 * PATCH[family] ** 2)
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 8
        assert batch["completion_ids"].shape[0] == 8
    logs = [log for log in trainer.state.log_history if "rewards/colour_reward/mean" in log]
    assert len(logs) == 2
    # the vision tower got gradients through the training forward pass
    changed = [name for name, p in visual.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert changed


def test_vppo_trl_tiny_writes_the_cpu_recipes_model_and_data(tmp_path, capsys):
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vppo_trl.cli import main

    main(["tiny", "--output-dir", str(tmp_path), "--num-rows", "12"])
    assert f"Wrote {tmp_path / 'tiny-qwen2.5-vl'}/ and {tmp_path / 'tiny-colour.parquet'} (12 rows)." in (
        capsys.readouterr().out
    )
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny-qwen2.5-vl")
    processor = AutoProcessor.from_pretrained(tmp_path / "tiny-qwen2.5-vl")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    for colour in COLOURS:  # every colour word is one token, as `colour_reward` and the demo expect
        assert len(processor.tokenizer.encode(" " + colour)) == 1
    data = Dataset.from_parquet(str(tmp_path / "tiny-colour.parquet"))
    assert data.column_names == ["problem", "images", "answer"] and len(data) == 12
    assert set(data["problem"]) == {COLOUR_QUESTION} and set(data["answer"]) <= set(COLOURS)


def test_vppo_trl_tiny_refuses_an_empty_dataset(tmp_path, capsys):
    from vppo_trl.cli import main

    with pytest.raises(SystemExit):
        main(["tiny", "--output-dir", str(tmp_path), "--num-rows", "0"])
    assert "--num-rows must be >= 1, got 0" in capsys.readouterr().err


# --- every family ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(VLM_FAMILIES))
def test_family_builds_with_its_real_classes_and_reloads_offline(family, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if family_available(family):
        pytest.skip(family_available(family))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = VLM_FAMILIES[family]
    model, processor = cached_family(family)
    assert (type(model).__name__, type(processor).__name__) == (spec.model, spec.processor)
    assert type(processor.image_processor).__name__.startswith(spec.image_processor.removesuffix("Fast"))
    tokenizer = processor.tokenizer
    for attribute, token in spec.named_tokens.items():  # named special tokens are attributes, as in the real ones
        assert getattr(tokenizer, attribute) == token
        assert tokenizer.convert_tokens_to_ids(token) == getattr(tokenizer, f"{attribute}_id")
    for token in (*spec.named_tokens.values(), *spec.special_tokens, spec.eos, spec.pad):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)], token
    assert model.config.get_text_config().vocab_size >= len(tokenizer)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": COLOUR_QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert COLOUR_QUESTION in text

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(reloaded) is type(processor)
    image = make_shape_image("red", random.Random(0))
    tokenizer.padding_side = reloaded.tokenizer.padding_side = "left"
    first, again = (p(images=[[image]], text=[text], return_tensors="pt", padding=True) for p in (processor, reloaded))
    assert "pixel_values" in again  # a processor without its image processor would act as a tokenizer
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key
    reloaded_model = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True)
    assert type(reloaded_model) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded_model(**again).logits, model(**first).logits)


@pytest.mark.parametrize("family", VLLM_FAMILIES)
def test_vllm_models_have_32_wide_heads_and_reload_offline(family, tmp_path, monkeypatch):
    """vLLM's CPU attention has no kernel for 16-wide heads; these models, saved where vLLM loads them from, have
    32-wide heads, text and vision, and reload with their processor (tests/test_vllm.py serves them with vLLM)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_vllm_model(tmp_path, family)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    text, vision = model.config.get_text_config(), model.config.vision_config
    assert text.hidden_size // text.num_attention_heads == VLLM_HEAD_DIM
    assert getattr(text, "head_dim", None) in (None, VLLM_HEAD_DIM)
    vision_heads = getattr(vision, "num_heads", None) or vision.num_attention_heads
    assert vision.hidden_size // vision_heads == VLLM_HEAD_DIM
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": COLOUR_QUESTION}]}]
    text_prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = make_shape_image("red", random.Random(0))
    inputs = processor(images=[[image]], text=[text_prompt], return_tensors="pt")
    assert "pixel_values" in inputs
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
