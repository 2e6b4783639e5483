"""See token perception: which tokens of a completion depend on the image, as VPPO measures it.

[`token_perception`] scores one completion with the original and the perturbed image(s) through the functions
VPPOTrainer measures with (`vppo_trl.method.passes`: the same seeded draw per completion and image, the same
perturbation, the same estimators; `vppo_trl.method.shaping`: the same token filter, TAS and cold-start guard), with
[`VPPOConfig`]'s settings and defaults ([`MeasurementSettings`]), and returns per-token dependencies. Its log-probs
come from the language backbone and the LM head in the model's own dtype, where training's come from TRL's forward
under the trainer's autocast: `docs/design.md` says how close the two are. Its draw `d` of completion `i`
is the draw training makes for completion `i` of its generation batch in round `d + 1` on process 0.
[`sample_perceptions`] does it for several completions of one prompt, sampled like training, with the TAS scale and
reward each gets. `vppo_trl.tools.spotlight_page` draws them (HTML page, PNG, distributions); `vppo-trl spotlight`
is the command line.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from PIL import Image
from trl.data_utils import prepare_multimodal_messages

from ..command_line import CommandLineParser
from ..method.config import VPPOConfig
from ..method.core import token_dependency, trajectory_dependency
from ..method.passes import (
    IMAGES_KEY,
    completion_hidden_states,
    kl_chunk_dependency,
    perturb_batch_images,
    perturbation_seeds,
)
from ..method.perturbations import PixelLayout
from ..method.shaping import ShapingSettings, shape_advantages
from ..rewards import REWARD_FUNCTIONS
from .spotlight_page import CONTINUATION

# Most tokens one character can be split over (UTF-8 has at most 4 bytes per character).
MAX_CHARACTER_TOKENS = 4

# The VPPOConfig fields a measurement reads, and the short flags `vppo-trl spotlight` has always accepted for some.
MEASUREMENT_ALIASES = {
    "perturbation": [],
    "perturbation_space": [],
    "perturbation_patch_size": ["--patch-size"],
    "perturbation_prob": [],
    "perturbation_noise_std": ["--noise-std"],
    "perturbation_blur_radius": ["--blur-radius"],
    "dependency_estimator": ["--estimator"],
    "token_filter_ratio": [],
    "advantage_shaping": [],
    "advantage_scale_min": [],
    "advantage_scale_max": [],
    "advantage_scale_max_cap": [],
    "cold_start_guard": [],
    "cold_start_guard_floor": [],
    "cold_start_guard_full": [],
    "cold_start_guard_balance": [],
    "temperature": [],
}
# The shaping settings a measurement reads: training's, but for TGF's criterion, which is the dependency (what the
# spotlight shows); `shaping_settings` builds them.
SHAPING_FIELDS = [setting.name for setting in fields(ShapingSettings) if setting.name != "token_filter_criterion"]

MeasurementSettings = make_dataclass(
    "MeasurementSettings",
    [
        (
            config_field.name,
            config_field.type,
            field(
                default=config_field.default,
                metadata={**config_field.metadata, "aliases": MEASUREMENT_ALIASES[config_field.name]},
            ),
        )
        for config_field in fields(VPPOConfig)
        if config_field.name in MEASUREMENT_ALIASES
    ],
)
MeasurementSettings.__doc__ = (
    "The VPPOConfig fields a measurement reads (perturbation, estimator, TGF, TAS, the cold-start guard, "
    "temperature), with VPPOConfig's defaults and help: a setting has one default, the trainer's."
)


# The short keyword names the spotlight's functions took before they read VPPOConfig's, still accepted.
SHORT_NAMES = {
    "estimator": "dependency_estimator",
    "patch_size": "perturbation_patch_size",
    "prob": "perturbation_prob",
    "noise_std": "perturbation_noise_std",
    "blur_radius": "perturbation_blur_radius",
}


def _settings(settings: "MeasurementSettings | None", overrides: dict) -> "MeasurementSettings":
    """`settings` (VPPOConfig's defaults when `None`) with `overrides`, by VPPOConfig name or short name."""
    overrides = {SHORT_NAMES.get(name, name): value for name, value in overrides.items()}
    return replace(settings if settings is not None else MeasurementSettings(), **overrides)


def measurement_settings(config: VPPOConfig) -> "MeasurementSettings":
    """The measurement settings of a training configuration."""
    return MeasurementSettings(**{name: getattr(config, name) for name in MEASUREMENT_ALIASES})


def shaping_settings(settings: "MeasurementSettings") -> ShapingSettings:
    """The TGF, TAS and guard settings of a measurement for the shaping function training calls; TGF by dependency."""
    return ShapingSettings(**{name: getattr(settings, name) for name in SHAPING_FIELDS})


def shape_group(
    settings: "MeasurementSettings", dependencies: Sequence[Sequence[float]], advantages: Sequence[float] | None = None
):
    """
    TGF's kept tokens and TAS's scales of completions shaped together as a generation batch, through
    [`shape_advantages`], the function training calls (one process, the completions' own statistics).

    With `advantages` (rewards minus the group's mean), TAS's statistics cover the completions with a non-zero one,
    as in training; without, every completion, all on one side of the sign (the scale each would get with a positive
    advantage). Returns the [`ShapedBatch`].
    """
    lengths = [len(values) for values in dependencies]
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(-1)).long()
    dependency = torch.zeros(mask.shape)
    for row, values in enumerate(dependencies):
        dependency[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    rewarded = advantages is not None
    advantages = torch.tensor(advantages if rewarded else [1.0] * len(lengths), dtype=torch.float32)
    everything = torch.ones(len(lengths), dtype=torch.bool)
    shapeable = advantages != 0 if rewarded else everything
    return shape_advantages(
        shaping_settings(settings), advantages, dependency, mask, everything, shapeable, everything
    )


@dataclass
class TokenPerception:
    """Per-token visual dependency of one completion."""

    tokens: list[str]
    dependency: list[float]
    kept: list[bool]
    trajectory_dependency: float
    completion: str
    settings: dict = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    # Whether each token is a special token (shown by name, e.g. `<|im_end|>`).
    special: list[bool] = field(default_factory=list)
    reward: float | None = None
    advantage: float | None = None
    # The TAS scale the completion's advantage gets among the completions it is compared with.
    advantage_scale: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def display_tokens(tokenizer, token_ids: Sequence[int]) -> tuple[list[str], list[bool]]:
    """
    Text of each token as it should be shown, and whether it is a special token.

    Special tokens are shown by name (`<|im_end|>`). A character split over several byte-level tokens (an accent, an
    emoji, CJK) decodes to a replacement character token by token: its text goes on the first token of the split and
    the others show `CONTINUATION`. A byte fragment that completes no character is shown by its vocabulary entry,
    marked like a special token.
    """
    special_ids = set(tokenizer.all_special_ids)
    special_ids.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    ids = list(token_ids)
    texts, special = [], []
    position = 0
    while position < len(ids):
        if ids[position] in special_ids:
            texts.append(tokenizer.convert_ids_to_tokens(ids[position]))
            special.append(True)
            position += 1
            continue
        end = position + 1
        text = tokenizer.decode(ids[position:end])
        while (
            text.endswith("\ufffd")
            and end < len(ids)
            and ids[end] not in special_ids
            and end - position < MAX_CHARACTER_TOKENS
        ):
            end += 1
            text = tokenizer.decode(ids[position:end])
        if "\ufffd" in text:  # a fragment that completes no character: its vocabulary entry, alone
            end = position + 1
            texts.append(tokenizer.convert_ids_to_tokens(ids[position]))
            special.append(True)
        else:
            texts.append(text)
            special.append(False)
            texts.extend([CONTINUATION] * (end - position - 1))
            special.extend([False] * (end - position - 1))
        position = end
    return texts, special


def _context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def _prompt_inputs(model, processor, prompt: str | list[dict], images: Sequence[Image.Image]) -> dict:
    """The processor's inputs for `prompt` with its images, ready for generation."""
    if not images:
        raise ValueError("token perception needs at least one image: without one there is nothing to perturb.")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    messages = prepare_multimodal_messages(messages, images=list(images))
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)


