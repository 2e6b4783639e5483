"""The training entry point as users run it: a recipe plus overrides, then the saved model, LoRA, the Hub, the CLI."""

import random
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from huggingface_hub import HfApi, RepoUrl
from peft import PeftModel
from processes import free_port  # the tests folder is on sys.path
from transformers import AutoModelForImageTextToText, AutoProcessor

from vppo_trl import cli
from vppo_trl import data as data_module
from vppo_trl import train as train_module
from vppo_trl.method.model_card import SECTION_BEGIN
from vppo_trl.testing import make_shape_image
from vppo_trl.train import _load, main, make_parser

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CPU_DEMO = RECIPES / "cpu_demo.yaml"
LORA_REGEX = yaml.safe_load((RECIPES / "qwen2_5_vl_3b_lora_single_gpu.yaml").read_text())["lora_target_modules"][0]
# Two optimizer steps of 2 prompts x 4 completions: enough to run every part of the pipeline.
QUICK = ["--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4"]
HUB_DATASET = "tiny-org/ViRL-mini"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The model and data of recipes/cpu_demo.yaml, made by the command in its header, as a user would."""
    folder = tmp_path_factory.mktemp("workspace")
    command = CPU_DEMO.read_text().split("#   vppo-trl ", 1)[1].split("\n", 1)[0].split()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        cli.main(command)
    return folder


@pytest.fixture(autouse=True)
def in_workspace(workspace, monkeypatch):
    """Run from the folder the recipe's relative paths point to; keep `sys.path` as it was (reward imports)."""
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "path", list(sys.path))


def merged_log(trainer) -> dict:
    log = {}
    for entry in trainer.state.log_history:
        log.update(entry)
    return log


def assert_card_has_vppo_section(folder: Path) -> str:
    card = (folder / "README.md").read_text()
    assert SECTION_BEGIN in card and card.count(SECTION_BEGIN) == 1
    assert "arxiv.org/abs/2510.09285" in card
    return card


def test_cpu_demo_recipe_trains_saves_and_reloads(workspace, tmp_path):
    output_dir = tmp_path / "cpu-demo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = main(["--config", str(CPU_DEMO), *QUICK, "--output_dir", str(output_dir)])
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]  # no deprecation notices

    # The command line won over the recipe
    assert trainer.args.max_steps == 2 and trainer.state.global_step == 2 and trainer.args.num_generations == 4
    assert trainer.args.entropy_penalty_coef == 0.06  # from the recipe
    log = merged_log(trainer)
    assert log["data/train_rows"] == 256 and log["data/train_rows_skipped"] == 0
    assert 0 < log["vppo/token_fraction"] < 1  # the perturbed pass ran and TGF dropped some tokens
    assert "vppo/entropy_penalty" in log

    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"):
        assert (output_dir / name).is_file(), name
    card = assert_card_has_vppo_section(output_dir)
    assert "This model is a fine-tuned version of the local model `./tiny-qwen2.5-vl`" in card  # not "[None]"
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir)
    assert type(reloaded) is type(trainer.model)
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, msg=name)
    assert AutoProcessor.from_pretrained(output_dir).image_processor is not None


@pytest.fixture
def virl_layout(tmp_path, monkeypatch) -> Path:
    """A Hub dataset in ViRL39K's layout (question, \\boxed{} answer, image paths into its images folder), with one
    row whose image is missing, served by a patched `load_dataset`; and an MMK12-like local eval file."""
    colours = ["red", "green", "blue", "yellow"]
    images = tmp_path / "ViRL39K" / "images"
    images.mkdir(parents=True)
    rng = random.Random(0)
    rows = {"question": [], "answer": [], "image": [], "category": []}
    for index, colour in enumerate(colours):
        make_shape_image(colour, rng).save(images / f"{index}.png")
        rows["question"].append("<image>What colour is the shape?")
        rows["answer"].append(f"\\boxed{{{colour}}}")
        rows["image"].append([f"images/{index}.png"])
        rows["category"].append("colour")
    rows["question"].append("<image>And this one?")
    rows["answer"].append("\\boxed{red}")
    rows["image"].append(["images/missing.png"])
    rows["category"].append("colour")
    virl = Dataset.from_dict(rows)

    real_load_dataset = data_module.load_dataset

    def load_dataset(path, *args, **kwargs):
        return virl if path == HUB_DATASET else real_load_dataset(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "load_dataset", load_dataset)
    monkeypatch.setattr(train_module, "_hub_problem", lambda name, repo_type: None)  # "on the Hub"
    mmk12 = {"question": ["What colour?", "Which colour?"], "answer": ["red", "blue"]}
    mmk12["image"] = [make_shape_image("red", rng), make_shape_image("blue", rng)]
    Dataset.from_dict(mmk12).to_parquet(str(tmp_path / "mmk12.parquet"))
    return tmp_path


