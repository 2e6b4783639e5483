"""VPPO on every vision-language model family GRPOTrainer trains, tiny offline models of each (one matrix).

Every family trains on realistic batches: four prompt groups a step, images of different sizes and aspect ratios in one
batch and within a prompt (two a prompt wherever GRPOTrainer trains the family on them), half the groups at zero
advantage (not measured: where the processor pads, the measured rows are padded differently from the batch), prompts
without an image, and dynamic sampling joining rounds padded differently. GRPOTrainer and VPPOTrainer with TGF, TAS and
the entropy penalty off train a step to the same parameters, bit for bit, while VPPO measures a non-zero visual
dependency in the default space (`original_image`) on only the rows with an advantage; then VPPO with its defaults and
dynamic sampling trains a step in each space, on data with text-only prompts (GRPOTrainer of TRL 1.16 fails on them,
so the comparison leaves them out; PaliGemma fails on them inside GRPOTrainer's generation, for VPPO too: see
docs/models.md).
"""

import copy
import random

import pytest
import torch
import transformers
from datasets import Dataset
from packaging.version import Version
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer

import vppo_trl.method.passes as passes_module
from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.method.passes import check_image_layout
from vppo_trl.method.perturbations import PixelLayout
from vppo_trl.testing import (
    COLOUR_QUESTION,
    FAMILIES,
    VLM_FAMILIES,
    cached_family,
    family_available,
    family_training_settings,
    make_shape_image,
)

