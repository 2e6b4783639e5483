"""What both trainers get: the same model, data, reward and training settings.

The `tiny` and `small` presets are `vppo_trl.testing`'s Qwen2.5-VL models at other widths; `7b-arch` is
Qwen2.5-VL-7B-Instruct's architecture, built here because it is a benchmark's model, not a test fixture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .settings import Settings

FAMILY = "qwen2_5_vl"

# Qwen2.5-VL-7B-Instruct's config.json values (the model is not downloaded; weights are random).
QWEN25_VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN25_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "hidden_act": "silu",
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "initializer_range": 0.02,
}
QWEN25_VL_7B_VOCAB = 152064


def special_token_ids(tokenizer) -> dict[str, int]:
    """The local tokenizer's ids for a Qwen-VL config: image/video pad, vision start/end, bos/eos/pad."""
    vocab = tokenizer.get_vocab()
    return {
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
        "endoftext": vocab["<|endoftext|>"],
        "im_end": vocab["<|im_end|>"],
    }


def qwen25_vl_arch_config(
    tokenizer,
    text: dict[str, Any],
    vision: dict[str, Any],
    vocab_size: int,
    tie_word_embeddings: bool,
    text_layers: int | None = None,
    vision_layers: int | None = None,
):
    """A Qwen2.5-VL config from a checkpoint's `text` and `vision` values, with the local tokenizer's special-token
    ids and the vocabulary padded to `vocab_size` (so that the embedding and the LM head cost what they cost there).

    Fewer layers (smoke tests, short checks) keep the real spacing of the full-attention vision blocks.
    """
    from transformers import Qwen2_5_VLConfig

    ids = special_token_ids(tokenizer)
    text_layers = text_layers or text["num_hidden_layers"]
    vision_layers = vision_layers or vision["depth"]
    text = dict(text)
    text.update(
        vocab_size=max(vocab_size, len(tokenizer)),
        num_hidden_layers=text_layers,
        max_window_layers=min(text["max_window_layers"], text_layers),
        bos_token_id=ids["endoftext"],
        eos_token_id=ids["im_end"],
        pad_token_id=ids["endoftext"],
    )
    vision = dict(vision)
    full = [i for i in vision["fullatt_block_indexes"] if i < vision_layers] or [vision_layers - 1]
    vision.update(depth=vision_layers, fullatt_block_indexes=full)
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=tie_word_embeddings,
    )


def qwen25_vl_7b_arch_config(tokenizer, text_layers: int = 28, vision_layers: int = 32, vocab_size: int | None = None):
    """Qwen2.5-VL-7B-Instruct's config, with the local tokenizer's special-token ids.

    The tokenizer has ~1.5k tokens; the vocabulary is padded to 152064 like the real checkpoint.
    """
    return qwen25_vl_arch_config(
        tokenizer,
        QWEN25_VL_7B_TEXT,
        QWEN25_VL_7B_VISION,
        vocab_size or QWEN25_VL_7B_VOCAB,
        tie_word_embeddings=False,
        text_layers=text_layers,
        vision_layers=vision_layers,
    )


def build_random_model(model_cls, config, device: str, dtype: str, seed: int, attn_implementation: str | None = None):
    """`model_cls` with random weights, initialised directly on `device` in `dtype` (a CPU fp32 copy of a 7B model
    would take 33 GB and minutes), with generation stopping at the config's end tokens."""
    import torch

    torch.manual_seed(seed)
    if device == "cuda":
        torch.cuda.manual_seed_all(seed)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):
        model = model_cls._from_config(config, dtype=getattr(torch, dtype), **extra)
    model.eval()
    text = config.text_config
    generation = model.generation_config
    generation.bos_token_id = text.bos_token_id
    generation.eos_token_id = [text.eos_token_id, text.bos_token_id]
    generation.pad_token_id = text.pad_token_id
    return model


def build_qwen25_vl_7b_arch(tokenizer, settings: Settings):
    """The 7B architecture with random weights, initialised on the device in `settings.dtype`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen25_vl_7b_arch_config(tokenizer, settings.text_layers, settings.vision_layers, settings.vocab_size)
    return build_random_model(
        Qwen2_5_VLForConditionalGeneration, config, settings.device, settings.dtype, settings.seed
    )


def build_policy(settings: Settings):
    """Model and processor for the preset; the same seed gives the same weights in both workers."""
    import torch

    from vppo_trl.testing import build_model, build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    processor = build_processor(FAMILY, tokenizer, image_size=settings.image_size)
    if settings.model == "7b-arch":
        return build_qwen25_vl_7b_arch(tokenizer, settings), processor
    model = build_model(
        FAMILY,
        tokenizer,
        seed=settings.seed,
        text_hidden=settings.text_hidden,
        text_layers=settings.text_layers,
        vision_hidden=settings.vision_hidden,
        vision_layers=settings.vision_layers,
        head_dim=settings.head_dim,
        dtype=getattr(torch, settings.dtype),
    )
    if settings.vocab_size and settings.vocab_size > len(tokenizer):
        torch.manual_seed(settings.seed + 1)
        model.resize_token_embeddings(settings.vocab_size, mean_resizing=False)
    return model, processor


def fingerprint(model) -> str:
    """A digest of every parameter, to check that both workers start from the same weights."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            p = parameter.detach()
            sums = (p.sum(dtype=torch.float64).item(), p.abs().sum(dtype=torch.float64).item())
            digest.update(name.encode())
            digest.update(repr(sums).encode())
    return digest.hexdigest()[:16]


