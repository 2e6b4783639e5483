"""The 32B recipe's two-machine launch, as docs/training.md gives it, run on two machines simulated on this one.

The test reads the two `accelerate launch` commands of the doc's "Two machines" section and starts them side by side
(one process per machine, CPU, gloo, DeepSpeed ZeRO-3 from recipes/accelerate/zero3.yaml), changing only what this
CPU needs and overriding the recipe's model, data and scale on the command line. One pair of launches trains 2 steps
with a checkpoint after each; a second pair resumes from its step-1 checkpoint, in another folder, to step 2. Both
must end with the same gathered weights, every tensor. Machine 1's process gets only text-only prompts (it keeps in
step under ZeRO-3 by running the vision tower on a blank image, vppo_trl/longrun/imageless.py), and the prompts each
process trained on are recorded by the reward (tests/scripts/prompt_log_reward.py) and checked.
"""

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from processes import TORCH_EXTENSIONS_DIR, free_port
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from vppo_trl.testing import COLOURS, build_tiny_vlm, make_shape_image

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
DOC = ROOT / "docs" / "training.md"
DOC_SECTION = "### Two machines: the 32B recipe"
RECIPE = "recipes/qwen2_5_vl_32b_paper.yaml"
OUTPUT_DIR = "runs/Qwen2.5-VL-32B-VPPO"  # the recipe's output_dir, relative to where the commands start
ADDRESS = "MACHINE_0_ADDRESS"  # the doc's placeholder for machine 0's address
DOCUMENTED_PORT = "29500"

# Launch flags added in front of the doc's: the CPU trains in float32 (zero3.yaml asks for bf16).
ADDED_LAUNCH_FLAGS = ["--mixed_precision", "no"]
# The recipe's values overridden after the doc's command, and why.
RECIPE_OVERRIDES = {
    "model_name_or_path": "./tiny-qwen2.5-vl",  # a tiny random Qwen2.5-VL, as `vppo-trl tiny` writes it
    "dataset_name": "./tiny-virl39k.parquet",  # ViRL39K's layout (question, answer, image paths under ViRL39K/)
    # CPU, in float32. Without use_cpu, accelerate finds no GPU backend and counts each process as a world of one, and
    # DeepSpeed refuses the batch size computed from it (16 != 8 * 2 * 2).
    "use_cpu": "true",
    "dtype": "float32",
    "bf16": "false",
    "use_vllm": "false",  # no vLLM on a CPU
    "eval_strategy": "no",  # MMK12 is on the Hub, which the tests do not reach
    "report_to": "none",
    "push_to_hub": "false",
    "max_steps": "2",  # 2 steps, a checkpoint after each
    "save_steps": "1",
    # 4 prompts of 8 completions per step, 2 per process, in 2 accumulated micro-batches
    "per_device_train_batch_size": "8",
    "gradient_accumulation_steps": "2",
    "generation_batch_size": "32",
    "max_completion_length": "4",
    # Records each process's prompts; its rewards vary within every group, so that dynamic sampling keeps them all
    # (a random model never earns the accuracy reward, and dynamic sampling would then draw more prompts).
    "reward_funcs": "prompt_log_reward.prompt_log_reward",
    "dynamic_sampling_reward": "total",
    "shuffle_dataset": "false",  # the data in order: machine 1's process gets the text-only rows
}
STEPS = 2
PROMPTS_PER_PROCESS = 2
ROWS = 16  # 2 steps train on the first 8: the others show that dynamic sampling drew no more
# Each process's batch in a step: 2 image rows for the first process, 2 text-only rows for the second.
ROW_PATTERN = ("image", "image", "text", "text")
LAUNCH_TIMEOUT_S = 900


def documented_commands() -> list[list[str]]:
    """The `accelerate launch` commands of the doc's two-machine section, split into arguments."""
    section = DOC.read_text().split(DOC_SECTION, 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def replaced(command: list[str], flag: str, documented: str, tested: str) -> list[str]:
    """`command` with `flag`'s value, which must be `documented`, replaced by `tested`."""
    assert flag_value(command, flag) == documented, f"the doc's {flag} is {flag_value(command, flag)}"
    position = command.index(flag) + 1
    return [*command[:position], tested, *command[position + 1 :]]


def command_run_here(documented: list[str], port: int, *extra: str) -> list[str]:
    """The doc's command with this CPU's substitutions: 1 process per machine, this machine's address and a free port,
    float32; the recipe's model, data and scale overridden after it, then `extra` arguments."""
    assert documented[:2] == ["accelerate", "launch"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *ADDED_LAUNCH_FLAGS, *documented[2:]]
    command = replaced(command, "--num_processes", "16", "2")
    command = replaced(command, "--main_process_ip", ADDRESS, "127.0.0.1")
    command = replaced(command, "--main_process_port", DOCUMENTED_PORT, str(port))
    overrides = [argument for key, value in RECIPE_OVERRIDES.items() for argument in (f"--{key}", value)]
    return [*command, *overrides, *extra]


def write_workspace(folder: Path) -> None:
    """What the commands need where they start: the repository's recipes, a tiny model and ViRL39K-shaped data whose
    rows come in fours, two with an image and two text-only, each question naming its row."""
    folder.mkdir()
    (folder / "recipes").symlink_to(ROOT / "recipes")
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS, seed=0)
    model.save_pretrained(folder / "tiny-qwen2.5-vl")
    processor.save_pretrained(folder / "tiny-qwen2.5-vl")
    (folder / "ViRL39K" / "images").mkdir(parents=True)
    rows = {"question": [], "answer": [], "image": []}
    for row in range(ROWS):
        colour = COLOURS[row % len(COLOURS)]
        if ROW_PATTERN[row % len(ROW_PATTERN)] == "image":
            path = f"images/shape_{row}.png"
            make_shape_image(colour, random.Random(row)).save(folder / "ViRL39K" / path)
            rows["question"].append(f"Row {row}: what colour is the shape?")
            rows["image"].append([path])
        else:
            rows["question"].append(f"Row {row}: name a colour.")
            rows["image"].append([])
        rows["answer"].append(colour)
    Dataset.from_dict(rows).to_parquet(folder / "tiny-virl39k.parquet")


