"""VPPOTrainer on tiny local Qwen-VL models: training, GRPO equivalence, TGF gradients, skip, LoRA, checkpoints."""

import copy
import math
import random
import re
import warnings
from fractions import Fraction

import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForImageTextToText, Qwen2Config, Qwen2ForCausalLM, TrainerCallback, set_seed
from trl import GRPOConfig, GRPOTrainer

import vppo_trl.method.passes as passes_module
import vppo_trl.method.shaping as shaping_module
import vppo_trl.trainer as trainer_module
from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.method.batch_rows import model_inputs
from vppo_trl.method.perturbations import perturb_original_images, perturb_pixel_values
from vppo_trl.method.shared_state import has_dropout
from vppo_trl.testing import (
    COLOUR_QUESTION,
    COLOURS,
    FAMILIES,
    build_model,
    build_processor,
    build_tiny_vlm,
    build_tokenizer,
    make_colour_dataset,
    make_shape_image,
)

# GRPO logs that depend on wall time, not on the training computation.
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def length_reward(completions, **kwargs) -> list[float]:
    """Varied, deterministic rewards so that advantages are non-zero."""
    return [float(len(str(completion)) % 3) for completion in completions]


def half_uniform_reward(completions, answer, **kwargs) -> list[float]:
    """Uniform (zero-advantage) groups for red and green shapes, varied rewards for the others."""
    return [1.0 if a in ("red", "green") else float(len(str(c)) % 3) for c, a in zip(completions, answer, strict=True)]


def common_settings(tmp_path, **overrides) -> dict:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=7,
    )
    settings.update(overrides)
    return settings


def vppo_args(tmp_path, **overrides) -> VPPOConfig:
    return VPPOConfig(**common_settings(tmp_path, **overrides))


def grpo_args(tmp_path, **overrides) -> GRPOConfig:
    return GRPOConfig(**common_settings(tmp_path, **overrides))


def make_trainer(tmp_path, family="qwen2_5_vl", reward=length_reward, dataset=None, **overrides) -> VPPOTrainer:
    model, processor = build_tiny_vlm(family, extra_words=COLOURS)
    return VPPOTrainer(
        model=model,
        reward_funcs=reward,
        args=vppo_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else make_colour_dataset(32, seed=1),
        processing_class=processor,
    )


def generation_batch(trainer: VPPOTrainer, dataset, prompts: int) -> dict:
    """One GRPO generation batch (before VPPO, with the images VPPO perturbs), as the trainer builds it."""
    inputs = [dict(dataset[i]) for i in range(prompts) for _ in range(trainer.num_generations)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    if isinstance(trainer, VPPOTrainer):
        return trainer._generate_and_score_round(inputs)
    return trainer._generate_and_score_completions(inputs)


def apply_vppo(trainer: VPPOTrainer, batch: dict) -> None:
    """TGF and TAS on a generation batch, including the part that waits for the loss's forward when deferred."""
    trainer._apply_visual_dependency(batch)
    if trainer_module.DEFERRED_KEY in batch:
        with torch.no_grad():
            trainer._compute_loss(trainer.model, batch)


def final_parameters(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_each_family_and_logs_vppo_metrics(tmp_path, family):
    trainer = make_trainer(tmp_path, family=family, skip_zero_advantage=False)
    before = final_parameters(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for name in (
        "vppo/token_fraction",
        "vppo/dependency_mean",
        "vppo/dependency_selected_mean",
        "vppo/dependency_rejected_mean",
        "vppo/trajectory_dependency_mean",
        "vppo/advantage_scale_min",
        "vppo/advantage_scale_mean",
        "vppo/advantage_scale_max",
        "vppo/beta_max",
        "vppo/skipped_fraction",
    ):
        assert name in logs[0], name
    # ceil(0.4 n) of n <= 6 tokens: between 0.4 and 2/3 of the tokens are kept.
    assert 0.4 <= logs[0]["vppo/token_fraction"] <= 2 / 3
    assert logs[0]["vppo/dependency_selected_mean"] >= logs[0]["vppo/dependency_rejected_mean"]
    assert logs[0]["vppo/advantage_scale_mean"] == pytest.approx(1.0, abs=1e-5)
    after = final_parameters(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before if "visual" in n)  # the vision tower trains


def train_grpo_and_vppo(tmp_path, **settings) -> tuple[GRPOTrainer, VPPOTrainer]:
    """GRPOTrainer and VPPOTrainer (with `settings`) trained from the same model, data and sampling draws."""
    dataset = make_colour_dataset(32, seed=1)
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, seed=3)
    grpo = GRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=length_reward,
        args=grpo_args(tmp_path / "grpo"),
        train_dataset=dataset,
        processing_class=processor,
    )
    vppo = VPPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=length_reward,
        args=vppo_args(tmp_path / "vppo", **settings),
        train_dataset=dataset,
        processing_class=processor,
    )
    for trainer in (grpo, vppo):
        set_seed(7)  # same sampling draws for both runs
        trainer.train()
    for name, value in final_parameters(grpo).items():
        torch.testing.assert_close(final_parameters(vppo)[name], value, rtol=0, atol=0, msg=name)
    return grpo, vppo


