"""The CPU demo runs end to end and writes its table, log, summary and plot.

Learning itself is shown by the full demo (`python -m vppo_trl.demo`, a few minutes); here a few steps check the
pipeline only, with no timing or learning assertions.
"""

import csv
import json

import torch
from PIL import Image

from vppo_trl import demo
from vppo_trl.testing import COLOURS, build_tiny_vlm, suppressed_token_ids


def test_quick_demo_writes_table_log_summary_and_plot(tmp_path, capsys):
    summary = demo.main(["--quick", "--output-dir", str(tmp_path)])

    printed = capsys.readouterr().out
    assert "step  reward" in printed
    assert "Verdict: quick run" in printed
    assert str(tmp_path / "vppo_demo.png") in printed

    with (tmp_path / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(row["step"])) for row in rows] == [1, 2, 3]
    for key in ("reward", "vppo/advantage_scale_max", "vppo/skipped_fraction"):
        assert key in rows[0]

    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["steps"] == 3
    assert 0.0 <= summary["start_reward"] <= 1.0 and 0.0 <= summary["end_reward"] <= 1.0

    with Image.open(tmp_path / "vppo_demo.png") as image:
        assert image.format == "PNG"
        image.verify()

    # The learning rate logged is the one the banner prints (the vision tower's 5x is its own parameter group)
    assert {float(row["learning_rate"]) for row in rows} == {summary["learning_rate"]}
    assert "ceil(0.4 x 2) = 1, so about 0.5" in printed

    # The trained model is saved, and its spotlight on a held-out image written
    assert summary["model"] == str(tmp_path / "trainer")
    assert (tmp_path / "trainer" / "model.safetensors").is_file()
    assert summary["spotlight"] == str(tmp_path / "spotlight" / "perception.html")
    assert "Spotlight on a held-out" in printed
    page = (tmp_path / "spotlight" / "perception.html").read_text()
    assert page.count('class="completion"') == demo.SPOTLIGHT_COMPLETIONS and "reward <b>" in page
    with Image.open(tmp_path / "spotlight" / "perception.png") as image:
        assert image.width > 800


def test_the_saved_model_can_be_spotlighted_from_the_command_line(tmp_path, capsys):
    from vppo_trl.cli import main

    demo.main(["--quick", "--output-dir", str(tmp_path / "demo")])
    image = demo.make_colour_dataset(1, seed=7)[0]["images"][0]
    image.save(tmp_path / "shape.png")
    main(["spotlight", "--model", str(tmp_path / "demo" / "trainer"), "--image", str(tmp_path / "shape.png"),
          "--prompt", demo.COLOUR_QUESTION, "--num-completions", "3", "--max-new-tokens", "4", "--device", "cpu",
          "--draws", "1", "--output-dir", str(tmp_path / "spot")])  # fmt: skip
    assert "Wrote" in capsys.readouterr().out
    page = (tmp_path / "spot" / "perception.html").read_text()
    assert page.count('class="completion"') == 3
    assert "<|image_pad|>" not in page.split("<h2>The")[1]  # suppress_tokens, saved with the model


def test_compare_grpo_draws_both_reward_curves(tmp_path, capsys):
    summary = demo.main(["--quick", "--compare", "grpo", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "GRPO: 3 steps" in printed and "GRPO: mean reward" in printed
    with (tmp_path / "grpo_log.csv").open() as handle:
        grpo_rows = list(csv.DictReader(handle))
    assert [int(float(row["step"])) for row in grpo_rows] == [1, 2, 3]
    assert not any(key.startswith("vppo/") for key in grpo_rows[0])  # trained by TRL's GRPOTrainer
    assert 0.0 <= summary["grpo_end_reward"] <= 1.0 and 0.0 <= summary["grpo_greedy_accuracy_after"] <= 1.0
    with Image.open(tmp_path / "vppo_vs_grpo.png") as image:
        assert image.format == "PNG"
        image.verify()


def test_masked_tokens_get_zero_probability_and_stay_frozen():
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    masked = suppressed_token_ids(processor)
    demo.mask_tokens(model, masked)

    bias = model.get_output_embeddings().bias
    assert not bias.requires_grad
    assert bias[masked].eq(demo.MASKED_LOGIT_BIAS).all()
    input_ids = processor.tokenizer("What colour is the shape?", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = model(input_ids=input_ids).logits.softmax(-1)
    assert probs[..., masked].max() == 0.0
    assert torch.isfinite(probs).all()