ALL_FAMILIES = (*FAMILIES, *VLM_FAMILIES)
# GRPO logs that depend on wall time, not on the training computation.
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
# Before transformers 5.18, PixtralProcessor keeps returning tensors when `return_tensors=None` is asked for (a common
# kwarg defaulting to "pt" there), so prompts that tokenise to different lengths fail inside GRPOTrainer's own
# tokenisation, as docs/models.md says: there Mistral 3 trains on images of one size and no text-only prompts.
UNIFORM_PROMPTS = {"mistral3"} if Version(transformers.__version__) < Version("5.18") else set()
# There (transformers before 5.18) its prompt ids come back as tensors, and TRL 1.16's GRPOTrainer itself warns "To
# copy construct from a tensor" (`torch.tensor(ids)`, grpo_trainer.py): the same warnings when it trains alone.
UPSTREAM_WARNINGS = {"mistral3": "ignore:To copy construct from a tensor:UserWarning"} if UNIFORM_PROMPTS else {}
# Families whose projector starts at zero: a random model ignores the image until its first optimizer step.
ZERO_PROJECTOR = {"gemma3"}
# Each prompt's answer colour and images (width x height), in data order: four prompt groups a step. Red groups are
# rewarded uniformly (zero advantage), blue ones are not. The square, the largest image (the most tiles), is in a red
# group of the first four prompts only: the measured rows, and the informative groups of the second four, are padded to
# smaller images than the first four. `None`: a prompt without an image (given the strips where text-only prompts are
# left out).
PROMPTS = [
    ("red", [(56, 56), (42, 42)]),
    ("blue", [(56, 21), (21, 56)]),
    ("blue", None),
    ("red", [(21, 56), (56, 28)]),
    ("blue", [(28, 56), (56, 21)]),
    ("red", None),
    ("blue", [(56, 28), (28, 56)]),
    ("red", [(56, 21), (21, 56)]),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for these small models: on a shared 2-core machine two threads spin against each other (the
    matrix took 5 minutes with two at a load of 8, 81 s with one); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def family_or_skip(name: str):
    reason = family_available(name)
    if reason:
        pytest.skip(reason)
    model, processor = cached_family(name)
    return copy.deepcopy(model), processor


def colour_dataset(images_per_prompt: int, text_only: bool = True, uniform: bool = False) -> Dataset:
    """The `PROMPTS`, each with its first `images_per_prompt` images (a shape of the answer colour, then green);
    `uniform`: every image 56 x 56 and no text-only prompt (`UNIFORM_PROMPTS`)."""
    rng = random.Random(0)
    records = []
    for colour, sizes in PROMPTS:
        sizes = sizes if sizes is not None or not text_only else []
        sizes = (sizes if sizes is not None else [(56, 21), (21, 56)])[:images_per_prompt]
        sizes = [(56, 56)] * len(sizes) if uniform else sizes
        images = [
            make_shape_image(colour if rank == 0 else "green", rng, size=max(width, height)).resize((width, height))
            for rank, (width, height) in enumerate(sizes)
        ]
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": COLOUR_QUESTION}]
        records.append({"prompt": [{"role": "user", "content": content}], "images": images, "answer": colour})
    return Dataset.from_list(records)


def half_uniform_reward(completions, answer, **kwargs) -> list[float]:
    """1 for every completion of a red prompt (zero advantage), alternating 0/1 for the others (pairs of completions
    of a prompt group)."""
    return [1.0 if colour == "red" else float(i % 2) for i, colour in enumerate(answer)]


def settings(tmp_path, **overrides) -> dict:
    return {
        **dict(
            output_dir=str(tmp_path),
            per_device_train_batch_size=8,
            num_generations=2,
            max_completion_length=3,
            max_steps=1,
            learning_rate=1e-2,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            shuffle_dataset=False,
            seed=5,
            disable_tqdm=True,
            bf16=False,  # float32 on CPU: bf16 autocast there is slow and says nothing about the family
            gradient_checkpointing=False,
        ),
        **overrides,
    }


def train(trainer):
    set_seed(5)  # the same sampling draws for every trainer
    trainer.train()
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(family, marks=[pytest.mark.filterwarnings(UPSTREAM_WARNINGS[family])])
        if family in UPSTREAM_WARNINGS
        else family
        for family in ALL_FAMILIES
    ],
)
def test_family(tmp_path, family):
    model, processor = family_or_skip(family)
    table = VLM_FAMILIES.get(family)
    images_per_prompt = 2 if table is None or table.multi_image else 1
    uniform = family in UNIFORM_PROMPTS
    text_only = (table is None or table.mixed_image_counts) and not uniform
    family_settings = family_training_settings(family)
    common = dict(reward_funcs=half_uniform_reward, processing_class=processor)
    images_only = colour_dataset(images_per_prompt, text_only=False, uniform=uniform)
    grpo_args = GRPOConfig(**settings(tmp_path / "grpo", **family_settings))
    grpo = GRPOTrainer(model=copy.deepcopy(model), args=grpo_args, train_dataset=images_only, **common)
    off = VPPOConfig(**settings(tmp_path / "off", token_filter_ratio=1.0, advantage_shaping=False, **family_settings))
    vppo = VPPOTrainer(model=copy.deepcopy(model), args=off, train_dataset=images_only, **common)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grpo_parameters, vppo_parameters = train(grpo), train(vppo)
    assert grpo_parameters.keys() == vppo_parameters.keys()
    for name, value in grpo_parameters.items():
        torch.testing.assert_close(vppo_parameters[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(before[name], value) for name, value in vppo_parameters.items())
    for grpo_log, vppo_log in zip(grpo.state.log_history, vppo.state.log_history, strict=True):
        for key, value in grpo_log.items():  # GRPO's own metrics, logged alike
            if key not in TIMING_KEYS:
                assert vppo_log[key] == value, key
    (log,) = [entry for entry in vppo.state.log_history if "vppo/dependency_mean" in entry]
    assert 0 < log["vppo/skipped_fraction"] < 1  # only the rows with an advantage
    # Gemma 3's image reaches the decoder only after one optimizer step (measured > 0 below).
    assert log["vppo/dependency_mean"] == 0 if family in ZERO_PROJECTOR else log["vppo/dependency_mean"] > 0

    # VPPO as configured by default (TGF, TAS) in each space, with dynamic sampling and text-only prompts, one step on
    # from the model VPPO trained: the first four prompts hold two informative groups, the next four the other two.
    with_text_only = colour_dataset(images_per_prompt, text_only=text_only, uniform=uniform)
    for space in ("original_image", "pixel_values"):
        sampling = {"dynamic_sampling": True, "dynamic_sampling_reward": "total", "perturbation_space": space}
        defaults = VPPOConfig(**settings(tmp_path / space, **sampling, **family_settings))
        trainer = VPPOTrainer(model=copy.deepcopy(vppo.model), args=defaults, train_dataset=with_text_only, **common)
        trained = train(trainer)
        assert any(not torch.equal(vppo_parameters[name], value) for name, value in trained.items()), space
        (log,) = [entry for entry in trainer.state.log_history if "vppo/dependency_mean" in entry]
        assert log["dynamic_sampling/rounds"] == 2 and log["dynamic_sampling/batch_fill"] == 1, space
        assert log["vppo/dependency_mean"] > 0 and log["vppo/token_fraction"] < 1, space


class PatchSequenceProcessor:
    """A processor whose pixel_values are patch sequences with nothing saying their grid: they do not map back."""

    image_token = "<image>"

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, images=None, text=None, **kwargs):
        return {"input_ids": torch.zeros(1, 3, dtype=torch.long), "pixel_values": torch.zeros(len(images), 16, 588)}


