"""See token perception: which tokens of a completion depend on the image, as VPPO measures it.

[`token_perception`] scores one completion with the original and the perturbed image(s), exactly as VPPOTrainer does
during training (same perturbations, same estimators, same token filter), and returns per-token dependencies.
[`sample_perceptions`] does it for several completions of one prompt, sampled like training, with the TAS scale and
reward each gets. `vppo_trl.spotlight_page` draws them (HTML page, PNG, distributions); `vppo-trl spotlight` is the
command line.
"""

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from trl.data_utils import prepare_multimodal_messages

from .core import (
    advantage_scales,
    kl_token_dependency,
    token_dependency,
    top_dependency_mask,
    trajectory_dependency,
)
from .perturbations import PixelLayout, perturb_original_images, perturb_pixel_values
from .spotlight_page import CONTINUATION

# Most tokens one character can be split over (UTF-8 has at most 4 bytes per character).
MAX_CHARACTER_TOKENS = 4


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


@torch.no_grad()
def token_perception(
    model,
    processor,
    prompt: str | list[dict],
    images: Sequence[Image.Image],
    completion: str | Sequence[int] | None = None,
    *,
    perturbation: str = "patch_blackening",
    perturbation_space: str = "original_image",
    estimator: str = "k3",
    token_filter_ratio: float = 0.4,
    draws: int = 1,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    **perturbation_kwargs,
) -> TokenPerception:
    """
    Measure the visual dependency of every token of `completion` (generated greedily when `None`).

    Args:
        model: a vision-language model (e.g. Qwen2.5-VL).
        processor: its processor.
        prompt: the user's text, or a conversation in TRL's format.
        images: the prompt's images.
        completion: the answer to score, as text or token ids; `None` generates one greedily.
        perturbation, perturbation_space, estimator, token_filter_ratio, temperature: as in [`VPPOConfig`].
        draws: number of perturbation draws averaged (random perturbations vary from draw to draw).
        seed: seed of the first draw.
        perturbation_kwargs: `patch_size`, `prob`, `noise_std` or `blur_radius`.
    """
    if estimator not in ("k3", "kl"):
        raise ValueError(f"estimator={estimator!r} is not supported; choose 'k3' or 'kl'.")
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
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([prompt_inputs["input_ids"], completion_ids.unsqueeze(0)], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            inputs[key] = torch.cat([inputs[key], inputs[key].new_zeros(1, completion_ids.numel())], dim=1)

    def completion_logits(model_inputs: dict) -> torch.Tensor:
        logits = model(**model_inputs, use_cache=False).logits[:, prompt_length - 1 : -1]
        return logits.float() / temperature

    logits = completion_logits(inputs)
    logps = torch.log_softmax(logits, -1).gather(-1, completion_ids.view(1, -1, 1)).squeeze(-1)
    mask = torch.ones_like(logps)
    total = torch.zeros_like(logps)
    for draw in range(draws):
        perturbed_pixels = _perturbed_pixels(
            inputs, images, processor, perturbation, perturbation_space, seed + draw, perturbation_kwargs
        )
        perturbed_logits = completion_logits({**inputs, "pixel_values": perturbed_pixels})
        if estimator == "k3":
            perturbed_logps = torch.log_softmax(perturbed_logits, -1).gather(-1, completion_ids.view(1, -1, 1))
            total += token_dependency(logps, perturbed_logps.squeeze(-1), mask)
        else:
            total += kl_token_dependency(logits, perturbed_logits, mask)
    dependency = total / draws
    kept = top_dependency_mask(dependency, mask, token_filter_ratio)
    ids = completion_ids.tolist()
    tokens, special = display_tokens(processor.tokenizer, ids)
    return TokenPerception(
        tokens=tokens,
        dependency=dependency[0].tolist(),
        kept=kept[0].tolist(),
        trajectory_dependency=trajectory_dependency(dependency, mask).item(),
        completion=completion,
        settings={
            "perturbation": perturbation,
            "perturbation_space": perturbation_space,
            "estimator": estimator,
            "token_filter_ratio": token_filter_ratio,
            "draws": draws,
            "seed": seed,
            "temperature": temperature,
            **perturbation_kwargs,
        },
        token_ids=ids,
        special=special,
    )


def _perturbed_pixels(
    inputs: dict, images: Sequence[Image.Image], processor, perturbation: str, space: str, seed: int, kwargs: dict
) -> torch.Tensor:
    """The perturbed `pixel_values`, in `space` as the trainer makes them (`VPPOConfig.perturbation_space`)."""
    pixel_values = inputs["pixel_values"]
    generator = torch.Generator(device=pixel_values.device).manual_seed(seed)
    if space == "original_image":
        perturbed = perturb_original_images(
            images, processor.image_processor, perturbation, generator, pixel_values.device, **kwargs
        )
        return perturbed["pixel_values"].to(pixel_values.dtype)
    if space != "pixel_values":
        raise ValueError(f"perturbation_space={space!r} is not supported; choose 'original_image' or 'pixel_values'.")
    layout = PixelLayout.from_image_processor(processor.image_processor)
    return perturb_pixel_values(
        pixel_values, layout, perturbation, generator, image_grid_thw=inputs.get("image_grid_thw"), **kwargs
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
    model, processor, prompt, images: Sequence[Image.Image], perturbation: str = "patch_blackening", seed: int = 0,
    perturbation_space: str = "original_image", **perturbation_kwargs,
) -> tuple[list[Image.Image], list[Image.Image]]:  # fmt: skip
    """The images as the model sees them and their perturbed copies (the draw of `seed`, the first one measured)."""
    inputs = _prompt_inputs(model, processor, prompt, images)
    layout = PixelLayout.from_image_processor(processor.image_processor)
    perturbed = _perturbed_pixels(
        inputs, images, processor, perturbation, perturbation_space, seed, perturbation_kwargs
    )
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
    advantage_scale_min: float = 0.9,
    advantage_scale_max: float | None = None,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
    **perception_kwargs,
) -> list[TokenPerception]:
    """
    Token perception of several completions of one prompt, as a training group: sampled like training (or the
    `completions` given), each with the TAS scale it gets among the others and, when `answer` is given, its reward.

    With rewards, the TAS statistics cover the completions whose GRPO advantage (reward minus the group mean) is not
    zero, as in training; without, they cover every completion (the scale each would get with a non-zero advantage).
    """
    if completions is None:
        completions = sample_completions(
            model, processor, prompt, images, num_completions, temperature=temperature,
            max_new_tokens=max_new_tokens, seed=seed,
        )  # fmt: skip
    perceptions = [
        token_perception(
            model, processor, prompt, images, completion, temperature=temperature, seed=seed, **perception_kwargs
        )  # fmt: skip
        for completion in completions
    ]
    valid = torch.ones(len(perceptions), dtype=torch.bool)
    if answer is not None and reward_func is not None:
        texts = [item.completion for item in perceptions]
        rewards = reward_func(completions=texts, answer=[answer] * len(texts), prompts=[prompt] * len(texts))
        mean = sum(rewards) / len(rewards)
        for item, reward in zip(perceptions, rewards, strict=True):
            item.reward, item.advantage = float(reward), float(reward) - mean
        valid = torch.tensor([item.advantage != 0 for item in perceptions])
    dependencies = torch.tensor([item.trajectory_dependency for item in perceptions])
    scales = advantage_scales(dependencies, valid, advantage_scale_min, advantage_scale_max)
    for item, scale in zip(perceptions, scales.tolist(), strict=True):
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
    "patch_blackening": ("patch_size", "prob"),
    "gaussian_noise": ("noise_std",),
    "gaussian_blur": ("blur_radius",),
    "solid": (),
}