def test_equivalent_to_grpo_with_everything_off(tmp_path):
    grpo, vppo = train_grpo_and_vppo(
        tmp_path, token_filter_ratio=1.0, advantage_shaping=False, entropy_penalty_coef=0.0
    )
    for grpo_log, vppo_log in zip(grpo.state.log_history, vppo.state.log_history, strict=True):
        for key, value in grpo_log.items():
            if key not in TIMING_KEYS:
                assert vppo_log[key] == value, key
        assert any(key.startswith("vppo/") for key in vppo_log) or "train_runtime" in vppo_log


def test_closed_cold_start_guard_trains_exactly_like_grpo(tmp_path):
    # TGF at 0.4 and TAS with the dynamic range, but a guard that no dependency opens (they are clamped at 10).
    _, vppo = train_grpo_and_vppo(
        tmp_path, cold_start_guard=True, cold_start_guard_floor=10.0, cold_start_guard_full=20.0
    )
    logs = [entry for entry in vppo.state.log_history if "loss" in entry]
    assert [entry["vppo/guard_openness"] for entry in logs] == [0.0, 0.0]
    assert [entry["vppo/guard_filter_ratio"] for entry in logs] == [1.0, 1.0]
    assert all(entry["vppo/advantage_scale_max"] == 1.0 for entry in logs)


def shaped_advantages(trainer: VPPOTrainer, batch: dict, dependency: torch.Tensor) -> torch.Tensor:
    """TGF and TAS applied to a copy of `batch` with the given dependencies (every completion measured)."""
    inputs = copy.deepcopy(batch)
    rows = (batch["advantages"] != 0) & (trainer_module.loss_mask(batch).sum(-1) > 0)
    trainer._shape_advantages(inputs, dependency, measured=rows, shapeable=rows, with_image=rows)
    return inputs["advantages"]


def test_cold_start_guard_on_synthetic_dependencies(tmp_path):
    dataset = make_colour_dataset(8, seed=2)
    trainer = make_trainer(tmp_path, dataset=dataset, cold_start_guard=True)
    batch = generation_batch(trainer, dataset, prompts=2)
    mask = trainer_module.loss_mask(batch)
    assert (batch["advantages"] != 0).any()
    noise = 1e-3 * torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) * mask
    # Noise only: the guard closes and the advantages are GRPO's, on every token.
    closed = shaped_advantages(trainer, batch, noise)
    torch.testing.assert_close(closed, batch["advantages"].unsqueeze(-1) * mask, rtol=0, atol=0)
    assert trainer._metrics["train"]["vppo/guard_openness"][-1] == 0.0
    # A clear perceptual token in every completion: the guard opens. Without the sign balance VPPO's weighting is left
    # as it is; with it, TGF keeps VPPO's tokens and each side of the advantage's sign keeps VPPO's scales up to one
    # factor, which gives that side GRPO's total credit.
    perceptual = noise.clone()
    perceptual[torch.arange(len(mask)), mask.argmax(-1)] = 2.0
    opened = shaped_advantages(trainer, batch, perceptual)
    assert trainer._metrics["train"]["vppo/guard_openness"][-1] == 1.0
    trainer.args.cold_start_guard_balance = False
    unbalanced = shaped_advantages(trainer, batch, perceptual)
    trainer.args.cold_start_guard = False
    vppo = shaped_advantages(trainer, batch, perceptual)
    torch.testing.assert_close(unbalanced, vppo, rtol=0, atol=0)
    assert torch.equal(opened != 0, vppo != 0)
    advantages = batch["advantages"]
    kept = (vppo != 0).sum(-1).clamp(min=1)
    balanced_scales = opened.sum(-1) / kept / advantages.where(advantages != 0, 1.0)
    vppo_scales = vppo.sum(-1) / kept / advantages.where(advantages != 0, 1.0)
    for side in (advantages > 0, advantages < 0):
        assert side.sum() >= 2
        weights = advantages[side].abs()
        assert (balanced_scales[side] * weights).sum().item() == pytest.approx(weights.sum().item(), rel=1e-5)
        factors = balanced_scales[side] / vppo_scales[side]
        torch.testing.assert_close(factors, factors[:1].expand_as(factors))
    assert not torch.equal(vppo_scales, torch.ones_like(vppo_scales))  # TAS did shape
    assert not torch.equal(opened, closed)


