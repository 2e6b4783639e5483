"""`vppo-trl eval`: metrics against hand-computed cases, tiny-model runs, resume, regrade, compare, vLLM, errors."""

import importlib.machinery
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vppo_trl import cli
from vppo_trl.data import INSTRUCTION_SUFFIX
from vppo_trl.testing import COLOURS, build_tiny_vlm, make_shape_image
from vppo_trl.tools.eval import (
    BENCHMARKS,
    EvalConfig,
    benchmark_metrics,
    compare,
    evaluate,
    majority_correct,
    paired_bootstrap,
    pass_at_k,
    regrade,
)
from vppo_trl.tools.eval.generation import VLLM_MISSING, VLLMBackend, vllm_engine_kwargs, vllm_sampling_kwargs

QUICK = ["--k", "2", "--max-new-tokens", "8", "--batch-size", "2", "--device", "cpu"]


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def test_pass_at_k_matches_hand_computed_values():
    # 5 samples, 2 correct: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@3 = 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(5, 2, 4) == 1.0  # any 4 of 5 samples include a correct one
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    with pytest.raises(ValueError, match="0 < k <= number of samples"):
        pass_at_k(4, 1, 5)


def test_majority_vote():
    assert majority_correct(["3", "3 ", "4", None], [1.0, 1.0, 0.0, 0.0]) == 1.0
    assert majority_correct(["4", "3", None, None], [0.0, 1.0, 0.0, 0.0]) == 0.0  # tie: the first answer wins
    assert majority_correct(["1 / 2", "5", "1/2"], [1.0, 0.0, 1.0]) == 1.0  # spaces do not split the vote
    assert majority_correct([None, None], [0.0, 0.0]) == 0.0