def _check_length(model, prompt_length: int, completion_length: int) -> None:
    context = _context_length(model)
    if context is not None and prompt_length + completion_length > context:
        raise ValueError(
            f"The prompt is {prompt_length} tokens (its image tokens included)"
            + (f" and the completion {completion_length}" if completion_length else "")
            + f": more than the {context} tokens the model reads (max_position_embeddings). Shorten the prompt or "
            "use a smaller image."
        )


def _backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The language backbone and LM head the trainer's passes use."""
    if is_peft_model(model):
        model = model.get_base_model()
    return model.base_model, model.get_output_embeddings()


def _sampled_token_logps(model, inputs: dict, completion_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """`[1, T]` log-probs of the completion's tokens: the backbone's hidden states through the LM head."""
    backbone, lm_head = _backbone_and_head(model)
    hidden = completion_hidden_states(backbone, inputs, completion_ids.numel())
    logits = F.linear(hidden, lm_head.weight, lm_head.bias).float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, completion_ids.view(1, -1, 1)).squeeze(-1)


def _measurement_inputs(model, processor, prompt, images: Sequence[Image.Image], completion_ids=None) -> dict:
    """The prompt (and completion) as one row of a generation batch: model inputs, `num_images` and the images."""
    inputs = dict(_prompt_inputs(model, processor, prompt, images))
    inputs["num_images"] = [len(images)]
    inputs[IMAGES_KEY] = [list(images)]
    if completion_ids is not None:
        inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids.unsqueeze(0)], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], inputs[key].new_zeros(1, completion_ids.numel())], dim=1)
    return inputs