def test_advantage_scale_max_cap_bounds_the_dynamic_beta_max(tmp_path):
    dataset = make_colour_dataset(8, seed=2)
    trainer = make_trainer(tmp_path, dataset=dataset, advantage_scale_max_cap=1.5)
    batch = generation_batch(trainer, dataset, prompts=2)
    mask = trainer_module.loss_mask(batch)
    rows = (batch["advantages"] != 0) & (mask.sum(-1) > 0)
    outlier = torch.full(mask.shape, 1e-3) * mask
    outlier[rows.nonzero()[0]] = 0.5 * mask[rows.nonzero()[0]]  # one completion far above the others
    shaped_advantages(trainer, batch, outlier)
    assert trainer._metrics["train"]["vppo/beta_max"][-1] == pytest.approx(1.5)
    trainer.args.advantage_scale_max_cap = None  # unbounded: about 0.9 + 0.1 n for n completions
    shaped_advantages(trainer, batch, outlier)
    assert trainer._metrics["train"]["vppo/beta_max"][-1] == pytest.approx(0.9 + 0.1 * int(rows.sum()), rel=1e-4)


def test_loss_and_gradients_equal_grpo_on_the_same_batch(tmp_path):
    dataset = make_colour_dataset(8, seed=2)
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, seed=4)
    grpo = GRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=length_reward,
        args=grpo_args(tmp_path / "grpo"),
        train_dataset=dataset,
        processing_class=processor,
    )
    vppo = VPPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=length_reward,
        args=vppo_args(tmp_path / "vppo", token_filter_ratio=1.0, advantage_shaping=False),
        train_dataset=dataset,
        processing_class=processor,
    )
    batch = generation_batch(grpo, dataset, prompts=2)
    vppo_batch = copy.deepcopy(batch)
    vppo.current_gradient_accumulation_steps = 1
    vppo.model.train()
    vppo._apply_visual_dependency(vppo_batch)
    losses = []
    for trainer, inputs in ((grpo, batch), (vppo, vppo_batch)):
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(
            (loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        )
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=0, atol=0)
    assert losses[0][1].keys() == losses[1][1].keys()
    for name, grad in losses[0][1].items():
        torch.testing.assert_close(losses[1][1][name], grad, rtol=0, atol=0, msg=name)