class TextOnlyProcessor(PatchSequenceProcessor):
    """A processor that cannot process images without their prompt's text."""

    def __call__(self, images=None, text=None, **kwargs):
        raise ValueError("You must provide the prompt's text.")


def test_layouts_that_cannot_be_perturbed_are_refused_naming_family_reason_and_space():
    model, processor = cached_family("qwen2_5_vl")
    layout = PixelLayout.from_image_processor(processor.image_processor)
    grids = PatchSequenceProcessor(processor.image_processor)
    check_image_layout(model, grids, "original_image", layout)  # the images can be processed again: fine
    with pytest.raises(ValueError) as refused:
        check_image_layout(model, grids, "pixel_values", layout)
    assert str(refused.value).startswith(
        "VPPO cannot perturb the processed pixel_values of Qwen2_5_VLForConditionalGeneration (qwen2_5_vl): they do "
        "not map back to images (pixel_values of shape (1, 16, 588) is not a supported"
    )
    assert str(refused.value).endswith("Use perturbation_space='original_image' (the default) to perturb the images "
                                       "as the data delivers them.")  # fmt: skip
    with pytest.raises(ValueError) as refused:
        check_image_layout(model, TextOnlyProcessor(processor.image_processor), "original_image", layout)
    assert str(refused.value) == (
        "VPPO cannot perturb the images of Qwen2_5_VLForConditionalGeneration (qwen2_5_vl) as the data delivers them: "
        "its processor cannot process images alone (ValueError: You must provide the prompt's text.). Set "
        "perturbation_space='pixel_values' to perturb the processed pixels instead."
    )
    # The processed pixels need no processing again: that space is not refused for it.
    check_image_layout(model, TextOnlyProcessor(processor.image_processor), "pixel_values", layout)


def test_the_refusal_comes_when_the_trainer_is_built(tmp_path, monkeypatch):
    model, processor = family_or_skip("qwen2_5_vl")

    def refuse(*args, **kwargs):
        raise ValueError("You must provide the prompt's text.")

    monkeypatch.setattr(passes_module, "process_images", refuse)
    with pytest.raises(ValueError, match="its processor cannot process images alone"):
        VPPOTrainer(
            model=model,
            reward_funcs=half_uniform_reward,
            args=VPPOConfig(**settings(tmp_path)),
            train_dataset=colour_dataset(1),
            processing_class=processor,
        )


def test_a_processor_changed_after_the_trainer_was_built_is_named(tmp_path):
    model, processor = family_or_skip("idefics3")
    processor = copy.deepcopy(processor)
    dataset = colour_dataset(1)
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=half_uniform_reward,
        args=VPPOConfig(**settings(tmp_path)),
        train_dataset=dataset,
        processing_class=processor,
    )
    inputs = [dict(dataset[i]) for i in range(2) for _ in range(trainer.num_generations)]
    trainer.model.train()
    batch = trainer._generate_and_score_round(inputs)
    processor.image_processor.do_image_splitting = False  # fewer tiles per image than the batch has
    with pytest.raises(RuntimeError) as failed:
        trainer._perturbed_pixel_values(batch)
    assert "The perturbed images do not have the original batch's token layout: processing them again gave " in str(
        failed.value
    )
    assert "pixel_values of shape (4, 1, 3, 28, 28) instead of (4, 5, 3, 28, 28)" in str(failed.value)