def _perturbed_inputs(inputs: dict, processor, settings, seed: int, draw: int, completion_index: int) -> dict:
    """`inputs` with the images perturbed as training's round `draw + 1` perturbs completion `completion_index`."""
    if settings.perturbation_space not in ("original_image", "pixel_values"):
        raise ValueError(
            f"perturbation_space={settings.perturbation_space!r} is not supported; "
            "choose 'original_image' or 'pixel_values'."
        )
    seeds = perturbation_seeds(seed, draw + 1, 0, [completion_index], inputs["num_images"])
    batch = inputs if settings.perturbation_space == "original_image" else {**inputs, IMAGES_KEY: None}
    batch = {key: value for key, value in batch.items() if value is not None}
    layout = PixelLayout.from_image_processor(processor.image_processor)
    pixels = perturb_batch_images(batch, settings, layout, processor, seeds)
    return {**inputs, "pixel_values": pixels}


def _model_inputs(inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if key != IMAGES_KEY}


@torch.no_grad()
def token_perception(
    model,
    processor,
    prompt: str | list[dict],
    images: Sequence[Image.Image],
    completion: str | Sequence[int] | None = None,
    *,
    settings: "MeasurementSettings | None" = None,
    draws: int = 1,
    seed: int = 0,
    completion_index: int = 0,
    max_new_tokens: int = 256,
    **overrides,
) -> TokenPerception:
    """
    Measure the visual dependency of every token of `completion` (generated greedily when `None`).

    Args:
        model: a vision-language model (e.g. Qwen2.5-VL).
        processor: its processor.
        prompt: the user's text, or a conversation in TRL's format.
        images: the prompt's images.
        completion: the answer to score, as text or token ids; `None` generates one greedily.
        settings: the measurement's [`VPPOConfig`] settings (its defaults when `None`); `overrides` change some of
            them by name (`perturbation="solid"`, `dependency_estimator="kl"`, `perturbation_prob=0.3`...; the short
            names `estimator`, `patch_size`, `prob`, `noise_std` and `blur_radius` work too).
        draws: number of perturbation draws averaged (random perturbations vary from draw to draw).
        seed, completion_index: draw `d` is the one training with `seed` makes for completion `completion_index` of
            its generation batch in round `d + 1` (process 0).
    """
    settings = _settings(settings, overrides)
    if settings.dependency_estimator not in ("k3", "kl"):
        raise ValueError(f"estimator={settings.dependency_estimator!r} is not supported; choose 'k3' or 'kl'.")
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1.")
    prompt_inputs = _prompt_inputs(model, processor, prompt, images)
    prompt_length = prompt_inputs["input_ids"].size(1)
    if completion is None:
        _check_length(model, prompt_length, 1)
        context = _context_length(model) or prompt_length + max_new_tokens
        new_tokens = min(max_new_tokens, context - prompt_length)
        generated = model.generate(**prompt_inputs, max_new_tokens=new_tokens, do_sample=False)
        completion_ids = generated[0, prompt_length:]
        completion = processor.decode(completion_ids, skip_special_tokens=True)
    elif isinstance(completion, str):
        completion_ids = processor.tokenizer(completion, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        completion_ids = completion_ids.to(model.device)
    else:
        completion_ids = torch.as_tensor(list(completion), dtype=torch.long, device=model.device)
        completion = processor.decode(completion_ids, skip_special_tokens=True)
    if completion_ids.numel() == 0:
        raise ValueError("The completion is empty: there is no token to score.")
    _check_length(model, prompt_length, completion_ids.numel())
    inputs = _measurement_inputs(model, processor, prompt, images, completion_ids)
    length, temperature = completion_ids.numel(), settings.temperature
    mask = torch.ones((1, length), device=completion_ids.device)
    total = torch.zeros((1, length), device=completion_ids.device)
    logps = None
    for draw in range(draws):
        perturbed = _perturbed_inputs(inputs, processor, settings, seed, draw, completion_index)
        if settings.dependency_estimator == "k3":
            if logps is None:
                logps = _sampled_token_logps(model, _model_inputs(inputs), completion_ids, temperature)
            perturbed_logps = _sampled_token_logps(model, _model_inputs(perturbed), completion_ids, temperature)
            total += token_dependency(logps, perturbed_logps, mask)
        else:
            backbone, lm_head = _backbone_and_head(model)
            kl, _ = kl_chunk_dependency(
                backbone, lm_head, _model_inputs(inputs), _model_inputs(perturbed), mask, length, temperature
            )
            total += kl
    dependency = total / draws
    kept = shape_group(settings, dependency.tolist()).keep
    ids = completion_ids.tolist()
    tokens, special = display_tokens(processor.tokenizer, ids)
    shown = asdict(settings)
    for shaping_setting in SHAPING_FIELDS:
        if shaping_setting != "token_filter_ratio":
            shown.pop(shaping_setting)
    return TokenPerception(
        tokens=tokens,
        dependency=dependency[0].tolist(),
        kept=kept[0].tolist(),
        trajectory_dependency=trajectory_dependency(dependency, mask).item(),
        completion=completion,
        settings={**shown, "draws": draws, "seed": seed},
        token_ids=ids,
        special=special,
    )


def pixels_to_pil(layout: PixelLayout, pixel_values: torch.Tensor, image_grid_thw=None) -> list[Image.Image]:
    """Images as the model sees them (resized by the processor), rebuilt exactly from `pixel_values`."""
    images = layout.to_images(pixel_values, image_grid_thw)
    return [
        Image.fromarray(image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy(), mode="RGB")
        for image in images
    ]


@torch.no_grad()
def perturbed_views(
    model, processor, prompt, images: Sequence[Image.Image], perturbation: str | None = None, seed: int = 0, *,
    settings: "MeasurementSettings | None" = None, completion_index: int = 0, **overrides,
) -> tuple[list[Image.Image], list[Image.Image]]:  # fmt: skip
    """The images as the model sees them and their perturbed copies (the first draw measured)."""
    if perturbation is not None:
        overrides["perturbation"] = perturbation
    settings = _settings(settings, overrides)
    inputs = _measurement_inputs(model, processor, prompt, images)
    layout = PixelLayout.from_image_processor(processor.image_processor)
    perturbed = _perturbed_inputs(inputs, processor, settings, seed, 0, completion_index)["pixel_values"]
    grid = inputs.get("image_grid_thw")
    return pixels_to_pil(layout, inputs["pixel_values"], grid), pixels_to_pil(layout, perturbed, grid)


@torch.no_grad()
def sample_completions(
    model, processor, prompt, images: Sequence[Image.Image], num_completions: int, *, temperature: float = 1.0,
    max_new_tokens: int = 256, seed: int = 0,
) -> list[list[int]]:  # fmt: skip
    """`num_completions` completions sampled like TRL's training (temperature, no top-k/top-p), up to and with EOS."""
    inputs = _prompt_inputs(model, processor, prompt, images)
    prompt_length = inputs["input_ids"].size(1)
    _check_length(model, prompt_length, 1)
    context = _context_length(model) or prompt_length + max_new_tokens
    torch.manual_seed(seed)
    generated = model.generate(
        **inputs, max_new_tokens=min(max_new_tokens, context - prompt_length), do_sample=True,
        temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=num_completions,
    )  # fmt: skip
    eos = processor.tokenizer.eos_token_id
    completions = []
    for row in generated[:, prompt_length:].tolist():
        completions.append(row[: row.index(eos) + 1] if eos in row else row)
    return completions


def sample_perceptions(
    model,
    processor,
    prompt: str | list[dict],
    images: Sequence[Image.Image],
    completions: Sequence[str | Sequence[int]] | None = None,
    *,
    num_completions: int = 8,
    answer: str | None = None,
    reward_func: Callable[..., list[float]] | None = None,
    settings: "MeasurementSettings | None" = None,
    max_new_tokens: int = 256,
    seed: int = 0,
    draws: int = 1,
    **overrides,
) -> list[TokenPerception]:
    """
    Token perception of several completions of one prompt, as a training group: sampled like training (or the
    `completions` given), each with the TAS scale it gets among the others and, when `answer` is given, its reward.

    The kept tokens and the scales come from the shaping function training calls ([`shape_group`]), with the
    cold-start guard's blend and balance when it is on; the group stands for the generation batch. With rewards, the
    TAS statistics cover the completions whose GRPO advantage (reward minus the group mean) is not zero, as in
    training; without, they cover every completion (the scale each would get with a positive advantage). Completion
    `i` is measured with the draws training makes for completion `i` of a generation batch.
    """
    settings = _settings(settings, overrides)
    if completions is None:
        completions = sample_completions(
            model, processor, prompt, images, num_completions, temperature=settings.temperature,
            max_new_tokens=max_new_tokens, seed=seed,
        )  # fmt: skip
    perceptions = [
        token_perception(
            model,
            processor,
            prompt,
            images,
            completion,
            settings=settings,
            draws=draws,
            seed=seed,
            completion_index=index,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
        for index, completion in enumerate(completions)
    ]
    advantages = None
    if answer is not None and reward_func is not None:
        texts = [item.completion for item in perceptions]
        rewards = reward_func(completions=texts, answer=[answer] * len(texts), prompts=[prompt] * len(texts))
        mean = sum(rewards) / len(rewards)
        for item, reward in zip(perceptions, rewards, strict=True):
            item.reward, item.advantage = float(reward), float(reward) - mean
        advantages = [item.advantage for item in perceptions]
    shaped = shape_group(settings, [item.dependency for item in perceptions], advantages)
    for row, (item, scale) in enumerate(zip(perceptions, shaped.scales.tolist(), strict=True)):
        item.kept = shaped.keep[row, : len(item.dependency)].tolist()
        item.advantage_scale = scale
    return perceptions


def write_spotlight(
    output_dir: str | Path,
    perceptions: Sequence[TokenPerception],
    images: Sequence[Image.Image],
    perturbed_images: Sequence[Image.Image],
    prompt: str,
    *,
    title: str = "Token perception",
    subtitle: str = "",
) -> dict[str, Path]:
    """Write `perception.html`, `perception.png`, `distributions.png` and `perception.json` to `output_dir`."""
    from .spotlight_page import perception_page, save_distributions_png, save_perception_png

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {name: output / name for name in ("perception.html", "perception.png", "distributions.png",
                                               "perception.json")}  # fmt: skip
    view = (perceptions, images, perturbed_images, prompt)
    paths["perception.html"].write_text(perception_page(*view, title=title, subtitle=subtitle), encoding="utf-8")
    save_perception_png(*view, str(paths["perception.png"]), title=title, subtitle=subtitle)
    save_distributions_png(
        [value for item in perceptions for value in item.dependency],
        [item.trajectory_dependency for item in perceptions],
        str(paths["distributions.png"]),
        title=title,
    )
    paths["perception.json"].write_text(
        json.dumps({"prompt": prompt, "completions": [asdict(item) for item in perceptions]}, indent=2),
        encoding="utf-8",
    )
    return paths


def dataset_distributions(
    model,
    processor,
    dataset,
    output_dir: str | Path,
    *,
    num_completions: int = 4,
    reward_func: Callable[..., list[float]] | None = None,
    title: str = "",
    **perception_kwargs,
) -> dict[str, Path]:
    """
    Token and trajectory dependency distributions over every row of `dataset` (TRL's `prompt`/`images`/`answer`
    layout, as [`~vppo_trl.data.load_vppo_dataset`] returns): `num_completions` sampled per row. Writes
    `distributions.png` and `distributions.json` (the shares above each threshold, and every completion's numbers).
    """
    from .spotlight_page import save_distributions_png

    perceptions = []
    for row in dataset:
        perceptions += sample_perceptions(
            model, processor, row["prompt"], row["images"], num_completions=num_completions,
            answer=row.get("answer"), reward_func=reward_func, **perception_kwargs,
        )  # fmt: skip
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"distributions.png": output / "distributions.png", "distributions.json": output / "distributions.json"}
    shares = save_distributions_png(
        [value for item in perceptions for value in item.dependency],
        [item.trajectory_dependency for item in perceptions],
        str(paths["distributions.png"]),
        title=title,
    )
    summary = {
        "rows": len(dataset),
        "completions": len(perceptions),
        "tokens": sum(len(item.tokens) for item in perceptions),
        "share_of_tokens_above": {str(threshold): share for threshold, share in shares.items()},
        "completions_detail": [asdict(item) for item in perceptions],
    }
    paths["distributions.json"].write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return paths


# The perturbation settings each perturbation reads.
PERTURBATION_SETTINGS = {
    "patch_blackening": ("perturbation_patch_size", "perturbation_prob"),
    "gaussian_noise": ("perturbation_noise_std",),
    "gaussian_blur": ("perturbation_blur_radius",),
    "solid": (),
}


def settings_line(settings: dict, model_name: str) -> str:
    """The model and the measurement settings, less those the chosen perturbation does not read."""
    unused = {key for keys in PERTURBATION_SETTINGS.values() for key in keys}
    unused -= set(PERTURBATION_SETTINGS.get(settings.get("perturbation"), ()))
    shown = [f"{key} {value}" for key, value in settings.items() if value is not None and key not in unused]
    return f"{model_name} · " + ", ".join(shown)


def _flatten(values: list) -> list[str]:
    """A repeatable flag's values (`--image a --image b c` gives `[["a"], ["b", "c"]]`), as one list."""
    return [item for value in values for item in (value if isinstance(value, list) else [value])]


@dataclass
class SpotlightArguments:
    """The arguments of `vppo-trl spotlight` besides the measurement settings ([`MeasurementSettings`])."""

    model: str = field(metadata={"help": "Model id or folder (a VPPO checkpoint, a base model...)."})
    image: list[str] = field(
        default_factory=list, metadata={"help": "Image file; repeat for several images.", "action": "append"}
    )
    prompt: str | None = field(default=None, metadata={"help": "The question asked about the image(s)."})
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Instead of --image and --prompt: the dependency distributions over the first --max-rows rows of "
            "a dataset (any source `vppo-trl train` reads: a parquet/JSON Lines file, a folder, a Hub id), "
            "--num-completions sampled per row, rewarded against its answers."
        },
    )
    split: str = field(default="train", metadata={"help": "Split of --dataset."})
    max_rows: int = field(default=16, metadata={"help": "Rows of --dataset used."})
    completion: list[str] = field(
        default_factory=list,
        metadata={
            "help": "An answer to score instead of sampling; repeat to compare several. By default the model answers.",
            "action": "append",
        },
    )
    num_completions: int = field(
        default=1,
        metadata={
            "help": "Completions sampled like training (temperature, no top-k/top-p) and shown sorted by trajectory "
            "dependency, each with its TAS scale; 1 (default) is the greedy answer."
        },
    )
    answer: str | None = field(
        default=None, metadata={"help": "Ground-truth answer: each completion's reward is shown."}
    )
    reward: str = field(
        default="accuracy",
        metadata={"help": f"Reward function for --answer: one of {sorted(REWARD_FUNCTIONS)} or a dotted import path."},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion generated."})
    draws: int = field(default=4, metadata={"help": "Perturbation draws averaged."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the sampling and of the draws (draw d is training's round d + 1)."}
    )
    device: str | None = field(default=None, metadata={"help": "Device the model runs on (default: cuda if any)."})
    output_dir: str = field(default="spotlight", metadata={"help": "Folder the files are written to."})

    def __post_init__(self):
        self.image, self.completion = _flatten(self.image), _flatten(self.completion)
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> CommandLineParser:
    """The parser of `vppo-trl spotlight`: its own arguments, and VPPOConfig's measurement fields and defaults."""
    return CommandLineParser(
        (SpotlightArguments, MeasurementSettings),
        prog="vppo-trl spotlight",
        description="Show which tokens of a model's answers depend on the image, measured and shaped through the "
        "functions VPPOTrainer uses (its perturbation draws, estimators, TGF, TAS and cold-start guard). Writes "
        "perception.html (open it in a browser), perception.png (the same view), "
        "distributions.png and perception.json to --output-dir.",
    )


def main(argv: list[str] | None = None) -> None:
    """`vppo-trl spotlight`: an HTML page, a PNG and a JSON file of the token perception of a model's answers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    parser = build_parser()
    args, settings = parser.parse_dataclasses(argv)

    def fail(message: str):
        """One line naming the problem (argparse's `error` would print the whole usage first)."""
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    if args.num_completions < 1 or args.draws < 1 or args.max_new_tokens < 1 or args.max_rows < 1:
        fail("--num-completions, --draws, --max-new-tokens and --max-rows must be >= 1")
    if args.dataset is None and (not args.image or args.prompt is None):
        fail("give --image and --prompt (one prompt's page), or --dataset (distributions over a dataset)")
    images = []
    for path in args.image:
        if not Path(path).is_file():
            fail(f"image file {path!r} not found")
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as error:
            fail(f"cannot read image {path!r}: {error}")
    reward_func = None
    if args.answer is not None or args.dataset is not None:
        from ..rewards import resolve_reward_functions

        try:
            (reward_func,) = resolve_reward_functions([args.reward])
        except ValueError as error:
            fail(str(error))
    if args.model.startswith((".", "/", "~")) and not Path(args.model).expanduser().exists():
        fail(f"model folder {args.model!r} does not exist")
    try:
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto").to(args.device).eval()
        processor = AutoProcessor.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        fail(f"cannot load model {args.model!r}: {str(error).strip().splitlines()[0]}")
    measurement = dict(settings=settings, max_new_tokens=args.max_new_tokens, seed=args.seed, draws=args.draws)
    if args.dataset is not None:
        from ..data import load_vppo_dataset

        try:
            dataset, _ = load_vppo_dataset(args.dataset, args.split, max_rows=args.max_rows)
            paths = dataset_distributions(
                model, processor, dataset, args.output_dir, num_completions=args.num_completions,
                reward_func=reward_func, title=f"{args.model} on {args.dataset} ({len(dataset)} rows)", **measurement,
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as error:
            fail(str(error).strip().splitlines()[0])
        shares = json.loads(paths["distributions.json"].read_text())["share_of_tokens_above"]
        print("Share of tokens above: " + ", ".join(f"{key}: {value:.1%}" for key, value in shares.items()))
        print("Wrote " + ", ".join(str(path) for path in paths.values()))
        return
    completions = args.completion or None
    if completions is None and args.num_completions == 1:
        completions = [None]
    try:
        perceptions = sample_perceptions(
            model, processor, args.prompt, images, completions, num_completions=args.num_completions,
            answer=args.answer, reward_func=reward_func, **measurement,
        )  # fmt: skip
        originals, perturbed = perturbed_views(
            model, processor, args.prompt, images, settings=settings, seed=args.seed
        )
    except ValueError as error:
        fail(str(error))
    paths = write_spotlight(
        args.output_dir, perceptions, originals, perturbed, args.prompt, title="Token perception",
        subtitle=settings_line(perceptions[0].settings, args.model),
    )  # fmt: skip
    for item in sorted(perceptions, key=lambda item: -item.trajectory_dependency):
        ranked = sorted(zip(item.dependency, item.tokens, strict=True), reverse=True)[:5]
        reward = "" if item.reward is None else f", reward {item.reward:g}"
        print(
            f"{item.completion!r}: trajectory dependency {item.trajectory_dependency:.4g}, TAS scale "
            f"{item.advantage_scale:.3f}{reward}; most image-dependent tokens: "
            + ", ".join(f"{token!r} {value:.3g}" for value, token in ranked)
        )
    print("Wrote " + ", ".join(str(path) for path in paths.values()))
