"""
Train a vision-language model with VPPO from a YAML recipe, the way TRL's own training scripts work.

```bash
# One process (CPU or one GPU)
python -m vppo_trl.train --config recipes/qwen2_5_vl_3b_lora_single_gpu.yaml

# 8 GPUs with DeepSpeed ZeRO-3; any field of the recipe can be overridden on the command line
accelerate launch --config_file recipes/accelerate/zero3.yaml -m vppo_trl.train \
    --config recipes/qwen2_5_vl_7b_paper.yaml --output_dir runs/vppo-7b --learning_rate 2e-6
```

The recipe's keys are the fields of [`VPPOScriptArguments`], [`VPPOConfig`] and [`~trl.ModelConfig`].
"""

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import datasets
import huggingface_hub
import transformers
import yaml
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id
from packaging.version import Version
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from .clean_exit import exit_cleanly
from .command_line import CommandLineParser, did_you_mean
from .data import ON_BAD_ROW_CHOICES, BadInputError, DataReport, load_vppo_dataset
from .method.config import VPPOConfig
from .rewards import REWARD_FUNCTIONS, resolve_reward_functions
from .trainer import VPPOTrainer

# Prefixes that make a model or dataset name a local path rather than a Hub id.
LOCAL_PATH_PREFIXES = (".", "/", "~")
# File suffixes that make a name a local path too (`data/train.parquet` is also a well-formed Hub id).
LOCAL_FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow", ".safetensors", ".bin", ".yaml", ".yml")
# Seconds to wait for the Hub when checking that a model or dataset id exists there (instead of ~30 s of retries).
HUB_CHECK_TIMEOUT_SECONDS = 5


