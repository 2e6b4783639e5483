"""Dynamic sampling: informative full batches, round limits, epoch accounting, GRPO layout, two processes."""

import copy
import json
import logging
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import set_seed
from trl import GRPOTrainer

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.longrun.dynamic_sampling import PromptStream
from vppo_trl.method.passes import IMAGES_KEY
from vppo_trl.testing import COLOUR_QUESTION, COLOURS, build_tiny_vlm, make_colour_dataset

SCRIPT = Path(__file__).parent / "scripts" / "dynamic_sampling_two_process.py"
GROUP = 4
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def indexed_dataset(n: int):
    """The colour task with a prompt id, `pid`, and prompts of three lengths (rounds then differ in prompt width)."""
    dataset = make_colour_dataset(n, seed=1).add_column("pid", list(range(n)))

    def vary_prompt(row):
        text = COLOUR_QUESTION + " Look." * (row["pid"] % 3)
        return {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]}

    return dataset.map(vary_prompt)


def parity_reward(completions, pid, **kwargs) -> list[float]:
    """Uniform groups (always 1.0) for even prompt ids, binary completion-dependent rewards for odd ones."""
    return [1.0 if p % 2 == 0 else float(len(str(c)) % 2) for c, p in zip(completions, pid, strict=True)]


def alternating_reward(completions, **kwargs) -> list[float]:
    """0, 1, 0, 1, ...: every group is informative."""
    return [float(i % 2) for i in range(len(completions))]


def constant_reward(completions, **kwargs) -> list[float]:
    return [1.0] * len(completions)


