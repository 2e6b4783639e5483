"""Every recipe parses into the training script's arguments with the paper's values; the accelerate configs load."""

import re
from itertools import takewhile
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from trl import ModelConfig

from vppo_trl import VPPOConfig
from vppo_trl.data import PAPER_MAX_PIXELS, PAPER_MIN_PIXELS
from vppo_trl.train import VPPOScriptArguments, make_parser, resolve_reward_functions

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
ACCELERATE_FILES = sorted((RECIPES / "accelerate").glob("*.yaml"))

# The paper (EasyR1) counts batches in prompts; TRL in completions, G = 8 per prompt.
G = 8
PAPER_GLOBAL_BATCH_PROMPTS = 128
PAPER_ROLLOUT_BATCH_PROMPTS = 384


def parse(recipe: Path, *overrides: str) -> tuple[VPPOScriptArguments, VPPOConfig, ModelConfig]:
    # TrainingArguments refuses bf16 without a bf16 GPU: parse as on a machine without one.
    return make_parser().parse_args_and_config(["--config", str(recipe), "--use_cpu", "true", *overrides])


def optimizer_batch(args: VPPOConfig, num_gpus: int) -> int:
    """Completions per optimizer step on `num_gpus` processes, after checking that TRL can lay the batches out there
    (the parse above runs on one process, so GRPOConfig checked them for one GPU only)."""
    per_step = args.per_device_train_batch_size * num_gpus
    assert args.generation_batch_size % per_step == 0
    steps_per_generation = args.generation_batch_size // per_step
    # Dynamic sampling keeps whole groups per process and whole generation batches per optimizer step
    assert (args.per_device_train_batch_size * steps_per_generation) % args.num_generations == 0
    assert steps_per_generation % args.gradient_accumulation_steps == 0
    assert (args.per_device_eval_batch_size * num_gpus) % (args.num_generations_eval or args.num_generations) == 0
    return per_step * args.gradient_accumulation_steps


def test_the_expected_recipes_exist():
    assert [path.name for path in RECIPE_FILES] == [
        "cpu_demo.yaml",
        "cpu_vllm.yaml",
        "gemma3_4b.yaml",
        "qwen2_5_vl_32b_paper.yaml",
        "qwen2_5_vl_3b_lora_single_gpu.yaml",
        "qwen2_5_vl_7b_paper.yaml",
        "qwen3_vl_8b.yaml",
    ]
    assert [path.stem for path in ACCELERATE_FILES] == ["multi_gpu", "single_gpu", "zero2", "zero3"]


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda path: path.stem)
def test_recipe_parses_completely(recipe):
    script_args, training_args, model_args = parse(recipe)
    assert isinstance(script_args, VPPOScriptArguments)
    assert isinstance(training_args, VPPOConfig)
    assert isinstance(model_args, ModelConfig)
    assert model_args.model_name_or_path and script_args.dataset_name
    assert resolve_reward_functions(script_args.reward_funcs)
    header = "\n".join(takewhile(lambda line: line.startswith("#"), recipe.read_text().splitlines()))
    # The header says what it needs, how long it takes, and how to launch this very file
    for topic in ("Hardware:", "Expected time:", f"--config recipes/{recipe.name}"):
        assert topic in header


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b_paper", "qwen2_5_vl_32b_paper", "qwen3_vl_8b", "gemma3_4b"])
def test_paper_recipes_follow_table_9(name):
    script_args, args, model_args = parse(RECIPES / f"{name}.yaml")
    # AdamW, lr 1e-6 constant, 2 epochs (the official 8B script: 130 steps), vision tower trained (full fine-tuning)
    assert args.learning_rate == 1e-6 and args.lr_scheduler_type == "constant"
    if name == "qwen3_vl_8b":
        assert args.max_steps == 130
    else:
        assert args.max_steps == -1 and args.num_train_epochs == 2
    assert not model_args.use_peft
    assert args.bf16 and args.gradient_checkpointing and model_args.dtype == "bfloat16"
    # DAPO: clip 0.2 / 0.28, token-mean loss, no KL, dynamic sampling; G = 8, top-p 0.99, temperature 1.0
    assert (args.loss_type, args.epsilon, args.epsilon_high, args.beta) == ("dapo", 0.2, 0.28, 0.0)
    assert args.delta == 3.0  # dual clip c = 3.0 (official clip_ratio_dual)
    assert args.dynamic_sampling and args.dynamic_sampling_reward == "accuracy_reward"
    assert (args.num_generations, args.top_p, args.temperature) == (G, 0.99, 1.0)
    # VPPO: patch blackening, k3, 40% of tokens, dynamic-range TAS from 0.9
    assert (args.perturbation, args.perturbation_prob, args.dependency_estimator) == ("patch_blackening", 0.5, "k3")
    assert args.perturbation_patch_size == 14  # the official code's, for Qwen3-VL too
    assert args.perturbation_space == "original_image"
    assert (args.token_filter_ratio, args.advantage_shaping, args.advantage_scale_min) == (0.4, True, 0.9)
    assert args.advantage_scale_max is None
    # Binary accuracy reward; ViRL39K to train, MMK12 to validate, avg@8 at temperature 1.0
    assert script_args.reward_funcs == ["accuracy"]
    assert (script_args.dataset_name, script_args.dataset_train_split) == ("TIGER-Lab/ViRL39K", "train")
    assert (script_args.eval_dataset_name, script_args.eval_dataset_split) == ("FanqingM/MMK12", "test")
    assert (script_args.problem_column, script_args.images_column) == ("question", "image")
    assert (script_args.min_pixels, script_args.max_pixels) == (PAPER_MIN_PIXELS, PAPER_MAX_PIXELS)
    assert args.eval_strategy == "steps" and args.num_generations_eval == G
    # vLLM colocated with training; wandb; pushed under the logged-in user
    assert args.use_vllm and args.vllm_mode == "colocate"
    assert args.report_to == ["wandb"]
    assert args.push_to_hub and "/" not in args.hub_model_id and args.hub_model_id.endswith("-VPPO")
    # Rollout batch of 384 prompts, generated at once, feeding 3 optimizer steps of 128 prompts
    assert args.generation_batch_size == PAPER_ROLLOUT_BATCH_PROMPTS * G


