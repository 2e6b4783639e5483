"""SpotlightCallback writes pages during training without changing it, and logs to trackio offline."""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import COLOURS, build_tiny_vlm, make_colour_dataset


def length_reward(completions, **kwargs) -> list[float]:
    return [float(len(str(completion)) % 3) for completion in completions]


def train(tmp_path, estimator: str = "k3", **kwargs) -> tuple[VPPOTrainer, int]:
    """Four steps; returns the trainer and the number of forward passes of the model."""
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, seed=0)
    args = VPPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=4, learning_rate=1e-2, report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
        dependency_estimator=estimator, **kwargs,
    )  # fmt: skip
    trainer = VPPOTrainer(model=model, reward_funcs=length_reward, args=args,
                          train_dataset=make_colour_dataset(16, seed=3), processing_class=processor)  # fmt: skip
    forwards = []
    trainer.model.register_forward_hook(lambda *_: forwards.append(1))
    trainer.train()
    return trainer, len(forwards)


@pytest.mark.parametrize("estimator", ["k3", "kl"])  # k3 shapes in the loss's forward, kl right after generation
def test_pages_at_the_configured_steps_with_the_same_training(tmp_path, estimator):
    plain, plain_forwards = train(tmp_path / "off", estimator)
    spotted, spotted_forwards = train(tmp_path / "on", estimator, spotlight_steps=2, spotlight_completions=3)

    for (name, weight), (_, other) in zip(
        plain.model.named_parameters(), spotted.model.named_parameters(), strict=True
    ):
        assert torch.equal(weight, other), name
    assert spotted_forwards == plain_forwards  # no extra forward pass
    assert sorted(os.listdir(tmp_path / "on" / "spotlight")) == ["step-2", "step-4"]
    assert not (tmp_path / "off" / "spotlight").exists()
    for step in (2, 4):
        folder = tmp_path / "on" / "spotlight" / f"step-{step}"
        for name in ("perception.html", "perception.png", "distributions.png", "perception.json"):
            assert (folder / name).stat().st_size > 0
        saved = json.loads((folder / "perception.json").read_text())
        assert "<|image_pad|>×" in saved["prompt"] and "What colour is the shape?" in saved["prompt"]
        assert 1 <= len(saved["completions"]) <= 3
        for completion in saved["completions"]:
            assert len(completion["tokens"]) == len(completion["dependency"]) == len(completion["kept"])
            assert sum(completion["kept"]) == -(-len(completion["tokens"]) * 2 // 5)  # TGF's ceil(0.4 n)
            assert completion["advantage_scale"] > 0 and completion["advantage"] is not None
        page = (folder / "perception.html").read_text()
        assert f"Token perception at step {step}" in page and page.count("data:image/png;base64,") == 2


def test_config_refuses_bad_values(tmp_path):
    with pytest.raises(ValueError, match="spotlight_steps=-1 must be >= 0"):
        VPPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, spotlight_steps=-1)
    with pytest.raises(ValueError, match="spotlight_completions=0 must be >= 1"):
        VPPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, spotlight_completions=0)


TRACKIO_RUN = """
from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import COLOURS, build_tiny_vlm, make_colour_dataset

def length_reward(completions, **kwargs):
    return [float(len(str(completion)) % 3) for completion in completions]

model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
args = VPPOConfig(
    output_dir={output!r}, per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
    report_to="trackio", project="spotlight-test", use_cpu=True, bf16=False, save_strategy="no", spotlight_steps=2,
)
VPPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=make_colour_dataset(8, seed=3),
            processing_class=processor).train()
"""


def test_logs_to_trackio_offline(tmp_path):
    pytest.importorskip("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    script = textwrap.dedent(TRACKIO_RUN.format(output=str(tmp_path / "run")))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=600)

    with sqlite3.connect(tmp_path / "trackio" / "spotlight-test.db") as database:
        logged = [json.loads(row[0]) for row in database.execute("SELECT metrics FROM metrics")]
    spotlight = [entry for entry in logged if "spotlight/perception" in entry]
    assert len(spotlight) == 1
    entry = spotlight[0]
    assert 0.0 <= entry["spotlight/tokens_above_0.001"] <= 1.0
    for key in ("spotlight/perception", "spotlight/distributions", "spotlight/page"):
        assert (tmp_path / "trackio" / "media" / entry[key]["file_path"]).stat().st_size > 0