@dataclass
class VPPOScriptArguments:
    """
    Data and reward arguments of the VPPO training script.

    Args:
        dataset_name (`str`):
            Training data: a Hub dataset id (e.g. `TIGER-Lab/ViRL39K`), a local `.parquet`/`.jsonl`/`.json` file, or a
            local folder of such files (see [`~vppo_trl.data.load_vppo_dataset`]).
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split of `dataset_name` to train on.
        eval_dataset_name (`str`, *optional*):
            Validation data, in any form `dataset_name` accepts (e.g. `FanqingM/MMK12`). Loaded only when
            `eval_strategy` is not `"no"`.
        eval_dataset_split (`str`, *optional*, defaults to `"test"`):
            Split of `eval_dataset_name` to evaluate on.
        reward_funcs (`list[str]`, *optional*, defaults to `["accuracy"]`):
            Reward functions: names from `vppo_trl.rewards.REWARD_FUNCTIONS` (`accuracy`, `format`) or dotted import
            paths such as `my_rewards.length_reward`. Weight them with `reward_weights`.
        problem_column (`str`, *optional*, defaults to `"problem"`):
            Column holding the question (`question` in ViRL39K and MMK12).
        answer_column (`str`, *optional*, defaults to `"answer"`):
            Column holding the ground-truth answer.
        images_column (`str`, *optional*, defaults to `"images"`):
            Column holding the images (a list per row); a single-image `image` column is used when it is missing.
        image_root (`str`, *optional*):
            Folder that relative image paths start from (for ViRL39K, where its `images.zip` was extracted).
        on_bad_row (`str`, *optional*, defaults to `"raise"`):
            What to do with an invalid row (missing answer, unreadable image...): `"raise"` or `"skip"`.
        max_train_rows (`int`, *optional*):
            Train on the first `max_train_rows` rows only.
        max_eval_rows (`int`, *optional*):
            Evaluate on the first `max_eval_rows` rows only.
        dataset_num_proc (`int`, *optional*):
            Processes used to validate the rows of each dataset.
        min_pixels, max_pixels (`int`, *optional*):
            Pixel-count limits every image is brought within when the data is loaded (aspect ratio kept; see
            [`~vppo_trl.data.fit_image_pixels`]), so that vLLM and the trainer see the same image. The paper recipes
            use the official run's 200704 and 1003520.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: a Hub dataset id, or a local .parquet/.jsonl/.json file or folder."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of dataset_name to train on."})
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Validation data (Hub id or local path); loaded only when eval_strategy is not 'no'."},
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of eval_dataset_name to evaluate on."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": f"Reward functions: names from {sorted(REWARD_FUNCTIONS)} or dotted import paths "
            "(e.g. 'my_rewards.length_reward'). Weight them with reward_weights."
        },
    )
    problem_column: str = field(default="problem", metadata={"help": "Column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the ground-truth answer."})
    images_column: str = field(
        default="images",
        metadata={"help": "Column holding each row's list of images (falls back to a single-image 'image' column)."},
    )
    image_root: str | None = field(default=None, metadata={"help": "Folder that relative image paths start from."})
    on_bad_row: str = field(
        default="raise",
        metadata={"help": "What to do with an invalid row: 'raise' or 'skip'.", "choices": list(ON_BAD_ROW_CHOICES)},
    )
    max_train_rows: int | None = field(default=None, metadata={"help": "Train on the first max_train_rows rows."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Evaluate on the first max_eval_rows rows."})
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to validate the rows of each dataset."}
    )
    min_pixels: int | None = field(
        default=None,
        metadata={"help": "Images are scaled up to at least this many pixels when loaded (paper: 200704)."},
    )
    max_pixels: int | None = field(
        default=None,
        metadata={"help": "Images are scaled down to at most this many pixels when loaded (paper: 1003520)."},
    )

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive number of pixels.")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} must not exceed max_pixels={self.max_pixels}.")


class RecipeParser(CommandLineParser, TrlParser):
    """
    TrlParser whose mistakes end in one line: an unknown recipe key or flag (with the closest valid name), or a
    recipe value of the wrong type (argparse checks the types of command-line values, not of YAML numbers).
    """

    def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
        actions = {action.dest: action for action in self._actions}
        for key, value in kwargs.items():
            if key not in actions:
                raise ValueError(f"unknown recipe key {key!r}{did_you_mean(key, actions)}")
            kwargs[key] = _recipe_value(actions[key], key, value)
        return super().set_defaults_with_config(**kwargs)


def _recipe_value(action: argparse.Action, key: str, value: Any) -> Any:
    """A recipe's `value` for `key`, converted and checked with the flag's own type, as a typed flag would be."""
    if value is None or isinstance(value, (str, dict)) or action.type is None:
        return value  # argparse converts strings itself; dicts go to dict-valued fields as they are
    if isinstance(value, list):
        return [_convert(action, key, item) for item in value] if action.nargs in ("+", "*") else value
    return _convert(action, key, value)


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    try:
        converted = action.type(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        converted = None
    if converted is None or (action.choices and converted not in action.choices):
        name = getattr(action.type, "__name__", "a valid value")
        expected = {"string_to_bool": "true or false"}.get(name, name)
        expected = f"one of {list(action.choices)}" if action.choices else expected
        raise ValueError(f"recipe key {key!r} must be {expected}, got {value!r} ({type(value).__name__})")
    return converted


def make_parser(prog: str | None = None) -> TrlParser:
    """The parser of the training script: the recipe's keys and the command-line flags share the same names."""
    parser = RecipeParser(
        (VPPOScriptArguments, VPPOConfig, ModelConfig),
        prog=prog,
        description="Train a vision-language model with VPPO. Pass a recipe with --config <recipe>.yaml; any flag "
        "below overrides the recipe's value.",
    )
    # TrlParser reads `--config` itself before parsing; listed here so that --help shows it. SUPPRESS keeps it out of
    # the parsed namespace, which must hold dataclass fields only.
    parser.add_argument(
        "--config",
        metavar="RECIPE.yaml",
        default=argparse.SUPPRESS,
        help="YAML recipe whose keys set the fields below (see recipes/); flags on the command line override it.",
    )
    return parser