class RecordingTrainer(VPPOTrainer):
    """Records the prompts generated on, every generation batch handed on, and every batch that reaches the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt_ids_seen: list[int] = []
        self.generated: list[tuple[dict, float]] = []
        self.loss_inputs: list[dict] = []

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self.prompt_ids_seen.extend(example["pid"] for example in inputs)
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        fills = self._metrics["train"].get("dynamic_sampling/batch_fill")
        self.generated.append((copy.deepcopy(output), fills[-1] if fills else 1.0))
        return output

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append(dict(inputs))
        return super()._compute_loss(model, inputs)


def make_trainer(tmp_path, reward=parity_reward, dataset=None, vlm=None, **overrides) -> RecordingTrainer:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=GROUP,
        max_completion_length=4,
        num_train_epochs=1,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=7,
        token_filter_ratio=1.0,  # advantages reach the loss as GRPO computed them
        advantage_shaping=False,
        dynamic_sampling=True,
        dynamic_sampling_reward="total" if isinstance(reward, list) else reward.__name__,
        dynamic_sampling_max_rounds=8,
    )
    settings.update(overrides)
    model, processor = vlm if vlm is not None else build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    return RecordingTrainer(
        model=model,
        reward_funcs=reward,
        args=VPPOConfig(**settings),
        train_dataset=dataset if dataset is not None else indexed_dataset(16),
        processing_class=processor,
    )


def uninformative_groups(advantages: torch.Tensor) -> int:
    """Groups whose advantages are all 0 (binary rewards over 4 completions give no 0 advantage otherwise)."""
    return int((advantages.view(-1, GROUP) == 0).all(dim=1).sum())


def dynamic_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "dynamic_sampling/rounds" in entry]


def test_every_batch_is_full_and_informative_and_each_prompt_used_once_per_epoch(tmp_path):
    trainer = make_trainer(tmp_path, dataset=indexed_dataset(8), num_train_epochs=2)
    trainer.train()

    # Each epoch generated on every prompt exactly once, in fewer steps than without filtering (4 per epoch).
    seen = trainer.prompt_ids_seen
    assert Counter(seen[: 8 * GROUP]) == Counter(seen[8 * GROUP :]) == {pid: GROUP for pid in range(8)}
    assert trainer.state.global_step < 2 * 4
    assert trainer.state.epoch == pytest.approx(2.0)
    logs = dynamic_logs(trainer)
    assert len(logs) == trainer.state.global_step
    assert sum(log["dynamic_sampling/prompts_consumed"] for log in logs) == 16
    assert any(log["dynamic_sampling/rounds"] > 1 for log in logs)
    assert all(0 <= log["dynamic_sampling/kept_fraction"] <= 1 for log in logs)

    # Groups are whole and informative; only a batch that the rest of the epoch could not fill holds uninformative
    # ones (zero advantages: binary rewards over 4 completions give no other zero).
    assert len(trainer.generated) == len(trainer.loss_inputs) == len(logs)
    for (batch, fill), inputs, log in zip(trainer.generated, trainer.loss_inputs, logs, strict=True):
        assert fill == log["dynamic_sampling/batch_fill"]
        assert len(batch["advantages"]) == len(inputs["advantages"]) == 8
        assert uninformative_groups(batch["advantages"]) == round((1 - fill) * 2)
        assert int((inputs["advantages"] == 0).sum()) == GROUP * round((1 - fill) * 2)
        if fill < 1:
            assert log["epoch"] == pytest.approx(round(log["epoch"]))
        # A batch short because the epoch's data ran out is not the round limit's
        assert log["dynamic_sampling/round_limit_reached"] == 0.0


def row_view(batch: dict, row: int) -> dict[str, torch.Tensor]:
    """One row of a generation batch without its padding, with its image."""
    prompt = batch["prompt_mask"][row].bool()
    length = int(batch["completion_mask"][row].sum())
    width = batch["prompt_ids"].size(1)
    first_image = sum(batch["num_images"][:row])
    pixel_rows = batch["image_grid_thw"].prod(-1).tolist()
    start = sum(pixel_rows[:first_image])
    stop = start + sum(pixel_rows[first_image : first_image + batch["num_images"][row]])
    return {
        "prompt_ids": batch["prompt_ids"][row][prompt],
        "completion_ids": batch["completion_ids"][row][:length],
        "mm_token_type_ids": torch.cat(
            [batch["mm_token_type_ids"][row][:width][prompt], batch["mm_token_type_ids"][row][width : width + length]]
        ),
        "old_per_token_logps": batch["old_per_token_logps"][row][:length],
        "advantages": batch["advantages"][row],
        "pixel_values": batch["pixel_values"][start:stop],
        "image_grid_thw": batch["image_grid_thw"][first_image : first_image + batch["num_images"][row]],
    }


def same_row(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return all(value.shape == second[key].shape and torch.equal(value, second[key]) for key, value in first.items())


def test_merged_batch_has_grpo_layout(tmp_path, monkeypatch):
    """Rows merged from rounds of different prompt widths are exact copies of their rows in their own round."""
    rounds_output = []
    grpo_generate = GRPOTrainer._generate_and_score_completions

    def recording_generate(self, inputs):
        output = grpo_generate(self, inputs)
        rounds_output.append(output)
        return output

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", recording_generate)
    dataset = indexed_dataset(16)
    trainer = make_trainer(tmp_path, dataset=dataset, num_iterations=2)  # old_per_token_logps are then computed
    rounds = [[dict(dataset[i]) for i in (2 * k, 2 * k + 1) for _ in range(GROUP)] for k in range(8)]
    trainer._prompt_stream = PromptStream(iter(rounds[1:]), block=1, epoch=0)
    trainer.model.train()
    set_seed(0)
    batch = trainer._generate_and_score_completions(rounds[0])

    assert trainer._metrics["train"]["dynamic_sampling/rounds"][-1] == len(rounds_output) > 1
    assert len({output["prompt_ids"].size(1) for output in rounds_output}) > 1  # rounds padded differently
    assert trainer._metrics["train"]["dynamic_sampling/batch_fill"][-1] == 1.0
    assert uninformative_groups(batch["advantages"]) == 0
    assert len(batch["prompt_ids"]) == len(batch["num_images"]) == len(batch["image_grid_thw"]) == 8
    assert batch["pixel_values"].size(0) == int(batch["image_grid_thw"].prod(-1).sum())
    assert batch["mm_token_type_ids"].size(1) == batch["prompt_ids"].size(1) + batch["completion_ids"].size(1)
    assert (batch["prompt_mask"][:, -1] == 1).all() and (batch["completion_mask"][:, 0] == 1).all()
    assert int(batch["num_items_in_batch"]) == int(batch["completion_mask"].sum())
    sources = [row_view(output, row) for output in rounds_output for row in range(len(output["prompt_ids"]))]
    matches = [[i for i, source in enumerate(sources) if same_row(row_view(batch, row), source)] for row in range(8)]
    assert all(len(match) == 1 for match in matches)
    assert len({match[0] for match in matches}) == 8
    assert all(matches[row][0] // GROUP == matches[row - row % GROUP][0] // GROUP for row in range(8))  # whole groups
    # The images VPPO perturbs follow their completions: processed again, they give the merged pixel_values.
    images = [image for row in batch[IMAGES_KEY] for image in row]
    reprocessed = trainer.processing_class.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(reprocessed, batch["pixel_values"])


@pytest.mark.slow
def test_round_limit_continue_tops_up_warns_once_and_counts(tmp_path, caplog):
    trainer = make_trainer(tmp_path, reward=constant_reward, dynamic_sampling_max_rounds=1, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="vppo_trl.longrun.dynamic_sampling"):
        trainer.train()
    assert trainer.state.global_step == 3
    for log in dynamic_logs(trainer):
        assert log["dynamic_sampling/rounds"] == 2
        assert log["dynamic_sampling/batch_fill"] == 0.0
        assert log["dynamic_sampling/kept_fraction"] == 0.0
        assert log["dynamic_sampling/prompts_consumed"] == 4
        assert log["dynamic_sampling/round_limit_reached"] == 1.0
    assert all(len(inputs["advantages"]) == 8 for inputs in trainer.loss_inputs)
    # Every step's batch was short: one warning at the first, one summary at the end, nothing in between.
    # (transformers 5.17's Trainer also logs, once, that it aligned the model's special tokens with the tokenizer's)
    lines = [record.getMessage() for record in caplog.records if record.name == "vppo_trl.longrun.dynamic_sampling"]
    assert len(lines) == 2, lines
    assert "found 0 informative prompt groups of the 2 that a generation batch holds" in lines[0]
    assert "Reported once" in lines[0]
    assert lines[1].startswith("Dynamic sampling: the round limit (dynamic_sampling_max_rounds=1) left 3 of 3 ")
    assert "topped up with 6 uninformative groups of the 6 trained on (100.0%)" in lines[1]
    # Three steps of two rounds each: 12 prompts, each generated on once.
    seen = Counter(trainer.prompt_ids_seen)
    assert len(seen) == 12 and set(seen.values()) == {GROUP}


def test_round_limit_raise(tmp_path):
    trainer = make_trainer(
        tmp_path, reward=constant_reward, dynamic_sampling_max_rounds=2, dynamic_sampling_on_exhausted="raise"
    )
    with pytest.raises(RuntimeError, match=r"found 0 informative prompt groups of the 2 .* after 3 generation rounds"):
        trainer.train()


@pytest.mark.slow
def test_gradient_accumulation_num_iterations_and_max_steps_across_epochs(tmp_path):
    trainer = make_trainer(
        tmp_path,
        dataset=indexed_dataset(4),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_iterations=2,
        max_steps=4,  # one epoch without filtering; filtered epochs are shorter, so training goes into the second
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert trainer.state.epoch > 1.0
    assert Counter(trainer.prompt_ids_seen[: 4 * GROUP]) == {pid: GROUP for pid in range(4)}
    # One generation per 2 optimizer steps (2 accumulation steps x 2 iterations): each batch is used 4 times.
    assert len(trainer.loss_inputs) == 4 * len(trainer.generated) == 2 * 4
    assert all(len(inputs["advantages"]) == 4 for inputs in trainer.loss_inputs)
    assert all(uninformative_groups(batch["advantages"]) == round((1 - fill) * 2) for batch, fill in trainer.generated)
    assert sum(fill < 1 for _, fill in trainer.generated) <= int(trainer.state.epoch)  # where an epoch's data ran out
    assert "old_per_token_logps" in trainer.loss_inputs[0]


@pytest.mark.slow
def test_disabled_or_nothing_to_drop_changes_nothing(tmp_path):
    """All groups informative: same batches, parameters and logs as without dynamic sampling, which adds no metric."""
    vlm = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, seed=3)
    trainers = {}
    for enabled in (False, True):
        trainers[enabled] = make_trainer(
            tmp_path / str(enabled),
            reward=alternating_reward,
            vlm=copy.deepcopy(vlm),
            dynamic_sampling=enabled,
            max_steps=2,
        )
        set_seed(7)
        trainers[enabled].train()
    off, on = trainers[False], trainers[True]
    for (batch_off, _), (batch_on, _) in zip(off.generated, on.generated, strict=True):
        assert batch_off.keys() == batch_on.keys()
        for key, value in batch_off.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(batch_on[key], value, rtol=0, atol=0, msg=key)
            else:
                assert batch_on[key] == value, key
    for name, value in off.model.named_parameters():
        torch.testing.assert_close(dict(on.model.named_parameters())[name], value, rtol=0, atol=0, msg=name)
    assert not any(key.startswith("dynamic_sampling/") for log in off.state.log_history for key in log)
    for log_off, log_on in zip(off.state.log_history, on.state.log_history, strict=True):
        assert {k: v for k, v in log_on.items() if not k.startswith("dynamic_sampling/") and k not in TIMING_KEYS} == {
            k: v for k, v in log_off.items() if k not in TIMING_KEYS
        }


def test_filter_rule(tmp_path):
    """Kept: rewards not all equal and min < mean < max, over the scored completions; "total" is the weighted sum."""
    trainer = make_trainer(
        tmp_path,
        reward=[parity_reward, constant_reward],
        reward_weights=[1.0, 0.5],
        dynamic_sampling_min=0.6,
        dynamic_sampling_max=1.4,
    )
    nan = float("nan")
    first = [[0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1], [nan, 1, nan, 0], [1, nan, 1, nan], [0.7, 0.7, 0.7, 0.7]]
    second = [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [nan, 1, nan, 1], [1, nan, 1, nan], [0, 0, 0, 0]]
    trainer._round_rewards = torch.stack([torch.tensor(first).flatten(), torch.tensor(second).flatten()], dim=1)
    # Weighted sums: means 1.0 (kept), 1.5 (uniform), 0.25 (too low), 1.0 (kept), 1.5 (uniform), 0.7 (uniform).
    assert trainer._informative_groups(24).tolist() == [True, False, False, True, False, False]
    trainer.args.dynamic_sampling_reward = "parity_reward"
    trainer.args.dynamic_sampling_min, trainer.args.dynamic_sampling_max = 0.01, 0.99
    assert trainer._informative_groups(24).tolist() == [True, False, True, True, False, False]


def test_unknown_filter_reward(tmp_path):
    with pytest.raises(ValueError, match=r"dynamic_sampling_reward='accuracy_reward'.*\['parity_reward'\].*'total'"):
        make_trainer(tmp_path, dynamic_sampling_reward="accuracy_reward")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dynamic_sampling_on_exhausted": "skip"}, "dynamic_sampling_on_exhausted='skip' is not supported"),
        ({"dynamic_sampling_max_rounds": -1}, "dynamic_sampling_max_rounds=-1 must be >= 0"),
        ({"dynamic_sampling_min": 0.5, "dynamic_sampling_max": 0.5}, "dynamic_sampling_min=0.5 must be <"),
        ({"dynamic_sampling_reward": ""}, "dynamic_sampling_reward must name a reward function"),
        (
            {"gradient_accumulation_steps": 2, "steps_per_generation": 1},
            r"steps_per_generation \(1\) x num_iterations \(1\) = 1 to be a multiple of gradient_accumulation_steps",
        ),
    ],
)
def test_config_validation(tmp_path, overrides, message):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=GROUP, use_cpu=True)
    with pytest.raises(ValueError, match=message):
        VPPOConfig(**settings, dynamic_sampling=True, **overrides)
    if "steps_per_generation" in overrides:  # a batch layout dynamic sampling cannot use is fine without it
        VPPOConfig(**settings, **overrides)


def test_config_rejects_groups_straddling_processes(tmp_path, monkeypatch):
    # Two processes of 2 completions each: the global batch holds whole groups of 4, each process only halves.
    monkeypatch.setattr(VPPOConfig, "world_size", property(lambda self: 2))
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=GROUP, use_cpu=True)
    with pytest.raises(ValueError, match=r"per_device_train_batch_size \(2\) x steps_per_generation \(1\) = 2"):
        VPPOConfig(**settings, dynamic_sampling=True)
    VPPOConfig(**settings)


def test_prompt_stream_draws_whole_blocks():
    # Each batch comes 3 times in a row (steps_per_generation x num_iterations = 3).
    stream = PromptStream(iter("aaabbbcccddd"), block=3, epoch=0)
    assert next(stream) == "a"
    assert stream.draw() == "b"  # the Trainer's remaining copies of "a" are kept for it, "b"'s are dropped
    assert [next(stream), next(stream), next(stream)] == ["a", "a", "c"]
    assert stream.draw() == "d"
    assert [next(stream), next(stream)] == ["c", "c"]
    assert stream.draw() is None
    with pytest.raises(StopIteration):
        next(stream)
    assert stream.consumed == 12


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes(tmp_path):
    output = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(free_port()), str(SCRIPT), str(output),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    results = [json.loads((tmp_path / f"run.rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)

    first, second = results
    assert first["global_step"] == second["global_step"] < 32 // 4  # fewer steps than the unfiltered epoch
    assert first["epoch"] == second["epoch"] == pytest.approx(1.0)
    assert first["metrics"] == second["metrics"] and len(first["metrics"]) == first["global_step"]
    assert sum(m["dynamic_sampling/prompts_consumed"] for m in first["metrics"]) == 32
    assert any(m["dynamic_sampling/rounds"] > 1 for m in first["metrics"])
    # Each process generated on its own share of the prompts; together, every prompt exactly once.
    assert Counter(first["prompt_ids"] + second["prompt_ids"]) == {pid: GROUP for pid in range(32)}
    assert not set(first["prompt_ids"]) & set(second["prompt_ids"])
    for result in results:
        for rows, uninformative, metrics in zip(
            result["batch_rows"], result["uninformative_groups"], result["metrics"], strict=True
        ):
            assert rows == 8
            if metrics["dynamic_sampling/batch_fill"] == 1.0:
                assert uninformative == 0
