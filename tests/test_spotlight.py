"""The token-perception tool measures what the trainer measures."""

import random

import pytest
import torch
from PIL import Image
from trl import GRPOTrainer

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.spotlight import perception_html, plot_token_perception, token_perception
from vppo_trl.testing import COLOUR_QUESTION, COLOURS, build_tiny_vlm, make_colour_dataset, make_shape_image


def length_reward(completions, **kwargs) -> list[float]:
    return [float(len(str(completion)) % 3) for completion in completions]


@pytest.mark.parametrize("estimator", ["k3", "kl"])
def test_matches_the_trainer_on_a_generated_row(tmp_path, estimator):
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    dataset = make_colour_dataset(4, seed=3)
    args = VPPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        report_to="none", use_cpu=True, bf16=False, perturbation="solid", dependency_estimator=estimator,
    )  # fmt: skip
    trainer = VPPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=dataset,
                          processing_class=processor)  # fmt: skip
    trainer.model.train()
    batch = GRPOTrainer._generate_and_score_completions(trainer, [dict(dataset[0])] * 4)
    mask = batch["completion_mask"]
    perturbed = {**batch, "pixel_values": trainer._perturbed_pixel_values(batch)}
    measure = trainer._k3_dependency if estimator == "k3" else trainer._kl_dependency
    expected = measure(batch, perturbed, [0, 1, 2, 3], mask, mask.size(1))
    for row in range(4):
        ids = batch["completion_ids"][row][mask[row].bool()].tolist()
        result = token_perception(
            trainer.model, processor, dataset[0]["prompt"], dataset[0]["images"], completion=ids,
            perturbation="solid", estimator=estimator,
        )  # fmt: skip
        # One row alone vs four padded together: float32 rounding differs. KL between two close distributions cancels
        # to an absolute error of about eps * |log p| (~1e-6 here, transformers 5.24), k3 stays within 1e-7.
        atol = 1e-7 if estimator == "k3" else 1e-6
        torch.testing.assert_close(torch.tensor(result.dependency), expected[row][: len(ids)], atol=atol, rtol=1e-3)
        assert sum(result.kept) == -(-len(ids) * 2 // 5)


def test_generates_plots_and_renders(tmp_path):
    model, processor = build_tiny_vlm("qwen3_vl", extra_words=COLOURS)
    image = make_shape_image("blue", random.Random(1))
    result = token_perception(model, processor, COLOUR_QUESTION, [image], max_new_tokens=5, draws=3, prob=0.5)
    assert len(result.tokens) == len(result.dependency) == len(result.kept) > 0
    assert all(value >= 0 for value in result.dependency)
    assert result.settings["draws"] == 3 and '"tokens"' in result.to_json()
    plot_token_perception(result, str(tmp_path / "perception.png"))
    assert Image.open(tmp_path / "perception.png").size[0] > 100
    page = perception_html(result)
    assert page.count("<span") == len(result.tokens)


def test_errors():
    model, processor = build_tiny_vlm("qwen2_5_vl")
    with pytest.raises(ValueError, match="at least one image"):
        token_perception(model, processor, "hi", [], completion="x")
    with pytest.raises(ValueError, match="estimator"):
        token_perception(model, processor, "hi", [Image.new("RGB", (56, 56))], completion="x", estimator="exact")


def test_command_line(tmp_path, capsys):
    from vppo_trl.cli import main

    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    make_shape_image("red", random.Random(2)).save(tmp_path / "shape.png")
    main(
        [
            "spotlight", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "shape.png"),
            "--prompt", COLOUR_QUESTION, "--completion", "It is red.", "--device", "cpu",
            "--output-dir", str(tmp_path / "spot"), "--draws", "2",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "Most image-dependent tokens" in printed
    for name in ("perception.png", "perception.html", "perception.json"):
        assert (tmp_path / "spot" / name).stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["spotlight", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "missing.png"),
              "--prompt", "x"])  # fmt: skip
