"""The vision tower of every family: found from the model's structure, frozen on request, run on a blank image for a
process without images (the ZeRO-3 hook, here in one process; two-process runs in test_imageless_families.py)."""

import copy
import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.longrun.imageless import VisionTowerSync
from vppo_trl.method.vision import check_vision_model, freeze_vision_tower, vision_parts, vision_tower_parameters
from vppo_trl.testing import (
    COLOUR_QUESTION,
    FAMILIES,
    VLM_FAMILIES,
    cached_family,
    family_available,
    make_colour_dataset,
    make_shape_image,
)

ALL_FAMILIES = (*FAMILIES, *VLM_FAMILIES)


def family_or_skip(name: str):
    reason = family_available(name)
    if reason:
        pytest.skip(reason)
    model, processor = cached_family(name)
    return copy.deepcopy(model), processor


def text_only_inputs(processor) -> dict:
    return processor.tokenizer(["Name a colour.", "What is two plus two?"], return_tensors="pt", padding=True)


def image_inputs(processor) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": COLOUR_QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = make_shape_image("red", random.Random(0))
    return processor(images=[[image]], text=[text], return_tensors="pt", padding=True)


def reached(model, inputs) -> set[str]:
    """The parameters a forward and backward pass on `inputs` gives a gradient."""
    model.zero_grad(set_to_none=True)
    model(**inputs).logits.float().sum().backward()
    return {name for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_blank_image_run_leaves_the_output_alone_and_reaches_what_an_image_reaches(family):
    """The ZeRO-3 hook on a text-only forward: the same logits, and a gradient (of zeros) for every vision parameter a
    forward with an image reaches, so that a process without images runs the same collectives as one with them."""
    model, processor = family_or_skip(family)
    towers, projectors = vision_parts(model)
    vision = {name for name, p in model.named_parameters() if any(p is q for m in towers + projectors
                                                                   for q in m.parameters())}  # fmt: skip
    with_image = reached(model, image_inputs(processor)) & vision
    assert with_image
    inputs = text_only_inputs(processor)
    assert not reached(model, inputs) & vision  # a text-only forward skips the vision tower: the hang under ZeRO-3
    with torch.no_grad():
        expected = model(**inputs).logits
    hooks_before = {name: dict(module._forward_pre_hooks) for name, module in model.named_modules()}
    sync = VisionTowerSync(model, processor)
    assert not reached(model, inputs) & vision  # built, not yet on
    with sync:
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
        with sync:  # nested, as `evaluate` inside `train`: still on when the inner block ends
            pass
        assert reached(model, inputs) & vision == with_image
        parameters = dict(model.named_parameters())
        assert not any(parameters[name].grad.any() for name in with_image)
    # Off again: the model is as it was given
    assert {name: dict(module._forward_pre_hooks) for name, module in model.named_modules()} == hooks_before
    assert not reached(model, inputs) & vision


def test_a_model_without_an_image_path_is_refused_with_the_reason():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    _, processor = cached_family("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM \(qwen2\) has no image path .* keep images in every"):
        VisionTowerSync(Qwen2ForCausalLM(config), processor)
    with pytest.raises(ValueError, match=r"Cannot find the vision tower of Qwen2ForCausalLM \(qwen2\)"):
        freeze_vision_tower(Qwen2ForCausalLM(config))
    model, _ = family_or_skip("qwen2_5_vl")
    with pytest.raises(ValueError) as refused:
        VisionTowerSync(model, BlindProcessor())
    assert str(refused.value) == (
        "Qwen2_5_VLForConditionalGeneration (qwen2_5_vl)'s processor cannot process a blank image (ValueError: no "
        "images here), so a process whose batch has no image cannot keep in step under ZeRO-3 or FSDP: keep images "
        "in every process's batch, or train without sharding."
    )
    with pytest.raises(ValueError, match="VPPOTrainer needs a processor with an image processor to perturb images, "):
        check_vision_model(model, processor.tokenizer)


class BlindProcessor:
    image_token = "<image>"

    def __call__(self, **kwargs):
        raise ValueError("no images here")


def length_reward(completions, **kwargs) -> list[float]:
    return [float(i % 2) for i in range(len(completions))]


@pytest.mark.parametrize(
    ("family", "lora"), [("qwen2_5_vl", False), ("llava", True)], ids=["qwen2_5_vl", "llava-lora-all-linear"]
)
def test_freeze_vision_tower_trains_everything_but_the_tower(tmp_path, family, lora):
    from peft import LoraConfig

    model, processor = family_or_skip(family)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=VPPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=3,
            max_steps=2,
            learning_rate=1e-2,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            skip_zero_advantage=False,
            freeze_vision_tower=True,
            disable_tqdm=True,
        ),  # fmt: skip
        train_dataset=make_colour_dataset(8, seed=1),
        processing_class=processor,
        peft_config=peft_config,
    )
    tower = vision_tower_parameters(trainer.model)
    assert tower and not any(p.requires_grad for p in tower.values())
    if lora:
        assert any("lora_" in name for name in tower)  # the adapters inside the tower are frozen too
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    for name in tower:
        assert torch.equal(after[name], before[name]), name
    moved = {name for name, p in after.items() if not torch.equal(p, before[name])}
    trainable = {name for name, p in after.items() if p.requires_grad}
    towers, projectors = vision_parts(trainer.model)
    projector = {name for name, p in after.items() if any(p is q for m in projectors for q in m.parameters())}
    assert moved <= trainable
    assert moved & projector  # the projector trains (its LoRA adapters, with LoRA)
    assert moved - projector - set(tower)  # and the language model
    logs = [entry for entry in trainer.state.log_history if "vppo/dependency_mean" in entry]
    assert logs and logs[-1]["vppo/dependency_mean"] > 0  # the perturbed pass runs the frozen tower