@pytest.fixture
def hub(monkeypatch) -> list[dict]:
    """Capture what the Trainer would create and upload on the Hub, which these tests cannot reach."""
    pushes = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/someone/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
        folder = Path(folder_path)
        files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        readme = (folder / "README.md").read_text() if (folder / "README.md").is_file() else None
        pushes.append({"repo_id": repo_id, "files": files, "readme": readme, "message": commit_message})

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return pushes


def test_virl39k_layout_with_eval_skipped_rows_and_push(virl_layout, hub, tmp_path):
    output_dir = tmp_path / "run"
    trainer = main(
        [
            "--config", str(CPU_DEMO), *QUICK, "--output_dir", str(output_dir),
            "--dataset_name", HUB_DATASET, "--problem_column", "question", "--images_column", "image",
            "--image_root", str(virl_layout / "ViRL39K"), "--on_bad_row", "skip",
            "--reward_funcs", "accuracy", "vppo_trl.testing.colour_reward", "--reward_weights", "1.0", "0.5",
            "--eval_strategy", "steps", "--eval_steps", "2", "--eval_dataset_name", str(virl_layout / "mmk12.parquet"),
            "--per_device_eval_batch_size", "4", "--max_eval_rows", "2",
            "--push_to_hub", "true", "--hub_model_id", "tiny-vppo",
        ]
    )  # fmt: skip

    log = merged_log(trainer)
    assert (log["data/train_rows"], log["data/train_rows_skipped"]) == (5, 1)
    assert (log["data/eval_rows"], log["data/eval_rows_skipped"]) == (2, 0)
    assert "rewards/accuracy_reward/mean" in log and "rewards/colour_reward/mean" in log
    assert "eval_reward" in log
    assert "answer" in trainer.train_dataset.column_names and len(trainer.train_dataset) == 4

    assert trainer.hub_model_id == "someone/tiny-vppo"
    final = hub[-1]
    assert final["repo_id"] == "someone/tiny-vppo" and final["message"] == "End of training"
    assert "model.safetensors" in final["files"] and "README.md" in final["files"]
    assert not any(name.startswith("checkpoint-") for name in final["files"])
    assert f"[{HUB_DATASET}](https://huggingface.co/datasets/{HUB_DATASET})" in final["readme"]
    assert "- vppo" in final["readme"] and SECTION_BEGIN in final["readme"]


def test_lora_adapter_reloads_and_merges(workspace, tmp_path):
    output_dir = tmp_path / "lora"
    trainer = main(
        ["--config", str(CPU_DEMO), *QUICK, "--output_dir", str(output_dir), "--use_peft", "true"]
        + ["--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", LORA_REGEX]
    )
    assert (output_dir / "adapter_config.json").is_file() and (output_dir / "adapter_model.safetensors").is_file()
    assert not (output_dir / "model.safetensors").exists()
    assert_card_has_vppo_section(output_dir)
    assert merged_log(trainer)["data/train_rows"] == 256

    base = AutoModelForImageTextToText.from_pretrained(workspace / "tiny-qwen2.5-vl")
    model = PeftModel.from_pretrained(base, output_dir)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if name.endswith(".lora_A")}
    assert adapted and all(".language_model." in name for name in adapted)  # the vision tower stays frozen
    input_ids = torch.tensor([[10, 20, 30, 40, 50]])
    with torch.no_grad():
        adapter_logits = model(input_ids=input_ids).logits
    merged_dir = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids).logits, adapter_logits)


def test_console_script_lists_the_subcommands():
    script = Path(sys.executable).with_name("vppo-trl")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "usage: vppo-trl" in result.stdout
    assert "train" in result.stdout and "demo" in result.stdout


def test_train_help_lists_the_recipe_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vppo-trl train")
    assert "  --config RECIPE.yaml  YAML recipe whose keys set the fields below" in out  # an option, not only prose
    for flag in ("--config", "--dataset_name", "--reward_funcs", "--token_filter_ratio", "--lora_r", "--use_vllm"):
        assert flag in out


def test_demo_is_forwarded(monkeypatch):
    calls = []
    demo = types.SimpleNamespace(main=lambda argv, prog: calls.append((argv, prog)))
    monkeypatch.setitem(sys.modules, "vppo_trl.tools.demo", demo)
    cli.main(["demo", "--steps", "3", "--output-dir", "out"])
    assert calls == [(["--steps", "3", "--output-dir", "out"], "vppo-trl demo")]