def settings_line(settings: dict, model_name: str) -> str:
    """The model and the measurement settings, less those the chosen perturbation does not read."""
    unused = {key for keys in PERTURBATION_SETTINGS.values() for key in keys}
    unused -= set(PERTURBATION_SETTINGS.get(settings.get("perturbation"), ()))
    shown = [f"{key} {value}" for key, value in settings.items() if value is not None and key not in unused]
    return f"{model_name} · " + ", ".join(shown)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `vppo-trl spotlight`."""
    from .config import PERTURBATIONS
    from .rewards import REWARD_FUNCTIONS

    parser = argparse.ArgumentParser(
        prog="vppo-trl spotlight",
        description="Show which tokens of a model's answers depend on the image, measured exactly as VPPOTrainer "
        "measures them. Writes perception.html (open it in a browser), perception.png (the same view), "
        "distributions.png and perception.json to --output-dir.",
    )
    parser.add_argument("--model", required=True, help="Model id or folder (a VPPO checkpoint, a base model...).")
    parser.add_argument("--image", action="append", help="Image file; repeat for several images.")
    parser.add_argument("--prompt", help="The question asked about the image(s).")
    parser.add_argument(
        "--dataset",
        help="Instead of --image and --prompt: the dependency distributions over the first --max-rows rows of a "
        "dataset (any source `vppo-trl train` reads: a parquet/JSON Lines file, a folder, a Hub id), "
        "--num-completions sampled per row, rewarded against its answers.",
    )  # fmt: skip
    parser.add_argument("--split", default="train", help="Split of --dataset.")
    parser.add_argument("--max-rows", type=int, default=16, help="Rows of --dataset used.")
    parser.add_argument(
        "--completion", action="append",
        help="An answer to score instead of sampling; repeat to compare several. By default the model answers.",
    )  # fmt: skip
    parser.add_argument(
        "--num-completions", type=int, default=1,
        help="Completions sampled like training (temperature, no top-k/top-p) and shown sorted by trajectory "
        "dependency, each with its TAS scale; 1 (default) is the greedy answer.",
    )  # fmt: skip
    parser.add_argument("--answer", help="Ground-truth answer: each completion's reward is shown.")
    parser.add_argument(
        "--reward", default="accuracy",
        help=f"Reward function for --answer: one of {sorted(REWARD_FUNCTIONS)} or a dotted import path.",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Longest completion generated.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling and scoring temperature.")
    parser.add_argument("--perturbation", choices=PERTURBATIONS, default="patch_blackening",
                        help="How the image is made uninformative (as VPPOConfig.perturbation).")  # fmt: skip
    parser.add_argument("--perturbation-space", choices=("original_image", "pixel_values"), default="original_image",
                        help="Perturb the image as given, before resizing (official), or the processed pixels (as "
                        "VPPOConfig.perturbation_space).")  # fmt: skip
    parser.add_argument("--patch-size", type=int, default=14, help="Patch side in pixels (patch_blackening).")
    parser.add_argument("--perturbation-prob", type=float, default=0.5,
                        help="Probability that a patch is blackened (patch_blackening).")  # fmt: skip
    parser.add_argument("--noise-std", type=float, default=189.0, help="Noise sigma, 0-255 units (gaussian_noise).")
    parser.add_argument("--blur-radius", type=float, default=6.0, help="Blur radius in pixels (gaussian_blur).")
    parser.add_argument("--estimator", choices=("k3", "kl"), default="k3",
                        help="Token dependency estimator (as VPPOConfig.dependency_estimator).")  # fmt: skip
    parser.add_argument("--token-filter-ratio", type=float, default=0.4,
                        help="Share of each completion's tokens TGF keeps (as in VPPOConfig).")  # fmt: skip
    parser.add_argument("--advantage-scale-min", type=float, default=0.9, help="TAS beta_min (as in VPPOConfig).")
    parser.add_argument("--advantage-scale-max", type=float, default=None,
                        help="TAS beta_max; unset: dynamic range, mean scale 1 (as in VPPOConfig).")  # fmt: skip
    parser.add_argument("--draws", type=int, default=4, help="Perturbation draws averaged.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling and of the first draw.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Device the model runs on.")  # fmt: skip
    parser.add_argument("--output-dir", default="spotlight", help="Folder the files are written to.")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`vppo-trl spotlight`: an HTML page, a PNG and a JSON file of the token perception of a model's answers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str):
        """One line naming the problem (argparse's `error` would print the whole usage first)."""
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    if args.num_completions < 1 or args.draws < 1 or args.max_new_tokens < 1 or args.max_rows < 1:
        fail("--num-completions, --draws, --max-new-tokens and --max-rows must be >= 1")
    if args.dataset is None and (args.image is None or args.prompt is None):
        fail("give --image and --prompt (one prompt's page), or --dataset (distributions over a dataset)")
    images = []
    for path in args.image or []:
        if not Path(path).is_file():
            fail(f"image file {path!r} not found")
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as error:
            fail(f"cannot read image {path!r}: {error}")
    reward_func = None
    if args.answer is not None or args.dataset is not None:
        from .rewards import resolve_reward_functions

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
    # All four, as the trainer passes them: each perturbation reads its own.
    perturbation_kwargs = dict(
        patch_size=args.patch_size, prob=args.perturbation_prob, noise_std=args.noise_std, blur_radius=args.blur_radius
    )
    if args.dataset is not None:
        from .data import load_vppo_dataset

        try:
            dataset, _ = load_vppo_dataset(args.dataset, args.split, max_rows=args.max_rows)
            paths = dataset_distributions(
                model, processor, dataset, args.output_dir, num_completions=args.num_completions,
                reward_func=reward_func, title=f"{args.model} on {args.dataset} ({len(dataset)} rows)",
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                perturbation=args.perturbation, perturbation_space=args.perturbation_space, estimator=args.estimator,
                token_filter_ratio=args.token_filter_ratio, draws=args.draws, **perturbation_kwargs,
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as error:
            fail(str(error).strip().splitlines()[0])
        shares = json.loads(paths["distributions.json"].read_text())["share_of_tokens_above"]
        print("Share of tokens above: " + ", ".join(f"{key}: {value:.1%}" for key, value in shares.items()))
        print("Wrote " + ", ".join(str(path) for path in paths.values()))
        return
    completions = args.completion
    if completions is None and args.num_completions == 1:
        completions = [None]
    try:
        perceptions = sample_perceptions(
            model, processor, args.prompt, images, completions, num_completions=args.num_completions,
            answer=args.answer, reward_func=reward_func, advantage_scale_min=args.advantage_scale_min,
            advantage_scale_max=args.advantage_scale_max, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, seed=args.seed, perturbation=args.perturbation,
            perturbation_space=args.perturbation_space, estimator=args.estimator,
            token_filter_ratio=args.token_filter_ratio, draws=args.draws, **perturbation_kwargs,
        )  # fmt: skip
        originals, perturbed = perturbed_views(
            model, processor, args.prompt, images, args.perturbation, args.seed, args.perturbation_space,
            **perturbation_kwargs,
        )  # fmt: skip
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