def _looks_local(name: str) -> bool:
    """Whether `name` means a local path: it starts like one, ends like a data file, or cannot be a Hub id."""
    if name.startswith(LOCAL_PATH_PREFIXES) or name.lower().endswith(LOCAL_FILE_SUFFIXES):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _hub_problem(name: str, repo_type: str) -> str | None:
    """Why the Hub cannot serve the `repo_type` repository `name`, or `None` if it can (or has it cached)."""
    hub_cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    cache_folders = [hub_cache / repo_folder_name(repo_id=name, repo_type=repo_type)]
    if repo_type == "dataset":  # what `datasets` prepared from it
        cache_folders.append(Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___"))
    cached = any(folder.is_dir() for folder in cache_folders)
    if huggingface_hub.is_offline_mode():
        return None if cached else "the Hub is offline (HF_HUB_OFFLINE) and has no copy of it in the local cache"
    try:
        huggingface_hub.HfApi().repo_info(name, repo_type=repo_type, timeout=HUB_CHECK_TIMEOUT_SECONDS)
    except GatedRepoError:
        return None  # it exists; access is the Hub's business
    except RepositoryNotFoundError:
        return f"the Hub has no {repo_type} of that name (if it is private, log in with `hf auth login`)"
    except Exception as error:  # no network, DNS failure, timeout, server error...
        return None if cached else f"the Hub cannot be reached to look for it ({type(error).__name__})"
    return None


def _check_source(name: str, what: str, repo_type: str) -> None:
    """Fail in one line, without waiting for the Hub's retries, when `name` is neither on disk nor on the Hub."""
    if Path(name).expanduser().exists():
        return
    if _looks_local(name):
        raise FileNotFoundError(
            f"{what} {name!r} does not exist. For recipes/cpu_demo.yaml, its header shows how to create its model "
            "and data."
        )
    problem = _hub_problem(name, repo_type)
    if problem is not None:
        raise FileNotFoundError(f"{what} {name!r} is neither a local file or folder nor usable on the Hub: {problem}.")


def check_args(script_args: VPPOScriptArguments, training_args: VPPOConfig, model_args: ModelConfig) -> None:
    """Fail before any model or data is loaded when the arguments cannot work."""
    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path is required (a Hub model id or a local folder).")
    _check_source(model_args.model_name_or_path, "Model folder", "model")
    if script_args.dataset_name is None:
        raise ValueError("dataset_name is required (a Hub dataset id or a local file or folder).")
    _check_source(script_args.dataset_name, "Dataset", "dataset")
    if training_args.eval_strategy != "no":
        if script_args.eval_dataset_name is None:
            raise ValueError(f"eval_strategy={training_args.eval_strategy.value!r} needs an eval_dataset_name.")
        _check_source(script_args.eval_dataset_name, "Eval dataset", "dataset")
    reward_funcs = resolve_reward_functions(script_args.reward_funcs)
    if training_args.reward_weights is not None and len(training_args.reward_weights) != len(reward_funcs):
        raise ValueError(
            f"reward_weights has {len(training_args.reward_weights)} values but there are {len(reward_funcs)} "
            f"reward functions ({script_args.reward_funcs})."
        )


def parse_args(
    argv: list[str] | None = None, prog: str | None = None
) -> tuple[VPPOScriptArguments, VPPOConfig, ModelConfig]:
    """Parse the recipe and the overrides; a wrong value ends the program with a one-line error, not a traceback."""
    parser = make_parser(prog)
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
        check_args(script_args, training_args, model_args)
    except (ValueError, OSError, yaml.YAMLError) as error:  # OSError: e.g. a missing recipe file
        _exit_with_error(parser.prog, error)
    return script_args, training_args, model_args


def _exit_with_error(prog: str, error: Exception) -> NoReturn:
    """End the program as argparse does for a bad flag: a one-line message on stderr, exit status 2, no traceback."""
    message = str(error) if isinstance(error, BadInputError) else " ".join(str(error).split())
    print(f"{prog}: error: {message}", file=sys.stderr)  # a BadInputError may list more problems on further lines
    sys.exit(2)


def _load(script_args: VPPOScriptArguments, source: str, split: str, max_rows: int | None):
    return load_vppo_dataset(
        source,
        split,
        on_bad_row=script_args.on_bad_row,
        image_root=script_args.image_root,
        max_rows=max_rows,
        problem_column=script_args.problem_column,
        answer_column=script_args.answer_column,
        images_column=script_args.images_column,
        num_proc=script_args.dataset_num_proc,
        min_pixels=script_args.min_pixels,
        max_pixels=script_args.max_pixels,
    )


def _report_data(trainer: VPPOTrainer, reports: dict[str, DataReport]) -> None:
    """Print what the data loader kept and skipped, and add it to the first logged metrics (console, W&B, Trackio)."""
    for name, report in reports.items():
        trainer.accelerator.print(
            f"📚 {name.capitalize()} data: {report.kept_rows} of {report.total_rows} rows kept, "
            f"{report.skipped_rows} skipped."
        )
        # GRPOTrainer averages and logs these buffers at the first logging step, next to its own metrics.
        metrics = trainer._metrics["train"]
        metrics[f"data/{name}_rows"].append(float(report.total_rows))
        metrics[f"data/{name}_rows_skipped"].append(float(report.skipped_rows))


def main(argv: list[str] | None = None, prog: str | None = None) -> VPPOTrainer:
    """
    Run the training script: parse `argv` (`sys.argv[1:]` when `None`), train, save, and push to the Hub when
    `push_to_hub` is set. Returns the trainer, for in-process use (tests, notebooks).
    """
    script_args, training_args, model_args = parse_args(argv, prog)
    reward_funcs = resolve_reward_functions(script_args.reward_funcs)

    # Same model loading as TRL's scripts: the trainer instantiates the model from its id with these arguments.
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    prog = prog or os.path.basename(sys.argv[0])
    try:
        train_dataset, train_report = _load(
            script_args, script_args.dataset_name, script_args.dataset_train_split, script_args.max_train_rows
        )
        reports = {"train": train_report}
        eval_dataset = None
        if training_args.eval_strategy != "no":
            eval_dataset, reports["eval"] = _load(
                script_args, script_args.eval_dataset_name, script_args.eval_dataset_split, script_args.max_eval_rows
            )
    except (BadInputError, FileNotFoundError) as error:
        _exit_with_error(prog, error)

    trainer = VPPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    _report_data(trainer, reports)

    resume = training_args.resume_from_checkpoint
    try:
        with warnings.catch_warnings():
            # TRL 1.16 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates, at every generation:
            # a notice for TRL, that nothing in the user's recipe can change.
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            # `--resume_from_checkpoint true` (as in TRL's scripts) means the newest complete checkpoint of output_dir.
            trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    except BadInputError as error:  # e.g. a prompt longer than the model's context; saved checkpoints stay
        print(file=sys.stderr)  # end the line of the progress bar
        _exit_with_error(prog, error)
    trainer.accelerator.print("✅ Training completed.")

    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")

    # A local path would make the card link to a Hub dataset that does not exist.
    dataset_name = script_args.dataset_name
    if dataset_name.startswith(LOCAL_PATH_PREFIXES) or Path(dataset_name).exists():
        dataset_name = None
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    else:
        # Without a push the card is written locally, with the same name push_to_hub would give it.
        model_name = Path(training_args.hub_model_id or training_args.output_dir).name
        trainer.create_model_card(model_name=model_name, dataset_name=dataset_name)

    # Finish the trackers and destroy the process group
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
    return trainer


def command(argv: list[str] | None = None, prog: str | None = None) -> None:
    """
    [`main`] as a command (`vppo-trl train`, `python -m vppo_trl.train`). A run of several processes ends with
    [`exit_cleanly`] once everything is saved: its gloo process groups outlive the trainer's end, and their worker
    threads could otherwise abort the process while the interpreter finalises, after a run that succeeded. A failure
    raises before that, and exits non-zero with its traceback.
    """
    trainer = main(argv, prog)
    if trainer.accelerator.num_processes > 1:
        exit_cleanly()


if __name__ == "__main__":
    command()