def test_7b_recipe():
    _, args, model_args = parse(RECIPES / "qwen2_5_vl_7b_paper.yaml")
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert args.max_completion_length == 2048 and args.entropy_penalty_coef == 0.06
    assert args.perturbation_patch_size == 14
    assert optimizer_batch(args, num_gpus=8) == PAPER_GLOBAL_BATCH_PROMPTS * G
    assert args.generation_batch_size // optimizer_batch(args, num_gpus=8) == 3


def test_gemma3_recipe():
    _, args, model_args = parse(RECIPES / "gemma3_4b.yaml")
    assert model_args.model_name_or_path == "google/gemma-3-4b-it"
    assert args.max_completion_length == 2048 and args.entropy_penalty_coef == 0.06  # the 7B recipe's values
    assert not args.freeze_vision_tower  # the paper trains the tower
    assert optimizer_batch(args, num_gpus=8) == PAPER_GLOBAL_BATCH_PROMPTS * G
    assert args.generation_batch_size // optimizer_batch(args, num_gpus=8) == 3
    # The 40 GB variant its header gives keeps the global batch
    _, small = parse(RECIPES / "gemma3_4b.yaml", "--per_device_train_batch_size", "2",
                     "--gradient_accumulation_steps", "64")[:2]  # fmt: skip
    assert optimizer_batch(small, num_gpus=8) == PAPER_GLOBAL_BATCH_PROMPTS * G
    header = "".join(takewhile(lambda line: line.startswith("#"), (RECIPES / "gemma3_4b.yaml").open()))
    assert "--config_file recipes/accelerate/zero3.yaml" in header
    # The sizes it quotes are those of the published config.json (checked there, not guessed)
    text = " ".join(line.lstrip("# ") for line in header.splitlines())
    for fact in ("34 layers, hidden size 2560", "vocabulary 262,208", "27 layers, hidden size 1152",
                 "256 image tokens per image"):  # fmt: skip
        assert fact in text, fact


def test_32b_recipe():
    _, args, model_args = parse(RECIPES / "qwen2_5_vl_32b_paper.yaml")
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-VL-32B-Instruct"
    assert args.max_completion_length == 4096 and args.entropy_penalty_coef == 0.06
    assert optimizer_batch(args, num_gpus=16) == PAPER_GLOBAL_BATCH_PROMPTS * G
    assert args.vllm_tensor_parallel_size == 4
    # The single-node launch documented in the header keeps the global batch
    _, single_node, _ = parse(RECIPES / "qwen2_5_vl_32b_paper.yaml", "--gradient_accumulation_steps", "64")
    assert optimizer_batch(single_node, num_gpus=8) == PAPER_GLOBAL_BATCH_PROMPTS * G


def test_qwen3_vl_recipe():
    _, args, model_args = parse(RECIPES / "qwen3_vl_8b.yaml")
    assert model_args.model_name_or_path == "Qwen/Qwen3-VL-8B-Instruct"
    # The official 8B script: entropy penalty 0.12, responses up to 8192 tokens, 130 steps, 14-px patches
    assert args.entropy_penalty_coef == 0.12 and args.max_completion_length == 8192 and args.max_steps == 130
    assert optimizer_batch(args, num_gpus=8) == PAPER_GLOBAL_BATCH_PROMPTS * G