def test_benchmark_metrics_hand_computed():
    def samples(scores, answers, lengths):
        return [{"score": s, "extracted": a, "length": n} for s, a, n in zip(scores, answers, lengths, strict=True)]

    metrics = benchmark_metrics(
        {
            "p1": samples([1, 0, 1, 0], ["7", "8", "7", None], [10, 20, 30, 40]),
            "p2": samples([0, 0, 0, 1], ["2", "2", None, "9"], [5, 5, 5, 5]),
        },
        k=4,
    )
    assert metrics["problems"] == 2 and metrics["samples"] == 8
    assert metrics["avg@4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # pass@2: p1 1 - C(2,2)/C(4,2) = 5/6, p2 1 - C(3,2)/C(4,2) = 1/2
    assert metrics["pass@k"] == pytest.approx({"1": 0.375, "2": (5 / 6 + 1 / 2) / 2, "4": 1.0})
    assert metrics["maj@4"] == pytest.approx(0.5)  # p1 votes "7" (right), p2 votes "2" (wrong)
    assert metrics["no_boxed_share"] == pytest.approx(2 / 8)
    assert metrics["mean_length"] == pytest.approx(120 / 8)
    assert metrics["per_problem"] == {"p1": 0.5, "p2": 0.25}


def test_paired_bootstrap_hand_computed():
    # Same difference on every problem: every resample gives it, so the interval is that single value.
    per_benchmark, overall = paired_bootstrap([[0.0, 0.5, 0.25]], [[0.5, 1.0, 0.75]], resamples=500, seed=3)
    assert per_benchmark == [pytest.approx((0.5, 0.5, 0.5))] and overall == pytest.approx((0.5, 0.5, 0.5))
    # Two problems with differences 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so
    # the 2.5th and 97.5th percentiles are 0 and 1.
    per_benchmark, _ = paired_bootstrap([[1.0, 0.0]], [[1.0, 1.0]], resamples=4000, seed=0)
    assert per_benchmark == [pytest.approx((0.5, 0.0, 1.0))]
    # The same draws, by hand: rng.integers over (resamples, problems), benchmark after benchmark.
    rng = np.random.default_rng(11)
    first = np.array([0.0, 1.0, 0.0])[rng.integers(0, 3, size=(200, 3))].mean(axis=1)
    second = np.array([-1.0, 0.0])[rng.integers(0, 2, size=(200, 2))].mean(axis=1)
    per_benchmark, overall = paired_bootstrap([[0, 0, 1], [1, 0]], [[0, 1, 1], [0, 0]], resamples=200, seed=11)
    assert per_benchmark[0] == pytest.approx((1 / 3, *np.percentile(first, [2.5, 97.5])))
    assert per_benchmark[1] == pytest.approx((-0.5, *np.percentile(second, [2.5, 97.5])))
    assert overall == pytest.approx((-1 / 12, *np.percentile((first + second) / 2, [2.5, 97.5])))


# ----------------------------------------------------------------------------------------------------------------
# Runs on a tiny model
# ----------------------------------------------------------------------------------------------------------------


def write_paper_data(root: Path, names: dict[str, str], count: int, seed: int = 0) -> Path:
    """A folder in the layout of the paper's evaluation data: dataset_info.json, ShareGPT files, images/."""
    rng = random.Random(seed)
    data = root / "vppo-eval" / "data"
    (data / "images").mkdir(parents=True)
    (data / "papo").mkdir()
    info = {}
    for name, kind in names.items():
        records = []
        for index in range(count):
            colour = rng.choice(COLOURS)
            make_shape_image(colour, rng).save(data / "images" / f"{name}_{index}.png")
            question = "<image>What colour is the shape?" if kind == "open" else "<image>Which? A. red B. blue"
            answer = colour if kind == "open" else "B"
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            records.append({"messages": messages, "images": [f"images/{name}_{index}.png"]})
        (data / "papo" / f"{name}.json").write_text(json.dumps(records))
        info[name] = {"file_name": f"papo/{name}.json", "formatting": "sharegpt", "columns": {"messages": "messages"}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    return data


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A saved tiny Qwen2.5-VL, paper-layout data for two benchmarks, and a training-layout JSON Lines file."""
    root = tmp_path_factory.mktemp("eval")
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    write_paper_data(root, {"hiyouga_geometry3k": "open", "MMMU_MMMU_Pro": "letter"}, count=5)
    rng = random.Random(1)
    (root / "local" / "imgs").mkdir(parents=True)
    with (root / "local" / "colours.jsonl").open("w") as handle:
        for index in range(3):
            colour = rng.choice(COLOURS)
            make_shape_image(colour, rng).save(root / "local" / "imgs" / f"{index}.png")
            handle.write(json.dumps({"problem": "What colour?", "answer": colour, "images": [f"imgs/{index}.png"]}))
            handle.write("\n")
    return root


def run_cli(argv: list[str]) -> None:
    cli.main(["eval", *argv])


def paper_run(workspace: Path, output: Path, *extra: str) -> None:
    data_root = str(workspace / "vppo-eval" / "data")
    run_cli(["--model", str(workspace / "model"), "--benchmarks", "geo3k,mmmu_pro", "--data-root", data_root,
             "--output-dir", str(output), *QUICK, *extra])  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_every_output_with_consistent_numbers(workspace, tmp_path, capsys):
    paper_run(workspace, tmp_path / "run", "--data", str(workspace / "local" / "colours.jsonl"))
    printed = capsys.readouterr().out
    assert "| Geo3k | 5 |" in printed and "| MMMU-Pro | 5 |" in printed and "| colours | 3 |" in printed
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert len(samples) == (5 + 5 + 3) * 2 and not list((tmp_path / "run").glob("samples.part*"))
    assert list(results["benchmarks"]) == ["geo3k", "mmmu_pro", "colours"]
    for name, metrics in results["benchmarks"].items():
        mine = [s for s in samples if s["benchmark"] == name]
        assert metrics["avg@2"] == pytest.approx(sum(s["score"] for s in mine) / len(mine))
        assert metrics["mean_length"] == pytest.approx(sum(s["length"] for s in mine) / len(mine))
        assert 0 < metrics["mean_length"] <= 8
    mean = sum(m["avg@2"] for m in results["benchmarks"].values()) / 3
    assert results["mean"]["avg@2"] == pytest.approx(mean)
    assert {s["answer"] for s in samples if s["benchmark"] == "mmmu_pro"} == {"B"}
    assert results["settings"]["min_pixels"] == 200_704 and results["settings"]["k"] == 2
    assert (tmp_path / "run" / "results.md").read_text().startswith("| benchmark | problems | avg@2 |")
    assert Image.open(tmp_path / "run" / "results.png").size[0] > 200


def test_prompt_images_and_grader_are_the_training_ones(workspace, tmp_path, monkeypatch):
    """The model sees build_prompt's prompt and images fitted to the pixel limits; scores come from the reward."""
    from vppo_trl.tools.eval import generation

    seen = {}

    def fake_generate(self, prompts, images, k, seed):
        seen.setdefault("prompts", []).extend(prompts)
        seen.setdefault("sizes", []).extend(image.size for problem in images for image in problem)
        return [[generation.Completion("<think>x</think> \\boxed{B}", 5)] * k for _ in prompts]

    monkeypatch.setattr(generation.HFBackend, "generate", fake_generate)
    paper_run(workspace, tmp_path / "run", "--max-pixels", "1024", "--min-pixels", "none")
    content = seen["prompts"][0][0]["content"]
    assert content[0] == {"type": "image", "text": None}
    assert content[1]["text"] == "What colour is the shape?\n\n" + INSTRUCTION_SUFFIX
    assert all(width * height <= 1024 for width, height in seen["sizes"])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["benchmarks"]["mmmu_pro"]["avg@2"] == 1.0  # gold "B", answer \boxed{B}
    assert results["benchmarks"]["geo3k"]["avg@2"] == 0.0 and results["mean"]["avg@2"] == 0.5


def test_regrade_gives_the_run_and_follows_edited_samples(workspace, tmp_path):
    output = tmp_path / "run"
    paper_run(workspace, output)
    original = json.loads((output / "results.json").read_text())
    run_cli(["--regrade", "--output-dir", str(output)])
    assert json.loads((output / "results.json").read_text()) == original
    # A completion changed on disk is graded again: the first geo3k sample now answers right.
    samples = read_jsonl(output / "samples.jsonl")
    samples[0]["completion"] = f"<think>look</think> \\boxed{{{samples[0]['answer']}}}"
    (output / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    results = regrade(str(output))
    first = results["benchmarks"]["geo3k"]
    assert first["per_problem"]["0"] == pytest.approx(original["benchmarks"]["geo3k"]["per_problem"]["0"] + 0.5)
    assert read_jsonl(output / "samples.jsonl")[0]["extracted"] == samples[0]["answer"]


def test_interrupted_run_resumes_to_the_same_results(workspace, tmp_path, warm_python):
    """A real process killed with SIGKILL half-way, restarted, ends with the uninterrupted run's results."""
    write_paper_data(tmp_path, {"hiyouga_geometry3k": "open"}, count=24, seed=5)
    command = ["-m", "vppo_trl.tools.eval", "--model", str(workspace / "model"), "--benchmarks", "geo3k",
               "--data-root", str(tmp_path / "vppo-eval" / "data"), "--k", "2", "--max-new-tokens", "48",
               "--batch-size", "1", "--device", "cpu"]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1"}
    assert warm_python.run([*command, "--output-dir", str(tmp_path / "straight")], tmp_path / "straight.log", env) == 0

    interrupted = tmp_path / "interrupted"
    process = warm_python.start([*command, "--output-dir", str(interrupted)], tmp_path / "killed.log", env)
    part = interrupted / "samples.part0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.exitcode is None:
        if part.is_file() and len(part.read_text().splitlines()) >= 6:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL
    written = len(part.read_text().splitlines())
    assert not (interrupted / "results.json").exists() and 6 <= written < 48, written

    resumed_log = tmp_path / "resumed.log"
    assert warm_python.run([*command, "--output-dir", str(interrupted)], resumed_log, env) == 0, (
        resumed_log.read_text()
    )
    progress = resumed_log.read_text().split("Evaluating:")[1]
    assert f"/{24 - written // 2}" in progress  # only the problems missing after the kill were generated
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert json.loads((interrupted / "results.json").read_text()) == straight
    assert (interrupted / "samples.jsonl").read_text() == (tmp_path / "straight" / "samples.jsonl").read_text()


@pytest.mark.slow
def test_accelerate_launch_shards_problems_and_matches_one_process(workspace, tmp_path):
    """Two processes (`accelerate launch`, gloo on CPU) share the chunks and draw the samples one process draws."""
    data_root = str(workspace / "vppo-eval" / "data")
    arguments = ["--model", str(workspace / "model"), "--benchmarks", "geo3k,mmmu_pro", "--data-root", data_root,
                 "--k", "2", "--max-new-tokens", "8", "--batch-size", "2"]  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(port), "-m", "vppo_trl.tools.eval"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*launch, *arguments, "--output-dir", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("| **mean** |") == 1  # the main process reports
    # 6 chunks of at most 2 problems (5 + 5 problems), every other one on the first process: 2 + 1 + 2 problems
    assert "| 5/5 [" in two.stderr and "/10 [" not in two.stderr
    paper_run(workspace, tmp_path / "one", "--batch-size", "2")
    for name in ("samples.jsonl", "results.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


def test_checkpoint_generation_config_does_not_override_the_protocol(workspace, tmp_path):
    """Qwen2.5-VL ships top_k=1, top_p=0.001: with it, k samples would be one. The protocol's sampling wins."""
    import shutil

    from transformers import GenerationConfig

    shutil.copytree(workspace / "model", tmp_path / "model")
    greedy = GenerationConfig.from_pretrained(tmp_path / "model")
    greedy.update(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05)
    greedy.save_pretrained(tmp_path / "model")
    local = str(workspace / "local" / "colours.jsonl")
    run_cli(["--model", str(tmp_path / "model"), "--data", local, "--output-dir", str(tmp_path / "run"), "--k", "4",
             "--max-new-tokens", "6", "--device", "cpu"])  # fmt: skip
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    for problem in {s["problem_id"] for s in samples}:
        assert len({s["completion"] for s in samples if s["problem_id"] == problem}) > 1


def test_python_api(workspace, tmp_path):
    config = EvalConfig(model=str(workspace / "model"), data=[str(workspace / "local" / "colours.jsonl")],
                        output_dir=str(tmp_path / "api"), k=3, max_new_tokens=4, device="cpu")  # fmt: skip
    results = evaluate(config)
    assert results["benchmarks"]["colours"]["samples"] == 9 and set(results["mean"]["pass@k"]) == {"1", "2", "3"}
    greedy = evaluate(EvalConfig(**{**vars(config), "k": 1, "temperature": 0.0, "output_dir": str(tmp_path / "g")}))
    assert greedy["benchmarks"]["colours"]["samples"] == 3 and greedy["settings"]["temperature"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------------------------


def write_results(path: Path, per_problem: dict[str, dict[str, float]]) -> str:
    benchmarks = {name: {"title": name.upper(), "per_problem": scores} for name, scores in per_problem.items()}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"k": 2, "benchmarks": benchmarks}))
    return str(path / "results.json")


def test_compare_hand_computed(tmp_path, capsys):
    base = write_results(tmp_path / "grpo", {"a": {"1": 0.0, "2": 1.0, "3": 0.5}, "b": {"1": 1.0, "2": 0.0}})
    # b: one problem fewer on this side, only the common ones count; differences a: +0.5 each, b: [0, 1] -> 0.5
    vppo = write_results(tmp_path / "vppo", {"a": {"1": 0.5, "2": 1.5, "3": 1.0}, "b": {"1": 1.0, "2": 1.0}})
    report = compare([base, vppo], resamples=4000, seed=0)
    rows = {row["benchmark"]: row for row in report["comparisons"][0]["rows"]}
    assert report["comparisons"][0]["baseline"] == "grpo" and report["comparisons"][0]["candidate"] == "vppo"
    assert (rows["a"]["difference"], rows["a"]["low"], rows["a"]["high"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (rows["b"]["difference"], rows["b"]["low"], rows["b"]["high"]) == pytest.approx((0.5, 0.0, 1.0))
    # mean of (0.5, x) with x in {0, 1/2, 1}: 1/4 each end
    assert (rows["mean"]["difference"], rows["mean"]["low"], rows["mean"]["high"]) == pytest.approx((0.5, 0.25, 0.75))
    cli.main(["eval", "compare", base, vppo, "--output-dir", str(tmp_path / "cmp"), "--labels", "GRPO,VPPO"])
    printed = capsys.readouterr().out
    assert "| A | 3 | 50.0 | 100.0 | +50.0 | [+50.0, +50.0] |" in printed
    assert "| Mean | 5 | 50.0 | 100.0 | +50.0 | [+25.0, +75.0] |" in printed
    assert Image.open(tmp_path / "cmp" / "compare.png").size[0] > 200
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["comparisons"][0]["candidate"] == "VPPO"


# ----------------------------------------------------------------------------------------------------------------
# vLLM
# ----------------------------------------------------------------------------------------------------------------


def test_vllm_arguments():
    assert vllm_engine_kwargs("m", tensor_parallel_size=4, max_model_len=8192, seed=3) == {
        "model": "m", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.9, "dtype": "auto", "seed": 3,
        "limit_mm_per_prompt": {"image": 8}, "max_model_len": 8192,
    }  # fmt: skip
    assert vllm_sampling_kwargs(8, temperature=1.0, top_p=0.99, max_new_tokens=2048, seed=5) == {
        "n": 8, "temperature": 1.0, "top_p": 0.99, "top_k": -1, "repetition_penalty": 1.0, "max_tokens": 2048,
        "seed": 5,
    }  # fmt: skip
    with pytest.raises(ValueError, match="tensor-parallel-size"):
        vllm_engine_kwargs("m", tensor_parallel_size=0)


def test_vllm_missing_is_one_clear_line(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail, installed or not
    with pytest.raises(RuntimeError) as error:
        VLLMBackend(None, {"model": "m"}, temperature=1.0, top_p=1.0, max_new_tokens=8)
    assert str(error.value) == VLLM_MISSING
    with pytest.raises(SystemExit):
        paper_run(workspace, tmp_path / "run", "--backend", "vllm", "--tensor-parallel-size", "2")
    assert capsys.readouterr().err == f"vppo-trl eval: error: {VLLM_MISSING}\n"


def test_vllm_backend_plumbing_with_a_stand_in_engine(workspace, tmp_path, monkeypatch):
    """What reaches vLLM: the engine arguments, one seeded request per problem with its images, k samples each."""
    calls = {}

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def generate(self, requests, params, use_tqdm):
            calls.setdefault("requests", []).extend(requests)
            calls.setdefault("params", []).extend(params)
            output = types.SimpleNamespace(text="\\boxed{B}", token_ids=[1, 2, 3])
            return [types.SimpleNamespace(outputs=[output] * p["n"]) for p in params]

    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM, vllm.SamplingParams = LLM, dict
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    paper_run(workspace, tmp_path / "run", "--backend", "vllm", "--tensor-parallel-size", "2", "--seed", "4")
    assert calls["engine"]["model"] == str(workspace / "model") and calls["engine"]["tensor_parallel_size"] == 2
    assert len(calls["requests"]) == 10 and all(len(r["multi_modal_data"]["image"]) == 1 for r in calls["requests"])
    assert "<|vision_start|><|image_pad|><|vision_end|>What colour" in calls["requests"][0]["prompt"]
    assert {p["n"] for p in calls["params"]} == {2} and len({p["seed"] for p in calls["params"]}) == 10
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["benchmarks"]["mmmu_pro"]["avg@2"] == 1.0 and results["mean"]["mean_length"] == 3


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def error_of(argv: list[str], capsys) -> str:
    capsys.readouterr()  # drop what earlier steps printed
    with pytest.raises(SystemExit) as exit_info:
        run_cli(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1, message  # one line, no traceback
    return message


def test_bad_input_messages(workspace, tmp_path, capsys):
    model = str(workspace / "model")
    message = error_of(["--model", model, "--benchmarks", "geo3k,mathvison", "--output-dir", str(tmp_path)], capsys)
    assert "Unknown benchmark(s) ['mathvison']" in message and "Did you mean 'mathvision'" in message
    assert all(name in message for name in BENCHMARKS)
    message = error_of(["--model", "./nowhere/model", "--benchmarks", "geo3k", "--output-dir", str(tmp_path)], capsys)
    assert message == "vppo-trl eval: error: Model folder './nowhere/model' does not exist.\n"
    data_root = str(workspace / "vppo-eval" / "data")
    message = error_of(["--model", model, "--benchmarks", "wemath", "--data-root", data_root, "--output-dir",
                        str(tmp_path)], capsys)  # fmt: skip
    assert "has no entry for benchmark 'wemath'" in message and "'hiyouga_geometry3k'" in message
    message = error_of(["--model", model, "--benchmarks", "wemath", "--output-dir", str(tmp_path)], capsys)
    assert "has no Hub source in the training layout" in message and "--data-root" in message
    message = error_of(["--model", model, "--output-dir", str(tmp_path)], capsys)
    assert "Nothing to evaluate" in message
    local = str(workspace / "local" / "colours.jsonl")
    message = error_of(
        ["--model", model, "--data", local, "--data", local, "--output-dir", str(tmp_path / "o")], capsys
    )
    assert "named 'colours'" in message
    message = error_of(["--model", model, "--data", "my_benchmrk.jsonl", "--output-dir", str(tmp_path)], capsys)
    assert message == "vppo-trl eval: error: Data file or folder 'my_benchmrk.jsonl' does not exist.\n"
    message = error_of(["--regrade", "--output-dir", str(tmp_path / "empty")], capsys)
    assert "holds no evaluation run" in message


def test_bad_rows_are_reported_by_index(workspace, tmp_path, capsys):
    rows = [{"problem": "What colour?", "answer": "red", "images": [str(workspace / "local" / "imgs" / "0.png")]},
            {"problem": "What colour?", "answer": None, "images": [str(workspace / "local" / "imgs" / "0.png")]},
            {"problem": "What colour?", "answer": "red", "images": ["missing.png"]}]  # fmt: skip
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--model", str(workspace / "model"), "--data", str(tmp_path / "bad.jsonl"), "--output-dir",
            str(tmp_path / "run"), *QUICK]  # fmt: skip
    with pytest.raises(SystemExit):
        run_cli(argv)
    message = capsys.readouterr().err
    assert "row 1, field 'answer': missing answer (None)" in message
    assert "row 2, field 'images[0]': cannot read image 'missing.png'" in message
    run_cli([*argv, "--on-bad-row", "skip"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["benchmarks"]["bad"]["problems"] == 1


def test_resume_refuses_other_settings(workspace, tmp_path, capsys):
    paper_run(workspace, tmp_path / "run", "--max-problems", "1")
    message = error_of(["--model", str(workspace / "model"), "--benchmarks", "geo3k,mmmu_pro", "--data-root",
                        str(workspace / "vppo-eval" / "data"), "--output-dir", str(tmp_path / "run"), *QUICK,
                        "--max-problems", "1", "--temperature", "0.7"], capsys)  # fmt: skip
    assert "temperature: 1.0 -> 0.7" in message and "another --output-dir" in message


def test_registry_covers_the_paper_table():
    assert [b.title for b in BENCHMARKS.values()] == [
        "Geo3k", "We-Math", "MMK12", "MathVerse", "MathVision", "DynaMath", "LogicVista", "MMMU-Pro",
    ]  # fmt: skip
    assert all(b.source.count("/") == 1 and b.evidence for b in BENCHMARKS.values())
    assert [b.name for b in BENCHMARKS.values() if b.hub is not None] == ["geo3k", "mmk12"]


def test_hub_route_without_connection_is_one_line(workspace, tmp_path, monkeypatch, capsys):
    from vppo_trl.tools.eval import benchmarks

    def offline(source, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{source}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(benchmarks, "load_vppo_dataset", offline)
    message = error_of(["--model", str(workspace / "model"), "--benchmarks", "geo3k", "--output-dir", str(tmp_path)],
                       capsys)  # fmt: skip
    assert "Couldn't reach 'hiyouga/geometry3k'" in message and "pass --data-root" in message


def test_adapter_is_merged(workspace, tmp_path):
    """A LoRA adapter changes the samples; the base run and the adapter run differ only by it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(workspace / "model")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # random, not a no-op
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    paper_run(workspace, tmp_path / "base", "--max-problems", "2")
    paper_run(workspace, tmp_path / "lora", "--max-problems", "2", "--adapter", str(tmp_path / "adapter"))
    completions = [[s["completion"] for s in read_jsonl(tmp_path / run / "samples.jsonl")] for run in ("base", "lora")]
    assert len(completions[0]) == len(completions[1]) == 8 and completions[0] != completions[1]
    assert json.loads((tmp_path / "lora" / "results.json").read_text())["settings"]["adapter"] == str(
        tmp_path / "adapter"
    )