def test_gradient_flows_only_through_selected_tokens(tmp_path, monkeypatch):
    dataset = make_colour_dataset(8, seed=2)
    trainer = make_trainer(tmp_path, dataset=dataset, advantage_shaping=False, skip_zero_advantage=False)
    recorded = {}
    original_mask = shaping_module.top_dependency_mask

    def recording_mask(dependency, mask, ratio):
        recorded["dependency"], recorded["mask"] = dependency, mask
        recorded["kept"] = original_mask(dependency, mask, ratio)
        return recorded["kept"]

    monkeypatch.setattr(shaping_module, "top_dependency_mask", recording_mask)
    batch = generation_batch(trainer, dataset, prompts=2)
    advantages = batch["advantages"].clone()
    trainer._apply_visual_dependency(batch)

    captured = {}
    original_logps = GRPOTrainer._get_per_token_logps_and_entropies

    def capture(self, *args, **kwargs):
        logps, entropies, aux = original_logps(self, *args, **kwargs)
        if logps.requires_grad:
            logps.retain_grad()
            captured["logps"] = logps
        return logps, entropies, aux

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", capture)
    trainer._compute_loss(trainer.model, batch).backward()
    token_grad = captured["logps"].grad
    kept = recorded["kept"]
    rows = advantages != 0
    assert rows.any()
    assert torch.equal(token_grad[rows] != 0, kept[rows])
    assert (token_grad[~rows] == 0).all()
    valid = recorded["mask"].sum(-1)
    assert kept.sum(-1).tolist() == [-(-int(n) * 2 // 5) for n in valid]  # ceil(0.4 n), exactly
    # The kept tokens are the most image-dependent ones of each completion.
    dependency = recorded["dependency"]
    for row in range(dependency.size(0)):
        if kept[row].any() and (~kept[row] & recorded["mask"][row].bool()).any():
            assert dependency[row][kept[row]].min() >= dependency[row][~kept[row] & recorded["mask"][row].bool()].max()


def test_skip_zero_advantage_gives_identical_results(tmp_path):
    dataset = make_colour_dataset(16, seed=5)
    trainers = {
        skip: make_trainer(tmp_path / str(skip), dataset=dataset, reward=half_uniform_reward, skip_zero_advantage=skip)
        for skip in (True, False)
    }
    for trainer in trainers.values():  # identical weights
        trainer.model.load_state_dict(trainers[True].model.state_dict())
    batch = generation_batch(trainers[True], dataset, prompts=4)
    assert (batch["advantages"] == 0).any() and (batch["advantages"] != 0).any()
    results = {}
    for skip, trainer in trainers.items():
        inputs = copy.deepcopy(batch)
        trainer.current_gradient_accumulation_steps = 1
        apply_vppo(trainer, inputs)
        results[skip] = (inputs["advantages"], trainer._compute_loss(trainer.model, inputs).detach())
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=0)
    assert trainers[True]._metrics["train"]["vppo/skipped_fraction"][-1] > 0
    assert trainers[False]._metrics["train"]["vppo/skipped_fraction"][-1] == 0


@pytest.mark.parametrize("space", ["original_image", "pixel_values"])
def test_perturbation_space(tmp_path, space):
    """By default the images are perturbed as the data delivered them, then processed like the originals."""
    dataset = make_colour_dataset(8, seed=2)
    trainer = make_trainer(tmp_path, dataset=dataset, perturbation_space=space, max_steps=1)
    batch = generation_batch(trainer, dataset, prompts=2)
    # One draw per image, seeded by the trainer seed, the round, the process, the completion and the image's rank.
    seeds = passes_module.perturbation_seeds(
        trainer.args.seed, trainer.shared.perturbation_round, 0, range(8), [1] * 8
    )
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    if space == "original_image":
        images = [image for row in batch[passes_module.IMAGES_KEY] for image in row]
        assert len(images) == sum(batch["num_images"]) == 8
        # The carried images are the batch's images: processing them again gives its pixel_values.
        reprocessed = trainer.processing_class.image_processor(images=images, return_tensors="pt")
        torch.testing.assert_close(reprocessed["pixel_values"], batch["pixel_values"])
        expected = perturb_original_images(
            images, trainer.processing_class.image_processor, "patch_blackening", generators
        )["pixel_values"]
    else:
        assert passes_module.IMAGES_KEY not in batch
        expected = perturb_pixel_values(
            batch["pixel_values"], trainer.shared.pixel_layout, "patch_blackening", generators,
            image_grid_thw=batch["image_grid_thw"], patch_size=14,
        )  # fmt: skip
    perturbed = trainer._perturbed_pixel_values(batch)
    assert perturbed.shape == batch["pixel_values"].shape and perturbed.dtype == batch["pixel_values"].dtype
    torch.testing.assert_close(perturbed, expected, rtol=0, atol=0)
    trainer.train()
    assert trainer.state.log_history[0]["vppo/dependency_mean"] > 0


def test_same_seed_same_perturbations(tmp_path):
    dataset = make_colour_dataset(8, seed=2)
    first = make_trainer(tmp_path / "a", dataset=dataset, skip_zero_advantage=False)
    second = make_trainer(tmp_path / "b", dataset=dataset, skip_zero_advantage=False)
    batch = generation_batch(first, dataset, prompts=2)
    outputs = []
    for trainer in (first, second):
        inputs = copy.deepcopy(batch)
        apply_vppo(trainer, inputs)
        outputs.append(inputs["advantages"])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_one_perturbed_pass_per_generation_batch_reusing_old_logps(tmp_path, monkeypatch):
    passes = []
    original = VPPOTrainer._sampled_token_logps
    monkeypatch.setattr(
        VPPOTrainer, "_sampled_token_logps", lambda self, *a, **k: passes.append(1) or original(self, *a, **k)
    )
    trainer = make_trainer(
        tmp_path,
        num_iterations=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        skip_zero_advantage=False,
    )
    trainer.train()
    # 2 optimiser steps x 2 micro-batches = 4 micro-steps = one generation batch reused twice: one perturbed pass,
    # and TRL's old log-probs stand in for the original-image pass.
    assert trainer.state.global_step == 2
    assert len(passes) == 1


def test_on_policy_reads_original_logps_from_the_loss_forward(tmp_path, monkeypatch):
    passes = []
    original = VPPOTrainer._sampled_token_logps
    monkeypatch.setattr(
        VPPOTrainer, "_sampled_token_logps", lambda self, *a, **k: passes.append(1) or original(self, *a, **k)
    )
    trainer = make_trainer(tmp_path, skip_zero_advantage=False, max_steps=3)
    trainer.train()
    assert len(passes) == 3  # one perturbed pass per step, no original-image pass
    assert "vppo/token_fraction" in trainer.state.log_history[0]


def test_deferred_and_eager_shaping_agree(tmp_path, monkeypatch):
    dataset = make_colour_dataset(8, seed=2)
    trainer = make_trainer(tmp_path, dataset=dataset, skip_zero_advantage=False)
    batch = generation_batch(trainer, dataset, prompts=2)
    deferred, eager = copy.deepcopy(batch), copy.deepcopy(batch)
    trainer.shared.perturbation_round = 0
    apply_vppo(trainer, deferred)
    monkeypatch.setattr(VPPOTrainer, "_defers_original_logps", lambda self, batch: False)
    trainer.shared.perturbation_round = 0
    trainer._apply_visual_dependency(eager)
    assert trainer_module.DEFERRED_KEY not in eager
    torch.testing.assert_close(deferred["advantages"], eager["advantages"])
    losses = [trainer._compute_loss(trainer.model, inputs).detach() for inputs in (deferred, eager)]
    torch.testing.assert_close(losses[0], losses[1])


@pytest.mark.parametrize("criterion", ["dependency", "random", "entropy"])
def test_token_filter_criteria_keep_exactly_ceil_ratio_n_tokens(tmp_path, criterion):
    dataset = make_colour_dataset(8, seed=2)
    trainer = make_trainer(
        tmp_path, dataset=dataset, advantage_shaping=False, skip_zero_advantage=False, token_filter_criterion=criterion
    )
    batch = generation_batch(trainer, dataset, prompts=2)
    advantages = batch["advantages"].clone()
    apply_vppo(trainer, batch)
    rows = advantages != 0
    assert rows.any()
    kept = batch["advantages"] != 0  # no TAS: a kept token carries the completion's advantage, a dropped one 0
    valid = trainer_module.loss_mask(batch).bool()
    assert not (kept & ~valid).any()
    assert kept[rows].sum(-1).tolist() == [-(-int(n) * 2 // 5) for n in valid[rows].sum(-1)]  # ceil(0.4 n)
    if criterion == "entropy":
        # The kept tokens are those where the policy, given the original image, is least certain.
        inputs = model_inputs(batch)
        with torch.no_grad():
            _, entropies, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model,
                inputs.pop("input_ids"),
                inputs.pop("attention_mask"),
                valid.size(1),
                compute_entropy=True,
                **inputs,
            )
        for row in rows.nonzero().squeeze(-1).tolist():
            dropped = valid[row] & ~kept[row]
            if dropped.any():
                assert entropies[row][kept[row]].min() >= entropies[row][dropped].max() - 1e-5


def test_random_criterion_is_seeded_and_ignores_skipping(tmp_path):
    dataset = make_colour_dataset(16, seed=5)
    settings = dict(dataset=dataset, reward=half_uniform_reward, token_filter_criterion="random")
    trainers = [
        make_trainer(tmp_path / "a", skip_zero_advantage=True, **settings),
        make_trainer(tmp_path / "b", skip_zero_advantage=False, **settings),
        make_trainer(tmp_path / "c", skip_zero_advantage=False, **settings, seed=8),
    ]
    for trainer in trainers[1:]:
        trainer.model.load_state_dict(trainers[0].model.state_dict())
    batch = generation_batch(trainers[0], dataset, prompts=4)
    outputs = []
    for trainer in trainers:
        inputs = copy.deepcopy(batch)
        apply_vppo(trainer, inputs)
        outputs.append(inputs["advantages"])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.equal(outputs[1] != 0, outputs[2] != 0)  # another seed, another draw


def test_entropy_criterion_from_the_loss_forward_and_from_an_extra_pass_agree(tmp_path, monkeypatch):
    dataset = make_colour_dataset(8, seed=2)
    trainer = make_trainer(tmp_path, dataset=dataset, skip_zero_advantage=False, token_filter_criterion="entropy")
    batch = generation_batch(trainer, dataset, prompts=2)
    deferred, eager = copy.deepcopy(batch), copy.deepcopy(batch)
    trainer.shared.perturbation_round = 0
    apply_vppo(trainer, deferred)
    monkeypatch.setattr(VPPOTrainer, "_defers_original_logps", lambda self, batch: False)
    trainer.shared.perturbation_round = 0
    trainer._apply_visual_dependency(eager)
    torch.testing.assert_close(deferred["advantages"], eager["advantages"])


def test_old_logps_entropies_are_those_of_the_forward_that_gave_trls_old_logps():
    """Recognised by its result, whatever the order of the round's forwards (a reference pass with the same model,
    under PEFT, comes after TRL's old-log-prob pass today; it could come before)."""
    reference, old = (torch.randn(2, 3), torch.rand(2, 3)), (torch.randn(2, 3), torch.rand(2, 3))
    old_logps = old[0].clone()  # equal values, another tensor
    assert passes_module.old_logps_entropies([reference, old], old_logps) is old[1]
    assert passes_module.old_logps_entropies([old, reference], old[0]) is old[1]
    with pytest.raises(RuntimeError, match=rf"installed trl {re.escape(trl.__version__)}"):
        passes_module.old_logps_entropies([reference], old_logps)


@pytest.mark.parametrize(
    ("criterion", "route"),
    [("random", {}), ("entropy", {}), ("entropy", {"num_iterations": 2, "per_device_train_batch_size": 4})],
    ids=["random", "entropy-loss-forward", "entropy-old-logps"],
)
def test_ablation_criteria_train(tmp_path, criterion, route):
    trainer = make_trainer(tmp_path, token_filter_criterion=criterion, skip_zero_advantage=False, **route)
    before = final_parameters(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    assert 0.4 <= logs[0]["vppo/token_fraction"] <= 2 / 3  # ceil(0.4 n) of n <= 6 tokens
    after = final_parameters(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_part_open_guard_keeps_its_share_of_long_completions(tmp_path):
    """8,192-token completions under a half-open guard: TGF keeps ceil(0.70309 n) tokens of each, and logs that."""
    trainer = make_trainer(tmp_path, cold_start_guard=True)
    mask = torch.ones(4, 8192, dtype=torch.long)
    mask[2:, 6000:] = 0
    dependency = torch.full(mask.shape, 0.0625) * mask  # the kept tokens' mean dependency: 0.0625 nats
    batch = {"completion_mask": mask, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])}
    rows = torch.ones(4, dtype=torch.bool)
    trainer._shape_advantages(batch, dependency, measured=rows, shapeable=rows, with_image=rows)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert metrics["vppo/guard_openness"] == pytest.approx(math.log(3.125) / math.log(10))
    assert metrics["vppo/guard_filter_ratio"] == 1 - metrics["vppo/guard_openness"] * 0.6  # 0.7030899869919436
    ratio = Fraction(repr(metrics["vppo/guard_filter_ratio"]))
    expected = [math.ceil(ratio * n) for n in mask.sum(-1).tolist()]
    assert (batch["advantages"] != 0).sum(-1).tolist() == expected == [5760, 5760, 4219, 4219]
    assert metrics["vppo/token_fraction"] == pytest.approx(sum(expected) / mask.sum().item())


def test_config_refuses_settings_whose_shaping_divides_zero_by_zero():
    """With beta_min 0 the lowest-dependency completion gets scale 0; alone on its side, the balance divides 0 by 0."""
    with pytest.raises(ValueError, match=r"advantage_scale_min=0.0 must be > 0 with cold_start_guard and cold_start_"):
        VPPOConfig(output_dir="unused", use_cpu=True, advantage_scale_min=0.0, cold_start_guard=True)
    with pytest.raises(ValueError, match=r"advantage_scale_max=0.0 must be > 0"):
        VPPOConfig(output_dir="unused", use_cpu=True, advantage_scale_min=0.0, advantage_scale_max=0.0)


def test_entropy_criterion_when_no_process_measures_anything(tmp_path):
    """Under ZeRO-3 or FSDP with several processes every process runs the same passes; a batch whose advantages are
    all 0 (on every process) runs none, and the `entropy` criterion must still shape it (here one process plays it)."""
    trainer = make_trainer(
        tmp_path, reward=constant_reward, token_filter_criterion="entropy", num_iterations=2, max_steps=1
    )
    trainer.shared.forward_passes_must_match = True
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("extra", ["other_tokens", "no_gradient"])
def test_a_forward_before_the_losss_own_stops_training_naming_trl(tmp_path, monkeypatch, extra):
    """The deferred TGF and TAS and the entropy penalty read the loss forward's log-probs: if GRPOTrainer's loss ever
    runs another forward first, training stops and says which trl and what changed, rather than read the wrong one."""
    trainer = make_trainer(tmp_path, max_steps=1, entropy_penalty_coef=0.1)
    original = GRPOTrainer._compute_loss

    def with_an_extra_forward_first(self, model, inputs):
        forward = model_inputs(inputs)
        if extra == "other_tokens":  # e.g. a draft or reference pass on other completions
            forward["input_ids"] = torch.cat([inputs["prompt_ids"], inputs["completion_ids"].flip(-1)], dim=1)
        with torch.set_grad_enabled(extra != "no_gradient"):  # e.g. an old-log-prob pass moved into the loss
            self._get_per_token_logps_and_entropies(
                model, forward.pop("input_ids"), forward.pop("attention_mask"), inputs["completion_ids"].size(1),
                **forward,
            )  # fmt: skip
        return original(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", with_an_extra_forward_first)
    problem = "on other tokens" if extra == "other_tokens" else "with gradient off"
    with pytest.raises(RuntimeError, match=rf"of the installed trl {re.escape(trl.__version__)} .* {problem}"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_kl_estimator_trains_and_is_chunk_invariant(tmp_path, monkeypatch):
    dataset = make_colour_dataset(8, seed=2)
    trainer = make_trainer(
        tmp_path, family="qwen3_vl", dataset=dataset, dependency_estimator="kl", skip_zero_advantage=False
    )
    batch = generation_batch(trainer, dataset, prompts=2)
    mask = batch["completion_mask"]
    rows = list(range(mask.size(0)))
    perturbed = {**batch, "pixel_values": trainer._perturbed_pixel_values(batch)}
    with torch.no_grad():
        whole, _ = trainer._kl_dependency(batch, perturbed, rows, mask, mask.size(1))
        vocabulary = trainer.model.get_output_embeddings().weight.size(0)
        monkeypatch.setattr(passes_module, "KL_LOGITS_PER_CHUNK", 2 * vocabulary * 8)  # 2 positions at a time
        chunked, _ = trainer._kl_dependency(batch, perturbed, rows, mask, mask.size(1))
    torch.testing.assert_close(chunked, whole)
    assert (whole >= 0).all() and (whole[mask == 0] == 0).all() and (whole > 0).any()
    trainer.train()
    assert "vppo/dependency_mean" in trainer.state.log_history[0]


def test_entropy_penalty_changes_loss_by_its_value(tmp_path):
    dataset = make_colour_dataset(8, seed=2)
    trainer = make_trainer(tmp_path, dataset=dataset, entropy_penalty_coef=0.5)
    batch = generation_batch(trainer, dataset, prompts=2)
    trainer._apply_visual_dependency(batch)
    with_penalty = trainer._compute_loss(trainer.model, batch).detach()
    trainer.args.entropy_penalty_coef = 0.0
    without = trainer._compute_loss(trainer.model, batch).detach()
    penalty = trainer._metrics["train"]["vppo/entropy_penalty"][-1]
    assert penalty > 0
    assert (with_penalty - without).item() == pytest.approx(0.5 * penalty, rel=1e-5)


def constant_reward(completions, **kwargs) -> list[float]:
    return [1.0] * len(completions)


def test_entropy_penalty_gradient_is_the_token_mean_across_gradient_accumulation(tmp_path):
    """dapo, 2 accumulation steps: the penalty's gradient is that of -mean(log p) over all tokens of the generation
    batch (official: a token mean over the mini-batch), not the mean of the micro-batches' means."""
    captured = {"micro_batch_tokens": []}
    trainer = make_trainer(
        tmp_path,
        reward=constant_reward,  # zero advantages: the policy loss has no gradient, the penalty is all of it
        loss_type="dapo",
        entropy_penalty_coef=1.0,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        max_steps=1,
        max_grad_norm=0.0,
        max_completion_length=8,
        bf16=False,  # the reference gradient below is computed in float32
    )
    generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss

    def record_batch(inputs):
        captured["batch"] = copy.deepcopy(generate(inputs))
        return copy.deepcopy(captured["batch"])

    def record_tokens(model, inputs):
        captured["micro_batch_tokens"].append(int(inputs["completion_mask"].sum()))
        return compute_loss(model, inputs)

    class GradientCallback(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    trainer._generate_and_score_completions, trainer._compute_loss = record_batch, record_tokens
    trainer.add_callback(GradientCallback())
    initial_weights = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    trainer.model.load_state_dict(initial_weights)  # the gradient was taken at these weights
    tokens = captured["micro_batch_tokens"]
    assert len(tokens) == 2 and tokens[0] != tokens[1]  # unequal micro-batches: the two weightings differ

    batch = captured["batch"]
    mask = batch["completion_mask"]
    trainer.model.zero_grad()
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model,
        torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
        torch.cat([batch["prompt_mask"], mask], dim=1),
        mask.size(1),
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        num_images=batch["num_images"],
        mm_token_type_ids=batch["mm_token_type_ids"],
    )
    (-(logps * mask).sum() / mask.sum()).backward()
    assert captured["grads"]
    for name, grad in captured["grads"].items():
        torch.testing.assert_close(grad, dict(trainer.model.named_parameters())[name].grad, msg=name)


@pytest.mark.parametrize("estimator", ["k3", "kl"])
def test_lora(tmp_path, estimator):
    from peft import LoraConfig

    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=vppo_args(tmp_path, dependency_estimator=estimator, skip_zero_advantage=False),
        train_dataset=make_colour_dataset(16, seed=1),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert "vppo/dependency_mean" in trainer.state.log_history[0]


@pytest.mark.parametrize("overrides", [{}, {"num_iterations": 2}], ids=["on_policy", "old_logps"])
def test_dropout_is_not_visual_dependency(tmp_path, overrides):
    """Both passes are scored in eval mode: with LoRA dropout, an unperturbed image has dependency exactly 0."""
    from peft import LoraConfig

    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    assert not has_dropout(model)
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=vppo_args(tmp_path, perturbation_prob=0.0, skip_zero_advantage=False, **overrides),
        train_dataset=make_colour_dataset(16, seed=1),
        processing_class=processor,
        # Random LoRA B (not zeros), so that the adapters, and their dropout, act from the first step.
        peft_config=LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    assert has_dropout(trainer.model)
    trainer.train()
    dependencies = [log["vppo/dependency_mean"] for log in trainer.state.log_history if "vppo/dependency_mean" in log]
    assert dependencies and all(value == 0.0 for value in dependencies)
    assert trainer.model.training  # the train/eval mode is given back


def test_save_and_reload(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## VPPO" in card and "2510.09285" in card and "patch_blackening" in card
    reloaded = AutoModelForImageTextToText.from_pretrained(checkpoint)
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, msg=name)
    # Resuming is tested against uninterrupted runs, weight for weight, in test_reliability_resume.py.


def test_mixed_text_and_image_samples_several_images_and_sizes(tmp_path):
    rng = random.Random(0)
    tokenizer = build_tokenizer(COLOURS)
    processor = build_processor("qwen2_5_vl", tokenizer, image_size=112)
    model = build_model("qwen2_5_vl", tokenizer)

    def image_prompt(count):
        return [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": COLOUR_QUESTION}]}]

    rows = []
    for _ in range(3):
        rows.append({"prompt": image_prompt(1), "images": [make_shape_image("red", rng, size=56)]})
        rows.append(
            {
                "prompt": image_prompt(2),
                "images": [make_shape_image("blue", rng, size=112), make_shape_image("green", rng, size=56)],
            }
        )
        rows.append(
            {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}], "images": []}
        )
    dataset = Dataset.from_list(rows)
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=vppo_args(
            tmp_path,
            per_device_train_batch_size=6,
            num_generations=2,
            skip_zero_advantage=False,
            shuffle_dataset=False,
        ),
        train_dataset=dataset,
        processing_class=processor,
    )
    batch = generation_batch(trainer, dataset, prompts=3)
    assert batch["num_images"] == [1, 1, 2, 2, 0, 0]
    assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 2  # two image sizes
    advantages = batch["advantages"].clone()
    apply_vppo(trainer, batch)
    text_only = slice(4, 6)
    mask = batch["completion_mask"][text_only].bool()
    # Text-only samples are plain GRPO samples: every token kept, scale 1.
    torch.testing.assert_close(
        batch["advantages"][text_only][mask], advantages[text_only].unsqueeze(-1).expand_as(mask)[mask]
    )
    trainer.train()
    assert trainer.state.global_step == 2


def test_config_rejects_bad_values():
    cases = {
        "token_filter_ratio": (0.0, "token_filter_ratio"),
        "perturbation": ("pixelate", "perturbation"),
        "dependency_estimator": ("exact", "dependency_estimator"),
        "entropy_penalty_coef": (-0.1, "entropy_penalty_coef"),
        "perturbation_prob": (1.5, "perturbation_prob"),
        "perturbation_patch_size": (0, "perturbation_patch_size"),
        "perturbation_space": ("patches", "perturbation_space=.patches. is not supported"),
        "token_filter_criterion": ("attention", "token_filter_criterion"),
    }
    for field, (value, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            VPPOConfig(output_dir="unused", **{field: value})
    with pytest.raises(ValueError, match="advantage_scale_max"):
        VPPOConfig(output_dir="unused", advantage_scale_min=0.9, advantage_scale_max=0.8)
    with pytest.raises(ValueError, match="advantage_scale_min"):
        VPPOConfig(output_dir="unused", advantage_scale_min=1.2)
    with pytest.raises(ValueError, match="advantage_scale_max_cap=2.0 bounds the dynamic range only"):
        VPPOConfig(output_dir="unused", advantage_scale_max=1.1, advantage_scale_max_cap=2.0)
    with pytest.raises(ValueError, match="advantage_scale_max_cap=0.5 must be >= 1"):
        VPPOConfig(output_dir="unused", advantage_scale_max_cap=0.5)
    with pytest.raises(ValueError, match="cold_start_guard_floor=0.1 and cold_start_guard_full=0.01"):
        VPPOConfig(output_dir="unused", cold_start_guard_floor=0.1, cold_start_guard_full=0.01)


def test_rejects_a_model_without_vision_tower(tmp_path):
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(ValueError, match="vision tower"):
        VPPOTrainer(
            model=Qwen2ForCausalLM(config),
            reward_funcs=length_reward,
            args=vppo_args(tmp_path),
            train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * 8),
            processing_class=tokenizer,
        )


def test_rejects_grpo_config(tmp_path):
    model, processor = build_tiny_vlm("qwen2_5_vl")
    with pytest.raises(TypeError, match="VPPOConfig"):
        VPPOTrainer(
            model=model,
            reward_funcs=length_reward,
            args=grpo_args(tmp_path),
            processing_class=processor,
            train_dataset=make_colour_dataset(8),
        )


def test_warns_once_for_data_without_images(tmp_path):
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "Name a colour."}]}] * 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, dataset=dataset)
        trainer.train()
    messages = [str(w.message) for w in caught if "no images" in str(w.message)]
    assert len(messages) == 1
    assert trainer.state.global_step == 2


def test_a_text_only_batch_from_data_with_images_is_not_called_data_without_images(tmp_path):
    """A process whose generation batch holds only text prompts (a mixed dataset's share, or a text-only rank) trains
    on data that has images: no warning that the data has none."""
    images = make_colour_dataset(4, seed=3)
    text = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    dataset = Dataset.from_list([{"prompt": text, "images": [], "answer": "red"}] * 8 + [dict(row) for row in images])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, dataset=dataset, max_steps=1, shuffle_dataset=False)
        trainer.train()
    assert [str(w.message) for w in caught if "no images" in str(w.message)] == []
    assert trainer.state.global_step == 1
