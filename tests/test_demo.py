"""The CPU demo runs end to end and writes what its users read; the sweep over seeds tabulates VPPO next to GRPO.

Learning itself is shown by the full demo and the sweep (README, docs/demo.md); here a few steps check the pipeline
only, with no timing or learning assertions.
"""

import contextlib
import csv
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vppo_trl.testing import COLOURS, build_tiny_vlm, suppressed_token_ids
from vppo_trl.tools import demo

SWEEP_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_sweep.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick --compare grpo` run: its folder, summary and printed output."""
    folder = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # a module-scoped fixture cannot use capsys
        summary = demo.main(["--quick", "--compare", "grpo", "--output-dir", str(folder)])
    return folder, summary, printed.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_quick_demo_writes_table_log_summary_and_plot(quick_run):
    folder, summary, printed = quick_run
    assert "step  reward" in printed
    assert "Verdict: quick run" in printed
    # The answer is a sentence: TGF's 40% keeps 3 of its 7 tokens
    assert "3 of the answer's 7 (with <|im_end|>)" in printed

    rows = read_csv(folder / "log.csv")
    assert [int(float(row["step"])) for row in rows] == [1, 2, 3]
    for key in ("reward", "vppo/advantage_scale_max", "vppo/skipped_fraction", "dynamic_sampling/batch_fill"):
        assert key in rows[0]
    # The learning rate logged is the one the banner prints (the vision tower's 5x is its own parameter group)
    assert {float(row["learning_rate"]) for row in rows} == {summary["learning_rate"]}

    assert json.loads((folder / "summary.json").read_text()) == summary
    assert isinstance(summary["learned"], bool) and not summary["learned"]
    assert 0.0 <= summary["greedy_accuracy_after"] <= 1.0 and summary["train_seconds"] > 0
    with Image.open(folder / "vppo_demo.png") as image:
        assert image.format == "PNG"
        image.verify()


def test_the_spotlight_json_keeps_tokens_dependency_and_kept(quick_run):
    folder, summary, printed = quick_run
    assert "Spotlight on a held-out" in printed
    completions = json.loads((folder / "spotlight" / "perception.json").read_text())["completions"]
    assert len(completions) == demo.SPOTLIGHT_COMPLETIONS
    for item in completions:
        assert len(item["tokens"]) == len(item["dependency"]) == len(item["kept"]) > 0
    with Image.open(summary["spotlight_png"]) as image:
        assert image.width > 800


def test_compare_grpo_trains_every_token_from_the_same_warm_start(quick_run):
    folder, summary, printed = quick_run
    assert "GRPO: 3 steps" in printed and "GRPO verdict: quick run" in printed
    grpo_rows = read_csv(folder / "grpo_log.csv")
    assert [int(float(row["step"])) for row in grpo_rows] == [1, 2, 3]
    assert "keeps 40% of tokens" in printed.split("GRPO: 3 steps")[0] and "keeps" not in printed.split("GRPO: 3")[1]
    # TGF off: every completion token gets gradient on the steps that measured any (a 3-step warm start may leave
    # every group uninformative, and then no dependency is measured)
    assert {row.get("vppo/token_fraction") for row in grpo_rows} - {None, ""} <= {"1.0"}
    assert summary["grpo"]["greedy_accuracy_before"] == summary["greedy_accuracy_before"]
    with Image.open(folder / "vppo_vs_grpo.png") as image:
        assert image.format == "PNG"
        image.verify()


def test_the_saved_model_can_be_spotlighted_from_the_command_line(quick_run, tmp_path, capsys):
    from vppo_trl.cli import main

    folder, _, _ = quick_run
    demo.make_question_dataset(1, seed=7)[0]["images"][0].save(tmp_path / "shape.png")
    main(["spotlight", "--model", str(folder / "trainer"), "--image", str(tmp_path / "shape.png"),
          "--prompt", demo.QUESTION, "--num-completions", "3", "--max-new-tokens", "10", "--device", "cpu",
          "--draws", "1", "--output-dir", str(tmp_path / "spot")])  # fmt: skip
    assert "Wrote" in capsys.readouterr().out
    page = (tmp_path / "spot" / "perception.html").read_text()
    assert page.count('class="completion"') == 3
    assert "<|image_pad|>" not in page.split("<h2>The")[1]  # suppress_tokens, saved with the model


def test_the_reward_is_one_for_exactly_the_right_sentence():
    completions = ["The shape is red.", " The shape is red. ", "The shape is blue.", "red", "The shape is red"]
    assert demo.sentence_reward(completions, ["red"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    conversational = [[{"role": "assistant", "content": "The shape is green."}]]
    assert demo.sentence_reward(conversational, ["green"]) == [1.0]


def test_the_warm_start_names_the_true_colour_only_in_the_other_phrasing():
    examples = demo.warm_start_examples(400, seed=0)
    describe = [answer for prompt, _, answer in examples if prompt == demo.DESCRIBE_PROMPT]
    question = [answer for prompt, _, answer in examples if prompt == demo.QUESTION]
    assert len(describe) == len(question) == 200
    assert all(answer.startswith("The shape is ") for answer in question)
    # Same generator, same seed: the colours drawn for the images, in order
    rng = demo.random.Random(0)
    true_colours = []
    for index in range(400):
        colour, shape = rng.choice(COLOURS), rng.choice(demo.SHAPES)
        demo.make_shape_image(colour, rng, shape=shape)
        if index % 2:
            rng.choice(COLOURS)
        true_colours.append(colour)
    assert describe == [f"A {c} {answer.split()[2]}" for c, answer in zip(true_colours[::2], describe, strict=True)]
    matching = sum(answer == demo.answer_sentence(c) for c, answer in zip(true_colours[1::2], question, strict=True))
    assert 20 < matching < 80  # chance is 50 of 200: the format examples do not teach the answer


def test_bad_flags_are_refused_with_their_name(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--estimator", "k4"])
    assert "invalid choice: 'k4'" in capsys.readouterr().err


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


def load_sweep():
    spec = importlib.util.spec_from_file_location("demo_sweep", SWEEP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_sweep_tabulates_both_methods_per_seed_and_their_paired_difference(tmp_path, capsys):
    sweep = load_sweep()
    argv = ["--seeds", "0-1", "--steps", "2", "--warm-start-steps", "2", "--output-dir", str(tmp_path)]
    summary = sweep.main(argv)
    table = (tmp_path / "results.md").read_text()
    assert table in capsys.readouterr().out
    assert "| seed | VPPO | GRPO |" in table
    rows = [line for line in table.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and all(len(row.split(" | ")) == 3 for row in rows)
    assert "GRPO minus VPPO, paired by seed" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in results["results"]] == [0, 1]
    for result in results["results"]:
        for method in ("vppo", "grpo"):
            run = result["runs"][method]
            assert set(run) >= {"learned", "step_reaching_0.8", "greedy_accuracy_after", "train_seconds"}
        # Each row's cells hold that seed's runs, in the header's order
        cells = rows[result["seed"]].strip("| ").split(" | ")[1:]
        for cell, method in zip(cells, ("vppo", "grpo"), strict=True):
            run = result["runs"][method]
            learned = "yes" if run["learned"] else "NO"
            assert cell.startswith(f"{learned}, never (> 2), {run['greedy_accuracy_after']:.2f}, ")
    # Two steps cannot reach 0.8 from a chance-level start: both count as censored (steps + 1)
    assert summary["steps_difference_grpo_minus_vppo"]["per_seed"] == [0, 0]

    # A finished seed is not trained again
    (tmp_path / "seed1.json").write_text((tmp_path / "seed1.json").read_text().replace('"seed": 1', '"seed": 1 '))
    sweep.main(argv)
    assert "(2 already done)" in capsys.readouterr().out


def test_a_method_added_to_the_sweep_trains_only_that_method_from_the_same_warm_start(tmp_path, capsys):
    sweep = load_sweep()
    argv = ["--seeds", "0", "--steps", "2", "--warm-start-steps", "2", "--output-dir", str(tmp_path)]
    sweep.main([*argv, "--methods", "vppo,grpo"])
    before = json.loads((tmp_path / "seed0.json").read_text())
    summary = sweep.main([*argv, "--methods", "vppo,grpo,vppo_guard"])
    after = json.loads((tmp_path / "seed0.json").read_text())
    assert after["runs"]["vppo"] == before["runs"]["vppo"] and after["runs"]["grpo"] == before["runs"]["grpo"]
    assert after["warm_start_accuracy"] == before["warm_start_accuracy"]
    assert set(after["runs"]["vppo_guard"]) >= {"learned", "step_reaching_0.8", "greedy_accuracy_after"}
    table = (tmp_path / "results.md").read_text()
    assert "| seed | VPPO | GRPO | VPPO_GUARD |" in table and "GRPO minus VPPO_GUARD, paired by seed" in table
    assert summary["steps_difference_grpo_minus_vppo_guard"]["per_seed"] == [0]


def test_the_sweep_refuses_methods_without_grpo_or_unknown(capsys):
    for methods, problem in (("vppo", ""), ("vppo,grpo,vpo", " (unknown: vpo)")):
        with pytest.raises(SystemExit):
            load_sweep().main(["--methods", methods])
        assert f"must name grpo and at least one other method among vppo, grpo, vppo_guard{problem}" in (
            capsys.readouterr().err
        )


def test_the_sweep_refuses_a_bad_seed_list(capsys):
    with pytest.raises(SystemExit):
        load_sweep().main(["--seeds", "0-x"])
    assert "--seeds: '0-x' is not a seed or a range like 0-9" in capsys.readouterr().err


def test_first_step_reaching_uses_the_moving_mean():
    rewards = [0.0] * 20 + [1.0] * 20
    assert demo.first_step_reaching(rewards) == 36  # 16 ones in the window of 20 steps
    assert demo.first_step_reaching([0.5] * 30) is None
