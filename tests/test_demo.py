"""The CPU demo runs end to end and writes what its users read; the sweep over seeds tabulates VPPO next to GRPO.

Learning itself is shown by the full demo and the sweep (README, docs/demo.md); here a few steps check the pipeline
only, with no timing or learning assertions. One quick demo run and one two-seed sweep are shared by the tests that
read them.
"""

import contextlib
import csv
import importlib.util
import io
import json
import logging
import shutil
import statistics
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from vppo_trl.testing import COLOURS, build_tiny_vlm, suppressed_token_ids
from vppo_trl.tools import demo

SWEEP_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_sweep.py"
QUICK_STEPS = demo.DemoArguments(quick=True).steps


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick --compare grpo` run, as a user starts it: its folder, summary and console (stdout, stderr)."""
    folder = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "vppo_trl.tools.demo", "--quick", "--compare", "grpo", "--output-dir"]
    console = subprocess.run(
        [*command, str(folder)], check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ).stdout
    return folder, json.loads((folder / "summary.json").read_text()), console


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
    assert [int(float(row["step"])) for row in rows] == list(range(1, QUICK_STEPS + 1))
    for key in ("reward", "vppo/advantage_scale_max", "vppo/skipped_fraction", "dynamic_sampling/batch_fill"):
        assert key in rows[0]
    # The learning rate logged rises over the warm-up to the one the banner prints
    peak, warmup = summary["learning_rate"], summary["warmup_steps"]
    expected = [peak * min(1.0, step / warmup) for step in range(QUICK_STEPS)]  # the rate each step trained at
    assert [float(row["learning_rate"]) for row in rows] == pytest.approx(expected)
    assert f"lr {peak} after {warmup} warm-up steps" in printed

    assert isinstance(summary["learned"], bool) and not summary["learned"]
    assert 0.0 <= summary["greedy_accuracy_after"] <= 1.0 and summary["train_seconds"] > 0
    with Image.open(folder / "vppo_demo.png") as image:
        assert image.format == "PNG"
        image.verify()


def test_the_console_holds_no_warning_and_no_repeated_line(quick_run):
    _, _, printed = quick_run
    lines = printed.splitlines()
    assert not [line for line in lines if "warn" in line.lower()], printed
    # Each method's part (VPPO, then GRPO with --compare) prints each line once; the two tables may share rows.
    vppo, grpo = printed.split("\nGRPO: ")
    for part in (vppo, grpo):
        repeated = [line for line, count in Counter(part.splitlines()).items() if count > 1]
        assert repeated == [], printed
    # Third-party start-up noise is silenced (DeepSpeed logs this when accelerate imports it to unwrap a model)
    assert "Setting accelerator" not in printed
    # The dynamic-sampling shortfall of every quick step (a 2-step warm start earns no reward) is said once
    assert sum("Dynamic sampling:" in line for line in vppo.splitlines()) == 1
    assert f"{QUICK_STEPS} of {QUICK_STEPS} steps trained on a batch it could not fill" in vppo


def test_the_demo_says_per_colour_what_it_learned_and_summary_json_keeps_it(quick_run):
    _, summary, printed = quick_run
    per_colour = demo.EVAL_IMAGES // len(COLOURS)
    assert f"fresh images ({per_colour} of each colour)" in printed
    line = next(line for line in printed.splitlines() if line.startswith("  per colour after VPPO: "))
    expected = ", ".join(f"{c} {summary['per_colour_accuracy_after'][c]:.2f}" for c in COLOURS)
    assert line.startswith(f"  per colour after VPPO: {expected}")
    for key in ("per_colour_accuracy_before", "per_colour_accuracy_after"):
        assert set(summary[key]) == set(COLOURS) and all(0.0 <= value <= 1.0 for value in summary[key].values())
    confusion = summary["confusion_after"]
    assert set(confusion) == set(COLOURS)
    for colour, named in confusion.items():
        assert set(named) == {*COLOURS, demo.NO_COLOUR} and sum(named.values()) == per_colour
        assert named[colour] >= summary["per_colour_accuracy_after"][colour] * per_colour  # right sentence, right word
    mean = sum(summary["per_colour_accuracy_after"].values()) / len(COLOURS)
    assert mean == pytest.approx(summary["greedy_accuracy_after"])
    assert set(summary["grpo"]["confusion_after"]) == set(COLOURS)


def test_the_spotlight_json_keeps_tokens_dependency_and_kept(quick_run):
    folder, summary, printed = quick_run
    assert "Spotlight on a held-out" in printed
    completions = json.loads((folder / "spotlight" / "perception.json").read_text())["completions"]
    assert len(completions) == demo.SPOTLIGHT_COMPLETIONS
    for item in completions:
        assert len(item["tokens"]) == len(item["dependency"]) == len(item["kept"]) > 0
    with Image.open(summary["spotlight_png"]) as image:
        assert image.width > 800


def test_compare_grpo_spotlights_the_grpo_model_with_every_token_trained(quick_run):
    folder, summary, _ = quick_run
    page = (folder / "grpo_spotlight" / "perception.html").read_text()
    assert "GRPO model" in page and "the tokens GRPO trains" in page
    for item in json.loads((folder / "grpo_spotlight" / "perception.json").read_text())["completions"]:
        assert all(item["kept"]) and item["advantage_scale"] == 1.0
    # VPPO's page marks the 40% its TGF keeps
    vppo = json.loads((folder / "spotlight" / "perception.json").read_text())["completions"]
    assert any(not all(item["kept"]) for item in vppo)
    assert summary["grpo"]["spotlight_png"].endswith("grpo_spotlight/perception.png")


def test_compare_grpo_trains_every_token_from_the_same_warm_start(quick_run):
    folder, summary, printed = quick_run
    banner = f"GRPO: {QUICK_STEPS} steps"
    assert banner in printed and "GRPO verdict: quick run" in printed
    grpo_rows = read_csv(folder / "grpo_log.csv")
    assert [int(float(row["step"])) for row in grpo_rows] == list(range(1, QUICK_STEPS + 1))
    assert "keeps 40% of tokens" in printed.split(banner)[0] and "keeps" not in printed.split(banner)[1]
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


def test_the_saved_model_loads_with_no_missing_or_unexpected_key(quick_run):
    from transformers import AutoModelForImageTextToText

    folder, _, _ = quick_run
    _, info = AutoModelForImageTextToText.from_pretrained(folder / "trainer", output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


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


SWEEP_ARGS = ["--quick", "--spotlight", "false"]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """A two-seed sweep of VPPO and GRPO (the demo's quick runs): its folder, summary and printed output."""
    folder = tmp_path_factory.mktemp("sweep")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # a module-scoped fixture cannot use capsys
        summary = load_sweep().main(
            ["--seeds", "0-1", "--methods", "vppo,grpo", *SWEEP_ARGS, "--output-dir", str(folder)]
        )
    return folder, summary, printed.getvalue()


@pytest.mark.slow
def test_the_sweep_tabulates_both_methods_per_seed_and_their_paired_difference(sweep_run, capsys):
    folder, summary, printed = sweep_run
    table = (folder / "results.md").read_text()
    assert table in printed
    assert "| seed | VPPO | GRPO |" in table
    rows = [line for line in table.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and all(len(row.split(" | ")) == 3 for row in rows)
    assert "Paired by seed against GRPO" in table
    results = json.loads((folder / "results.json").read_text())
    assert [r["seed"] for r in results["results"]] == [0, 1]
    for result in results["results"]:
        for method in ("vppo", "grpo"):
            run = result["runs"][method]
            assert set(run) >= {"learned", "steps_trained", "step_reaching_0.8", "greedy_accuracy_after"}
            assert set(run["per_colour_accuracy_after"]) == set(COLOURS)
            assert run["train_seconds"] > 0 and run["train_cpu_seconds"] > 0 and len(run["load_average"]) == 2
        # Each row's cells hold that seed's runs, in the header's order; a run that did not learn says its confusions
        cells = rows[result["seed"]].strip("| ").split(" | ")[1:]
        for cell, method in zip(cells, ("vppo", "grpo"), strict=True):
            run = result["runs"][method]
            assert not run["learned"]
            assert cell.startswith(f"NO, {QUICK_STEPS}, never (> {QUICK_STEPS}), {run['greedy_accuracy_after']:.2f} (")
            assert cell.endswith(f", {run['train_seconds']:.0f} s ({run['train_cpu_seconds']:.0f} s CPU)")
            mistakes = demo.HeldOut.after_training(run).confusions()
            assert f"({', '.join(mistakes[:2])})" in cell
    # A quick run cannot reach 0.8: both count as censored (steps + 1)
    paired = summary["paired"]["vppo"]
    assert paired["steps_to_0.8"]["differences"] == [0, 0]
    for name, readout in (("held_out_accuracy", "greedy_accuracy_after"), ("final_reward", "end_reward")):
        expected = [r["runs"]["vppo"][readout] - r["runs"]["grpo"][readout] for r in results["results"]]
        assert paired[name]["differences"] == pytest.approx(expected)
        assert paired[name]["low"] <= paired[name]["mean"] <= paired[name]["high"]
    line = next(line for line in table.splitlines() if line.startswith("| VPPO | "))
    accuracy = paired["held_out_accuracy"]
    assert f"{accuracy['mean']:+.3f} [{accuracy['low']:+.3f}, {accuracy['high']:+.3f}]" in line
    # Every run keeps its per-step rewards and the census of its trained policy's token perception
    for result in results["results"]:
        for census in (result["warm_start_census"], *(run["census"] for run in result["runs"].values())):
            assert census["tokens"] > 0 and 0.0 <= census["dependent_token_share"] <= 1.0
        assert len(result["runs"]["vppo"]["rewards"]) == QUICK_STEPS
    assert "| warm start | " in table and "| after GRPO | " in table
    with Image.open(folder / "curves.png") as image:
        image.verify()

    # A finished seed is not trained again
    seed1 = folder / "seed1.json"
    seed1.write_text(seed1.read_text().replace('"seed": 1', '"seed": 1 '))
    load_sweep().main(["--seeds", "0-1", "--methods", "vppo,grpo", *SWEEP_ARGS, "--output-dir", str(folder)])
    assert "(2 already done)" in capsys.readouterr().out


@pytest.mark.slow
def test_the_sweep_of_vppo_alone_tabulates_it_without_a_comparison(sweep_run):
    folder, _, _ = sweep_run
    sweep = load_sweep()
    results = json.loads((folder / "results.json").read_text())["results"]
    args = sweep.SweepArguments(methods="vppo", quick=True)
    summary = sweep.summarise(results, args)
    table = sweep.markdown(results, summary)
    assert "| seed | VPPO |" in table and "GRPO" not in table and "Paired by seed" not in table
    runs = [result["runs"]["vppo"] for result in results]
    assert summary["vppo"]["max_train_seconds"] == max(run["train_seconds"] for run in runs)
    accuracy = statistics.fmean(run["greedy_accuracy_after"] for run in runs)
    assert f"- VPPO: 0 of 2 seeds learned, 0 reached 0.8; held-out accuracy {accuracy:.2f} on average (" in table
    assert f"; median steps trained {QUICK_STEPS}," in table


@pytest.mark.slow
def test_a_method_added_to_the_sweep_trains_only_that_method_from_the_same_warm_start(sweep_run, tmp_path):
    shutil.copy(sweep_run[0] / "seed0.json", tmp_path / "seed0.json")
    before = json.loads((tmp_path / "seed0.json").read_text())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = load_sweep().main(
            ["--seeds", "0", *SWEEP_ARGS, "--output-dir", str(tmp_path), "--methods", "vppo,grpo,vppo_guard"]
        )
    after = json.loads((tmp_path / "seed0.json").read_text())
    assert after["runs"]["vppo"] == before["runs"]["vppo"] and after["runs"]["grpo"] == before["runs"]["grpo"]
    assert after["warm_start_accuracy"] == before["warm_start_accuracy"]  # the same, deterministic warm start
    assert set(after["runs"]["vppo_guard"]) >= {"learned", "step_reaching_0.8", "greedy_accuracy_after"}
    table = (tmp_path / "results.md").read_text()
    assert "| seed | VPPO | GRPO | VPPO_GUARD |" in table and "| VPPO_GUARD | " in table
    assert summary["paired"]["vppo_guard"]["steps_to_0.8"]["differences"] == [0]


def test_the_sweep_refuses_unknown_methods_or_none(capsys):
    for methods, problem in ((",", ""), ("vppo,grpo,vpo", " (unknown: vpo)")):
        with pytest.raises(SystemExit):
            load_sweep().main(["--methods", methods])
        assert f"must name methods among {', '.join(demo.TRAINING_METHODS)}{problem}" in capsys.readouterr().err


def test_the_sweep_refuses_a_bad_seed_list(capsys):
    with pytest.raises(SystemExit):
        load_sweep().main(["--seeds", "0-x"])
    assert "--seeds: '0-x' is not a seed or a range like 0-9" in capsys.readouterr().err


def test_first_step_reaching_uses_the_moving_mean():
    rewards = [0.0] * 20 + [1.0] * 20
    assert demo.first_step_reaching(rewards) == 36  # 16 ones in the window of 20 steps
    assert demo.first_step_reaching([0.5] * 30) is None


def stalled_summary() -> dict:
    """A run that answers yellow shapes red or green: the issue's seed-101 stall, in the summary's layout."""
    confusion = {colour: {**dict.fromkeys((*COLOURS, demo.NO_COLOUR), 0), colour: 32} for colour in COLOURS}
    confusion["yellow"] = {**dict.fromkeys((*COLOURS, demo.NO_COLOUR), 0), "red": 25, "green": 6, "yellow": 1}
    return {
        "start_reward": 0.23,
        "end_reward": 0.75,
        "greedy_accuracy_before": 0.25,
        "greedy_accuracy_after": 97 / 128,
        "per_colour_accuracy_after": {"red": 1.0, "green": 1.0, "blue": 1.0, "yellow": 1 / 32},
        "confusion_after": confusion,
        "learned": False,
        "train_seconds": 100.0,
    }


def test_a_run_that_did_not_learn_names_which_colour_it_confuses_with_which():
    summary = stalled_summary()
    text = demo.verdict(summary, quick=False)
    assert text.startswith("did NOT learn: mean reward 0.23 (first 20 steps) -> 0.75 (last 20)")
    assert text.endswith("; held-out answers confused yellow -> red 25/32, yellow -> green 6/32")
    total, per_colour = demo.held_out_lines(summary, "VPPO")
    assert "0.25 before VPPO -> 0.76 after" in total
    assert per_colour == (
        "  per colour after VPPO: red 1.00, green 1.00, blue 1.00, yellow 0.03; confused (true -> answered): "
        "yellow -> red 25/32, yellow -> green 6/32."
    )
    summary.update(learned=True, confusion_after={c: {c: 32} for c in COLOURS})
    assert demo.verdict(summary, quick=False).startswith("LEARNED")
    assert demo.held_out_lines(summary, "VPPO")[1].endswith("; no colour confused.")


def test_named_colour_reads_the_answers_colour_word():
    assert demo.named_colour("The shape is yellow.") == "yellow"
    assert demo.named_colour("Red") == "red"
    assert demo.named_colour("The shape is") == demo.NO_COLOUR


def test_quiet_libraries_silences_only_inside_the_call_and_restores_everything():
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in demo.quiet_libraries.QUIET_LOGGERS]
    filters = [list(logger.filters) for logger in loggers]
    state = (torch.get_num_threads(), hf_logging.get_verbosity(), list(warnings.filters))
    with demo.quiet_libraries():
        for logger in loggers:
            assert not logger.filter(logger.makeRecord(logger.name, logging.WARNING, "x", 1, "noise", (), None))
            assert logger.filter(logger.makeRecord(logger.name, logging.ERROR, "x", 1, "kept", (), None))
    assert [list(logger.filters) for logger in loggers] == filters
    assert (torch.get_num_threads(), hf_logging.get_verbosity(), list(warnings.filters)) == state


def test_the_chain_task_answers_with_free_words_then_the_sentence_and_rewards_the_colour_alone():
    chain = demo.TASKS["chain"]
    rng = __import__("random").Random(3)
    answers = [chain.answer(rng, "blue") for _ in range(50)]
    for answer in answers:
        *free, the, shape, is_, colour = answer.split()
        assert len(free) == demo.CHAIN_LENGTH and set(free) <= set(demo.CHAIN_WORDS)
        assert f"{the} {shape} {is_} {colour}" == demo.answer_sentence("blue")
    # The free words vary between answers: most positions take several words over 50 draws
    columns = list(zip(*(answer.split()[: demo.CHAIN_LENGTH] for answer in answers), strict=True))
    assert min(len(set(column)) for column in columns) >= 5
    assert not set(demo.CHAIN_WORDS) & set(COLOURS)
    # The reward reads the colour of the first "The shape is <colour>" after at least 12 words, whichever they are
    chain = " ".join(["so"] * demo.CHAIN_LENGTH)
    right = [answers[0], f"{chain} it The shape is blue. then", [{"content": answers[1]}]]
    right.append(f"{chain} The shape is blue")
    right.append(f"A blue red {chain} The shape is blue.")  # the words need not be free words
    assert demo.chain_reward(right, ["blue"] * len(right)) == [1.0] * len(right)
    # Naming the colour in the warm start's other phrasing earns nothing, nor dropping the chain or part of it, nor a
    # second sentence after a wrong one
    wrong = ["A blue ellipse.", demo.answer_sentence("blue"), f"{chain} The shape is red. The shape is blue."]
    wrong += [" ".join(["so"] * 11 + ["The shape is blue."]), f"{chain} The shape is blueish."]
    wrong.append(f"{chain} the shape is blue")
    assert demo.chain_reward(wrong, ["blue"] * len(wrong)) == [0.0] * len(wrong)


def test_every_chain_word_is_one_token_and_the_answer_is_18_tokens():
    from vppo_trl.testing import build_tokenizer

    chain = demo.TASKS["chain"]
    tokenizer = build_tokenizer(COLOURS + chain.words, vocab_size=demo.VOCAB_SIZE)
    for word in chain.words:
        assert len(tokenizer(" " + word).input_ids) == 1 and len(tokenizer(word).input_ids) == 1
    assert chain.answer_tokens(tokenizer) == demo.CHAIN_LENGTH + 6  # "The shape is <colour>." and <|im_end|>
    assert chain.max_completion_length >= chain.answer_tokens(tokenizer)


def shape_colour(image: Image.Image) -> str:
    """The colour whose RGB is nearest the image's most common non-white pixel."""
    from vppo_trl.testing.colour_task import _RGB

    count, pixel = max((count, pixel) for count, pixel in image.getcolors() if pixel != (255, 255, 255))
    return min(COLOURS, key=lambda colour: sum((a - b) ** 2 for a, b in zip(_RGB[colour], pixel, strict=True)))


def test_the_chain_warm_start_teaches_the_format_with_a_colour_drawn_apart_from_the_image():
    examples = demo.warm_start_examples(400, seed=0, task=demo.TASKS["chain"])
    question = [(image, answer) for prompt, image, answer in examples if prompt == demo.QUESTION]
    described = [(image, answer) for prompt, image, answer in examples if prompt == demo.DESCRIBE_PROMPT]
    assert len(question) == len(described) == 200
    assert {len(answer.split()) for _, answer in question} == {demo.CHAIN_LENGTH + 4}
    # The description names the image's colour; the chain's sentence a colour drawn apart from it (chance: 50 of 200)
    assert all(answer.split()[1] == shape_colour(image) for image, answer in described)
    matching = sum(demo.named_colour(answer) == shape_colour(image) for image, answer in question)
    assert 20 < matching < 80


def test_the_demo_refuses_an_unknown_task(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--task", "essay"])
    assert "essay" in capsys.readouterr().err


REGISTRATION = SWEEP_SCRIPT.parent / "registrations" / "chain_vppo_vs_grpo_v2.json"


def test_the_registered_comparison_names_20_seeds_and_settings_the_sweep_has():
    sweep = load_sweep()
    registration = json.loads(REGISTRATION.read_text())
    assert len(sweep.parse_seeds(registration["seeds"])) == 20
    args = sweep.SweepArguments(registration=str(REGISTRATION))
    sweep.apply_registration(args)
    assert (args.task, args.seeds, args.steps) == ("chain", registration["seeds"], registration["settings"]["steps"])
    assert sweep.parse_methods(args.methods) == ["vppo", "grpo", "tgf_only", "tas_only"]
    # The registration it supersedes says why it was abandoned, and no seed of it is reused
    first = json.loads((REGISTRATION.parent / "chain_vppo_vs_grpo.json").read_text())
    assert first["status"].startswith("abandoned") and "chain_vppo_vs_grpo_v2.json" in first["status"]
    assert not set(sweep.parse_seeds(first["seeds"])) & set(sweep.parse_seeds(registration["seeds"]))


def test_a_flag_that_disagrees_with_the_registration_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_sweep().main(["--registration", str(REGISTRATION), "--steps", "40", "--output-dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert f"--registration: --steps 40 disagrees with {REGISTRATION}, which registers 100" in error
    registered = tmp_path / "other.json"
    registered.write_text(json.dumps({"seeds": "0-1", "settings": {"learning_rate": 0.1}}))
    with pytest.raises(SystemExit):
        load_sweep().main(["--registration", str(registered), "--output-dir", str(tmp_path)])
    assert "registers 'learning_rate', which is not a flag of the sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_sweep().main(["--registration", str(tmp_path / "missing.json")])
    assert "--registration: no file" in capsys.readouterr().err
    assert not list(tmp_path.glob("seed*.json"))  # nothing trained


def test_a_quick_chain_run_trains_the_18_token_answer_and_says_what_tgf_keeps(tmp_path, capsys):
    summary = demo.main(["--quick", "--task", "chain", "--spotlight", "false", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "8 of the answer's 18 (with <|im_end|>)" in printed  # ceil(0.4 x 18)
    assert summary["task"] == "chain" and summary["dynamic_sampling_reward"] == "chain_reward"
    # The banner shows the warm start's chain: 12 free words, then the sentence
    example = printed.split(f'{demo.QUESTION!r} -> "')[1].split('"')[0].split()
    assert set(example[: demo.CHAIN_LENGTH]) <= set(demo.CHAIN_WORDS)
    assert " ".join(example[demo.CHAIN_LENGTH :]) == "The shape is <random colour>."
    assert len(summary["rewards"]) == QUICK_STEPS


def test_the_sweep_reads_what_became_of_the_chain_from_the_spotlights(tmp_path):
    sweep = load_sweep()
    chain = " ".join(demo.CHAIN_WORDS[:12])
    completions = {
        "vppo": [f"{chain} The shape is red. so", "shape blue shape red The shape is blue"],
        "grpo": [" ".join(["then"] * 12) + " The shape is red", " ".join(["then"] * 11) + " The shape is red"],
    }
    for method, texts in completions.items():
        folder = tmp_path / "seed7" / ("spotlight" if method == "vppo" else f"{method}_spotlight")
        folder.mkdir(parents=True)
        (folder / "perception.json").write_text(json.dumps({"completions": [{"completion": t} for t in texts]}))
    args = sweep.SweepArguments(task="chain", output_dir=str(tmp_path))
    vppo, grpo = (sweep.chain_form(args, [7], method) for method in ("vppo", "grpo"))
    assert vppo == {"completions": 2, "chain_kept": 0.5, "colour_words": 2.0, "distinct_free_words": 6.0}
    assert grpo == {"completions": 2, "chain_kept": 0.5, "colour_words": 1.0, "distinct_free_words": 1.0}
    assert sweep.chain_form(args, [7, 8], "vppo") is None  # a seed without its spotlight