def run_machines(folder: Path, commands: list[list[str]], name: str) -> list[str]:
    """Start one command per machine side by side in `folder` (the storage both share); their outputs."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # the same reduction order in every run
        "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR,
        "HF_HUB_OFFLINE": "1",
        "VPPO_PROMPT_LOG": str(folder / f"{name}.prompts"),
    }
    logs = [folder / f"{name}.machine{rank}.log" for rank in range(len(commands))]
    launches = []
    for command, log in zip(commands, logs, strict=True):
        with open(log, "w") as output:
            launches.append(
                subprocess.Popen(
                    command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    try:
        codes = [launch.wait(timeout=LAUNCH_TIMEOUT_S) for launch in launches]
    finally:
        for launch in launches:  # a machine left waiting for a failed one: end its launcher and workers
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)
                launch.wait()
    outputs = [log.read_text() for log in logs]
    for rank, (code, output) in enumerate(zip(codes, outputs, strict=True)):
        assert code == 0, f"machine {rank} of the {name} run: exit {code}\n{output[-6000:]}"
    return outputs


def trained_prompts(folder: Path, name: str, rank: int) -> list[list[dict]]:
    """Per generation batch, the prompts process `rank` scored: `{"row", "images"}`."""
    batches = []
    for line in (folder / f"{name}.prompts.rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["rank"] == rank
        batches.append(
            [
                {"row": int(re.search(r"Row (\d+):", prompt["text"]).group(1)), "images": prompt["images"]}
                for prompt in record["prompts"]
            ]
        )
    return batches


def loaded_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of the model saved in `folder`, loaded with `from_pretrained`, which must place every one."""
    model, loading = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert not any(loading[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    return model.state_dict()


@pytest.mark.slow
def test_the_32b_recipe_on_two_machines_trains_checkpoints_and_resumes_exactly(tmp_path):
    pytest.importorskip("deepspeed")
    first, second = documented_commands()
    assert replaced(first, "--machine_rank", "0", "1") == second, "the machines' commands differ beyond their rank"
    assert flag_value(first, "--num_machines") == "2"
    assert flag_value(first, "--config_file") == "recipes/accelerate/zero3.yaml"
    assert first[-4:] == ["-m", "vppo_trl.train", "--config", RECIPE]

    straight = tmp_path / "straight"
    write_workspace(straight)
    port = free_port()
    outputs = run_machines(straight, [command_run_here(first, port), command_run_here(second, port)], "straight")
    checkpoint = straight / OUTPUT_DIR / "checkpoint-1"

    # The second pair resumes from a copy of the step-1 checkpoint in a folder of its own: what a run killed right
    # after that checkpoint leaves.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("recipes", "tiny-qwen2.5-vl", "ViRL39K", "tiny-virl39k.parquet"):
        (resumed / name).symlink_to(straight / name)
    shutil.copytree(checkpoint, resumed / OUTPUT_DIR / "checkpoint-1")
    port = free_port()
    resume = ("--resume_from_checkpoint", "true")
    outputs += run_machines(
        resumed, [command_run_here(first, port, *resume), command_run_here(second, port, *resume)], "resumed"
    )

    # The weights: the resumed run ends where the straight one does, every tensor of the gathered final weights.
    expected = load_file(straight / OUTPUT_DIR / "model.safetensors")
    actual = load_file(resumed / OUTPUT_DIR / "model.safetensors")
    assert expected.keys() == actual.keys()
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ after the resume, e.g. {different[:3]}"
    # Step 1 and step 2 each changed them (loaded as a user loads them: the trained files keep ZeRO-3's key layout).
    initial, after_step_1, final = (
        loaded_weights(folder) for folder in (straight / "tiny-qwen2.5-vl", checkpoint, straight / OUTPUT_DIR)
    )
    for before, after in ((initial, after_step_1), (after_step_1, final)):
        moved = [key for key in before if not torch.equal(before[key], after[key])]
        assert len(moved) > len(before) // 2, f"only {len(moved)} of {len(before)} tensors changed in a step"

    # The prompts: each process trained on its own, machine 1's all text-only, together the data's first rows.
    straight_prompts = [trained_prompts(straight, "straight", rank) for rank in (0, 1)]
    for rank, batches in enumerate(straight_prompts):
        assert len(batches) == STEPS and all(len(batch) == PROMPTS_PER_PROCESS for batch in batches)
        images = {prompt["images"] for batch in batches for prompt in batch}
        assert images == ({1} if rank == 0 else {0}), f"process {rank} trained on prompts with {images} images"
    rows = [{prompt["row"] for batch in batches for prompt in batch} for batches in straight_prompts]
    assert not rows[0] & rows[1]
    assert rows[0] | rows[1] == set(range(STEPS * 2 * PROMPTS_PER_PROCESS))
    for rank in (0, 1):  # the resumed run trained step 2 on the same prompts
        assert trained_prompts(resumed, "resumed", rank) == straight_prompts[rank][1:]

    exits = [output for output in outputs if "terminate called without an active exception" in output]
    assert not exits, f"{len(exits)} launches aborted at exit:\n{exits[0][-3000:]}"