def test_lora_single_gpu_recipe():
    script_args, args, model_args = parse(RECIPES / "qwen2_5_vl_3b_lora_single_gpu.yaml")
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert (model_args.use_peft, model_args.lora_r, model_args.lora_alpha) == (True, 64, 128)
    # The regex selects the language model's linear layers, not the vision tower's (same MLP names) or the LM head
    pattern = model_args.lora_target_modules
    assert isinstance(pattern, str)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert re.fullmatch(pattern, f"model.language_model.layers.3.self_attn.{name}")
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert re.fullmatch(pattern, f"model.language_model.layers.3.mlp.{name}")
        assert not re.fullmatch(pattern, f"model.visual.blocks.3.mlp.{name}")
    assert not re.fullmatch(pattern, "model.visual.blocks.3.attn.qkv")
    assert not re.fullmatch(pattern, "lm_head")
    # One GPU, the paper's proportions: 16 prompts per step, 48 per generation, 3 steps per generation
    assert optimizer_batch(args, num_gpus=1) == 16 * G
    assert args.generation_batch_size == 48 * G
    assert args.use_vllm and args.vllm_mode == "colocate" and args.vllm_gpu_memory_utilization <= 0.3
    assert args.entropy_penalty_coef == 0.06 and args.dynamic_sampling and args.delta == 3.0
    assert (script_args.min_pixels, script_args.max_pixels) == (PAPER_MIN_PIXELS, PAPER_MAX_PIXELS)
    assert not args.push_to_hub


def test_cpu_demo_recipe():
    script_args, args, model_args = parse(RECIPES / "cpu_demo.yaml")
    assert model_args.model_name_or_path == "./tiny-qwen2.5-vl"
    assert script_args.dataset_name == "./tiny-colour.parquet"
    assert args.use_cpu and not args.bf16 and not args.use_vllm
    assert args.report_to == []


def test_cpu_demo_recipe_header_names_the_command_that_builds_its_inputs():
    from vppo_trl.testing import TINY_DATASET_FILE, TINY_MODEL_DIR

    header = "".join(takewhile(lambda line: line.startswith("#"), (RECIPES / "cpu_demo.yaml").open()))
    assert "#   vppo-trl tiny --output-dir .\n" in header and "python -" not in header
    script_args, _, model_args = parse(RECIPES / "cpu_demo.yaml")
    # What `vppo-trl tiny --output-dir .` writes is what the recipe reads
    assert model_args.model_name_or_path == f"./{TINY_MODEL_DIR}"
    assert script_args.dataset_name == f"./{TINY_DATASET_FILE}"


def test_cpu_vllm_recipe_is_the_cpu_demo_with_vllm_colocated():
    _, demo, _ = parse(RECIPES / "cpu_demo.yaml")
    script_args, args, model_args = parse(RECIPES / "cpu_vllm.yaml")
    assert args.use_cpu and args.use_vllm and args.vllm_mode == "colocate"
    assert (model_args.model_name_or_path, script_args.dataset_name) == ("./tiny-qwen2.5-vl", "./tiny-colour.parquet")
    header = "".join(takewhile(lambda line: line.startswith("#"), (RECIPES / "cpu_vllm.yaml").open()))
    assert "#   vppo-trl tiny --output-dir . --head-dim 32\n" in header
    for name in ("perturbation", "token_filter_ratio", "entropy_penalty_coef", "num_generations", "learning_rate"):
        assert getattr(args, name) == getattr(demo, name), name


@pytest.mark.parametrize(
    "name, distributed_type, num_processes, zero_stage",
    [
        ("single_gpu", "NO", 1, None),
        ("multi_gpu", "MULTI_GPU", 8, None),
        ("zero2", "DEEPSPEED", 8, 2),
        ("zero3", "DEEPSPEED", 8, 3),
    ],
)
def test_accelerate_configs(name, distributed_type, num_processes, zero_stage):
    path = RECIPES / "accelerate" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] == distributed_type
    assert config["num_processes"] == num_processes
    assert config["mixed_precision"] == "bf16"
    assert config.get("deepspeed_config", {}).get("zero_stage") == zero_stage
    # accelerate itself reads it without complaint
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type == distributed_type and loaded.num_processes == num_processes
    if zero_stage == 3:
        assert config["deepspeed_config"]["zero3_save_16bit_model"]  # save_model writes a usable checkpoint