def uniform_prompt(index: int, share: float) -> bool:
    """Whether prompt `index` gets a uniform reward: exactly `share` of any run of consecutive prompts (Bresenham),
    so with an unshuffled dataset every step holds the same number of uniform groups."""
    return int((index + 1) * share) > int(index * share)


def make_reward(share: float) -> Callable[..., list[float]]:
    """Reward 1 for every completion of a 'uniform' prompt (advantage exactly 0), else 1 for the first completion of
    the group and 0 for the others (every advantage non-zero, whatever G)."""

    def benchmark_reward(completions: list, prompt_index: list[int], **kwargs: Any) -> list[float]:
        seen: set[int] = set()
        rewards = []
        for index in prompt_index:
            if uniform_prompt(index, share):
                rewards.append(1.0)
            else:
                rewards.append(0.0 if index in seen else 1.0)
                seen.add(index)
        return rewards

    return benchmark_reward


def vllm_generation_kwargs(length: int, suppressed: list[int]) -> dict[str, Any]:
    """The fixed-length, vision-token-free sampling of `generate`, in vLLM's `SamplingParams` terms."""
    return {"min_tokens": length, "logit_bias": {token: -100.0 for token in suppressed}}


def saved_for_vllm(model, processor, output_dir: str):
    """vLLM loads the policy from a folder (TRL passes it `model.name_or_path`): save it there, keep training it."""
    folder = Path(output_dir) / "policy"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    model.name_or_path = model.config._name_or_path = str(folder)
    return model


def build_trainer(role: str, settings: Settings, model, processor, output_dir: str):
    """The role's trainer over the colour task, with fixed-length completions; everything but the class is shared."""
    from trl import GRPOConfig, GRPOTrainer

    from vppo_trl import VPPOConfig, VPPOTrainer
    from vppo_trl.testing import make_colour_dataset, suppressed_token_ids

    rows = settings.prompts_per_step * settings.total_steps * settings.num_iterations + settings.prompts_per_step
    dataset = make_colour_dataset(max(rows, 16), seed=settings.seed, size=settings.image_size)
    dataset = dataset.add_column("prompt_index", list(range(len(dataset))))
    length = settings.max_completion_length
    suppressed = suppressed_token_ids(processor)
    # Fixed-length completions: EOS is masked until max_new_tokens; vision tokens are never sampled.
    generation_kwargs = {"min_new_tokens": length, "suppress_tokens": suppressed}
    if settings.vllm:
        generation_kwargs = vllm_generation_kwargs(length, suppressed)
        model = saved_for_vllm(model, processor, output_dir)
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=settings.completions,
        gradient_accumulation_steps=1,
        num_generations=settings.num_generations,
        num_iterations=settings.num_iterations,
        max_completion_length=length,
        generation_kwargs=generation_kwargs,
        max_steps=settings.total_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        optim=settings.optim,
        shuffle_dataset=False,
        gradient_checkpointing=settings.gradient_checkpointing,
        bf16=settings.dtype == "bfloat16",
        use_cpu=settings.device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=settings.seed,
        dataloader_num_workers=0,
        use_vllm=settings.vllm,
        vllm_mode="colocate",
        vllm_max_model_length=1024 if settings.vllm else None,
    )
    if role == "grpo":
        args, trainer_cls = GRPOConfig(**common), GRPOTrainer
    else:
        args = VPPOConfig(
            **common, dependency_estimator=settings.estimator, skip_zero_advantage=settings.skip_zero_advantage
        )
        trainer_cls = VPPOTrainer
    trainer = trainer_cls(
        model=model,
        reward_funcs=make_reward(settings.zero_advantage_share),
        args=args,
        train_dataset=dataset,
        processing_class=processor,
    )
    if role == "grpo" and settings.vllm:
        from vppo_trl.vllm_support import engine_dropped_weights, reload_colocated_weights

        if engine_dropped_weights(trainer.vllm_generation):
            # TRL's own weight load fails on vLLM's CPU build; GRPO syncs the way VPPOTrainer does there
            trainer.vllm_generation.sync_weights = functools.partial(reload_colocated_weights, trainer.vllm_generation)
    return trainer
