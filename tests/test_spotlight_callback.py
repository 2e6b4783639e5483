"""SpotlightCallback writes pages during training without changing it, and logs to trackio offline."""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch
from trl.trainer.utils import shuffle_sequence_dict, split_pixel_values_by_grid, unsplit_pixel_values_by_grid

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.method.batch_rows import select_rows
from vppo_trl.method.passes import COMPLETION_INDEX_KEY
from vppo_trl.testing import COLOURS, build_tiny_vlm, make_colour_dataset
from vppo_trl.tools.spotlight import pixels_to_pil
from vppo_trl.tools.spotlight_callback import SpotlightCallback, first_measured_group
from vppo_trl.trainer import DEFERRED_KEY


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


def test_first_measured_group_follows_generation_order_not_batch_order():
    # Generation positions of 12 rows after a shuffle; groups of 4 start at 0 on this process (offset 0).
    index = torch.tensor([9, 2, 5, 0, 11, 3, 7, 1, 4, 8, 10, 6])
    measured = torch.ones(12, dtype=torch.bool)
    assert first_measured_group(index, measured, offset=0, group_size=4) == [3, 7, 1, 5]  # positions 0, 1, 2, 3
    measured[[3, 7, 1, 5]] = False  # the first group skipped (zero advantages): the next one, whole
    assert first_measured_group(index, measured, offset=0, group_size=4) == [8, 2, 11, 6]
    # A process whose generation batch starts at global position 6: its first two rows end a group begun elsewhere.
    assert first_measured_group(index, measured, offset=6, group_size=4) == [8, 2]
    assert first_measured_group(index, torch.zeros(12, dtype=torch.bool), offset=0, group_size=4) == []


def test_page_shows_one_whole_group_after_trls_shuffle(tmp_path):
    """The deferred route captures in the loss, after GRPOTrainer._prepare_inputs shuffled the batch."""
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, seed=0)
    dataset = make_colour_dataset(3, seed=3)
    args = VPPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=12, num_generations=4, max_completion_length=6,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", spotlight_steps=1, skip_zero_advantage=False,
    )  # fmt: skip
    trainer = VPPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=dataset,
                          processing_class=processor)  # fmt: skip
    callback = next(item for item in trainer.callback_handler.callbacks if isinstance(item, SpotlightCallback))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions([dict(dataset[i]) for i in range(3) for _ in range(4)])
    assert DEFERRED_KEY in batch  # TGF and TAS wait for the loss's forward
    torch.manual_seed(1)
    shuffled = unsplit_pixel_values_by_grid(shuffle_sequence_dict(split_pixel_values_by_grid(batch)))  # as TRL does
    positions = shuffled[COMPLETION_INDEX_KEY].tolist()
    assert sorted(positions.index(row) for row in range(4)) != list(range(4))  # the first group is scattered
    trainer.shared.spotlight_capture = callback.capture
    with torch.no_grad():
        trainer._compute_loss(trainer.model, shuffled)

    snapshot = callback.snapshot
    mask = batch["completion_mask"].bool()
    first_group = [batch["completion_ids"][row][mask[row]].tolist() for row in range(4)]
    assert [item.token_ids for item in snapshot.perceptions] == first_group
    first_images = pixels_to_pil(trainer.shared.pixel_layout, select_rows(batch, [0])["pixel_values"],
                                 select_rows(batch, [0])["image_grid_thw"])  # fmt: skip
    assert [image.tobytes() for image in snapshot.images] == [image.tobytes() for image in first_images]
    assert "×" in snapshot.prompt and len(snapshot.trajectory_dependencies) == 12
