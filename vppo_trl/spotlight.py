"""See token perception: which tokens of a completion depend on the image, as VPPO measures it.

[`token_perception`] scores one completion with the original and the perturbed image(s), exactly as VPPOTrainer does
during training (same perturbations, same estimators, same token filter), and returns per-token dependencies.
[`plot_token_perception`] draws them as a bar chart and [`perception_html`] as highlighted text.
"""

import html
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from trl.data_utils import prepare_multimodal_messages

from .core import kl_token_dependency, token_dependency, top_dependency_mask, trajectory_dependency
from .perturbations import PixelLayout, perturb_pixel_values


@dataclass
class TokenPerception:
    """Per-token visual dependency of one completion."""

    tokens: list[str]
    dependency: list[float]
    kept: list[bool]
    trajectory_dependency: float
    completion: str
    settings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@torch.no_grad()
def token_perception(
    model,
    processor,
    prompt: str | list[dict],
    images: Sequence[Image.Image],
    completion: str | Sequence[int] | None = None,
    *,
    perturbation: str = "patch_blackening",
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
        perturbation, estimator, token_filter_ratio, temperature: as in [`VPPOConfig`].
        draws: number of perturbation draws averaged (random perturbations vary from draw to draw).
        seed: seed of the first draw.
        perturbation_kwargs: `patch_size`, `prob`, `noise_std` or `blur_radius`.
    """
    if estimator not in ("k3", "kl"):
        raise ValueError(f"estimator={estimator!r} is not supported; choose 'k3' or 'kl'.")
    if not images:
        raise ValueError("token_perception needs at least one image: without one there is nothing to perturb.")
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1.")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    messages = prepare_multimodal_messages(messages, images=list(images))
    prompt_inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    prompt_length = prompt_inputs["input_ids"].size(1)
    if completion is None:
        generated = model.generate(**prompt_inputs, max_new_tokens=max_new_tokens, do_sample=False)
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
    layout = PixelLayout.from_image_processor(processor.image_processor)
    total = torch.zeros_like(logps)
    for draw in range(draws):
        generator = torch.Generator(device=inputs["pixel_values"].device).manual_seed(seed + draw)
        perturbed_pixels = perturb_pixel_values(
            inputs["pixel_values"],
            layout,
            perturbation,
            generator,
            image_grid_thw=inputs.get("image_grid_thw"),
            **perturbation_kwargs,
        )
        perturbed_logits = completion_logits({**inputs, "pixel_values": perturbed_pixels})
        if estimator == "k3":
            perturbed_logps = torch.log_softmax(perturbed_logits, -1).gather(-1, completion_ids.view(1, -1, 1))
            total += token_dependency(logps, perturbed_logps.squeeze(-1), mask)
        else:
            total += kl_token_dependency(logits, perturbed_logits, mask)
    dependency = total / draws
    kept = top_dependency_mask(dependency, mask, token_filter_ratio)
    return TokenPerception(
        tokens=[processor.tokenizer.decode([token]) for token in completion_ids.tolist()],
        dependency=dependency[0].tolist(),
        kept=kept[0].tolist(),
        trajectory_dependency=trajectory_dependency(dependency, mask).item(),
        completion=completion,
        settings={
            "perturbation": perturbation,
            "estimator": estimator,
            "token_filter_ratio": token_filter_ratio,
            "draws": draws,
            "seed": seed,
            "temperature": temperature,
            **perturbation_kwargs,
        },
    )


def plot_token_perception(perception: TokenPerception, path: str | None = None, max_tokens: int = 120):
    """Bar chart of the dependency of each token; TGF-kept tokens in orange. Saves to `path` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(len(perception.tokens), max_tokens)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.28 * count), 3.6))
    colours = ["tab:orange" if kept else "tab:gray" for kept in perception.kept[:count]]
    axis.bar(range(count), perception.dependency[:count], color=colours)
    axis.set_xticks(range(count))
    axis.set_xticklabels([repr(token)[1:-1] for token in perception.tokens[:count]], rotation=90, fontsize=7)
    axis.set_ylabel(f"visual dependency ({perception.settings.get('estimator', 'k3')})")
    kept_share = sum(perception.kept) / max(len(perception.kept), 1)
    axis.set_title(
        f"Token perception (mean {perception.trajectory_dependency:.3g})\norange: kept by TGF ({kept_share:.0%})"
    )
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def perception_html(perception: TokenPerception) -> str:
    """The completion as HTML, each token shaded by its dependency and kept tokens underlined."""
    peak = max(perception.dependency, default=0.0) or 1.0
    spans = []
    for token, value, kept in zip(perception.tokens, perception.dependency, perception.kept, strict=True):
        style = f"background: rgba(255, 140, 0, {value / peak:.3f});"
        if kept:
            style += " border-bottom: 2px solid #c05000;"
        spans.append(f'<span title="{value:.4g}" style="{style}">{html.escape(token)}</span>')
    return '<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.8">' + "".join(spans) + "</div>"


def main(argv: list[str] | None = None) -> None:
    """`vppo-trl spotlight`: write a bar chart, an HTML page and a JSON file of one completion's token perception."""
    import argparse
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .config import PERTURBATIONS

    parser = argparse.ArgumentParser(prog="vppo-trl spotlight", description=main.__doc__)
    parser.add_argument("--model", required=True, help="Model id or folder (a VPPO checkpoint, a base model...).")
    parser.add_argument("--image", action="append", required=True, help="Image file; repeat for several images.")
    parser.add_argument("--prompt", required=True, help="The question asked about the image(s).")
    parser.add_argument("--completion", help="Answer to score; by default the model answers greedily.")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--perturbation", choices=PERTURBATIONS, default="patch_blackening")
    parser.add_argument("--estimator", choices=("k3", "kl"), default="k3")
    parser.add_argument("--token-filter-ratio", type=float, default=0.4)
    parser.add_argument("--draws", type=int, default=4, help="Perturbation draws averaged.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default="spotlight")
    args = parser.parse_args(argv)

    images = []
    for path in args.image:
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as error:
            parser.error(f"cannot read image {path!r}: {error}")
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto").to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    perception = token_perception(
        model,
        processor,
        args.prompt,
        images,
        completion=args.completion,
        perturbation=args.perturbation,
        estimator=args.estimator,
        token_filter_ratio=args.token_filter_ratio,
        draws=args.draws,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    plot_token_perception(perception, str(output / "perception.png"))
    (output / "perception.html").write_text(perception_html(perception), encoding="utf-8")
    (output / "perception.json").write_text(perception.to_json(), encoding="utf-8")
    print(f"Completion: {perception.completion!r}")
    print(f"Mean visual dependency: {perception.trajectory_dependency:.4g}")
    ranked = sorted(zip(perception.dependency, perception.tokens, strict=True), reverse=True)[:10]
    print("Most image-dependent tokens: " + ", ".join(f"{token!r} {value:.3g}" for value, token in ranked))
    print(f"Wrote {output / 'perception.png'}, {output / 'perception.html'} and {output / 'perception.json'}")