def test_demo_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vppo-trl demo") and "--compare {grpo}" in out


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "required: command" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--token_filter_ratio", "1.5"], "token_filter_ratio=1.5 must be in (0, 1]"),
        (["--reward_funcs", "accuracy", "acuracy"], "Unknown reward function(s) ['acuracy']"),
        (["--reward_funcs", "my_rewards.nothing"], "Cannot load reward function 'my_rewards.nothing'"),
        (["--reward_weights", "1.0", "2.0"], "reward_weights has 2 values but there are 1 reward functions"),
        (["--eval_strategy", "steps"], "eval_strategy='steps' needs an eval_dataset_name"),
        (["--dataset_name", "./missing.jsonl"], "Dataset './missing.jsonl' does not exist"),
        (["--min_pixels", "1000", "--max_pixels", "10"], "min_pixels=1000 must not exceed max_pixels=10"),
    ],
)
def test_bad_values_end_with_a_one_line_error(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(CPU_DEMO), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"vppo-trl train: error: {message}" in err
    assert "Traceback" not in err and "usage:" not in err


def test_pixel_limits_reach_the_loaded_images(tmp_path):
    make_shape_image("red", random.Random(0)).resize((100, 100)).save(tmp_path / "small.png")
    (tmp_path / "train.jsonl").write_text('{"problem": "Colour?", "answer": "red", "images": ["small.png"]}\n')
    script_args, _, _ = make_parser().parse_args_and_config(
        ["--config", str(CPU_DEMO), "--min_pixels", "200704", "--max_pixels", "1003520"]
    )
    dataset, _ = _load(script_args, str(tmp_path / "train.jsonl"), "train", None)
    assert dataset[0]["images"][0].size == (447, 447)


def test_unknown_recipe_key(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(CPU_DEMO.read_text() + "token_filter_ration: 0.5\n")
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(recipe)])
    assert "unknown recipe key 'token_filter_ration' (did you mean 'token_filter_ratio'?)" in capsys.readouterr().err


def test_missing_model_folder_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no tiny-qwen2.5-vl here
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(CPU_DEMO)])
    err = capsys.readouterr().err
    assert "Model folder './tiny-qwen2.5-vl' does not exist" in err and "recipes/cpu_demo.yaml" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_recipe_file(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", "no-such-recipe.yaml"])
    assert "No such file or directory: 'no-such-recipe.yaml'" in capsys.readouterr().err


def test_resume_from_the_command_line(tmp_path):
    """`--resume_from_checkpoint true` continues from the newest complete checkpoint of --output_dir."""
    output_dir = tmp_path / "run"
    common = ["--config", str(CPU_DEMO), *QUICK, "--output_dir", str(output_dir), "--save_strategy", "steps"]
    first = main([*common, "--save_steps", "1", "--seed", "1"])
    losses = [entry["loss"] for entry in first.state.log_history if "loss" in entry]
    # Another seed: a run that started afresh instead of resuming would log other losses for steps 1 and 2.
    resumed = main([*common, "--max_steps", "3", "--seed", "2", "--resume_from_checkpoint", "true"])
    assert resumed.state.global_step == 3
    assert [entry["loss"] for entry in resumed.state.log_history if "loss" in entry][:2] == losses


@pytest.mark.parametrize("override", [[], ["--gradient_checkpointing", "true"]])
def test_recipe_parses_without_a_deprecation_warning(override):
    from vppo_trl.train import parse_args

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, training_args, _ = parse_args(["--config", str(CPU_DEMO), *override])
    expected = bool(override)  # the recipe turns it off, the override back on
    assert training_args.gradient_checkpointing is expected
    assert getattr(training_args, "activation_checkpointing", expected) is expected


@pytest.mark.slow
def test_two_process_cpu_runs_of_the_command_exit_cleanly(workspace, tmp_path):
    """`vppo-trl train` on two CPU processes (gloo) exits 0 after a successful run, 5 launches in a row: it used to
    abort at exit now and then ("terminate called without an active exception"), see `exit_cleanly`."""
    for launch in range(5):
        output_dir = tmp_path / f"run-{launch}"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "vppo_trl.cli", "train", "--config", str(CPU_DEMO),
            "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4",
            "--max_train_rows", "16", "--output_dir", str(output_dir),
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, f"launch {launch}:\n{completed.stdout[-3000:]}{completed.stderr[-6000:]}"
        assert "terminate called" not in completed.stderr, f"launch {launch}:\n{completed.stderr[-6000:]}"
        assert (output_dir / "model.safetensors").is_file()  # the run got to its end: trained and saved
