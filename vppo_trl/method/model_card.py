"""The VPPO section of a model card: which method trained the model, from which paper, with which settings.

TRL's card names the base model, the dataset and the trainer; this section adds what someone reproducing or comparing
the model needs to know about VPPO itself.
"""

from dataclasses import fields
from pathlib import Path

from .config import VPPOConfig

PAPER_TITLE = "Spotlight on Token Perception for Multimodal Reinforcement Learning"
PAPER_URL = "https://arxiv.org/abs/2510.09285"
# HTML comments, invisible on the Hub, that delimit the section so it can be found and replaced.
SECTION_BEGIN = "<!-- vppo-trl:begin -->"
SECTION_END = "<!-- vppo-trl:end -->"
# TRL's card template ends with this section; the VPPO section goes right before it.
CITATIONS_HEADING = "## Citations"
# What TRL's card template says when it has no base model (the model was loaded from a local folder).
NO_BASE_MODEL = "a fine-tuned version of [None](https://huggingface.co/None)"


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _perturbation(args: VPPOConfig) -> str:
    details = {
        "patch_blackening": f"{args.perturbation_patch_size}-px patches, each blackened with probability "
        f"{args.perturbation_prob}",
        "gaussian_noise": f"Gaussian noise, sigma {args.perturbation_noise_std} (0-255 pixel units)",
        "gaussian_blur": f"Gaussian blur, radius {args.perturbation_blur_radius} px",
        "solid": "every pixel set to 128",
    }
    where = {
        "original_image": "on the image before the processor resizes it",
        "pixel_values": "on the processed pixel_values",
    }
    return f"`{args.perturbation}`: {details[args.perturbation]}, {where[args.perturbation_space]}"


def _advantage_shaping(args: VPPOConfig) -> str:
    if not args.advantage_shaping:
        return "off"
    if args.advantage_scale_max is None:
        return f"on: scales from {args.advantage_scale_min} up to a per-batch maximum that makes the mean scale 1"
    return f"on: scales from {args.advantage_scale_min} to {args.advantage_scale_max}"


def _token_filter(args: VPPOConfig) -> str:
    if args.token_filter_ratio == 1.0:
        return "1.0 (off: every token gets policy gradient)"
    return f"{args.token_filter_ratio} (share of each completion's tokens, the most image-dependent, trained)"


def vppo_model_card_section(args: VPPOConfig) -> str:
    """Markdown section naming VPPO, its paper and the run's VPPO settings, between markers that locate it."""
    rows = [
        ("Image perturbation", _perturbation(args)),
        ("Dependency estimator", f"`{args.dependency_estimator}`"),
        ("Token filter ratio (TGF)", _token_filter(args)),
        ("Advantage shaping (TAS)", _advantage_shaping(args)),
        ("Entropy penalty coefficient", str(args.entropy_penalty_coef)),
        ("Skip zero-advantage samples", _on_off(args.skip_zero_advantage)),
    ]
    dynamic_sampling = getattr(args, "dynamic_sampling", None)
    if dynamic_sampling is not None:
        rows.append(("Dynamic sampling", _on_off(dynamic_sampling)))
    if dynamic_sampling:
        # Its settings, whatever fields of that family the config has.
        for config_field in fields(args):
            if config_field.name.startswith("dynamic_sampling_"):
                rows.append((f"`{config_field.name}`", str(getattr(args, config_field.name))))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        f"{SECTION_BEGIN}\n"
        "## VPPO\n\n"
        "This model was trained with VPPO (Visually-Perceptive Policy Optimization), from "
        f"[{PAPER_TITLE}]({PAPER_URL}) (arXiv:2510.09285, ICLR 2026). VPPO scores each completion a second time on "
        "a perturbed copy of its images to measure how much every token depends on the image, gives policy gradient "
        "only to the most image-dependent tokens (Token-level Gradient Filtering, TGF) and scales each completion's "
        "advantage by its mean visual dependency (Trajectory-level Advantage Shaping, TAS).\n\n"
        "| Setting | Value |\n"
        "| --- | --- |\n"
        f"{table}\n"
        f"{SECTION_END}\n"
    )


def describe_local_base_model(card: str, model_id: str | None) -> str:
    """
    TRL's card names no base model for a model loaded from a local folder and then reads "a fine-tuned version of
    [None](https://huggingface.co/None)": name the folder instead, without a link to a Hub page that does not exist.
    """
    if NO_BASE_MODEL not in card:
        return card
    described = f"a fine-tuned version of the local model `{model_id}`" if model_id else "a fine-tuned model"
    return card.replace(NO_BASE_MODEL, described)


def append_vppo_section(readme_path: str, args: VPPOConfig, base_model: str | None = None) -> None:
    """
    Add the VPPO section to the model card at `readme_path` (written by TRL's `create_model_card`), before its
    citations, or at the end. A section already there is replaced, so calling this again never duplicates it.
    `base_model` (the model's `_name_or_path`) names a local base model that TRL's card leaves as "[None]".
    """
    path = Path(readme_path)
    card = describe_local_base_model(path.read_text(encoding="utf-8"), base_model)
    section = vppo_model_card_section(args)
    begin, end = card.find(SECTION_BEGIN), card.find(SECTION_END)
    if begin != -1 and end > begin:
        card = card[:begin] + section + card[end + len(SECTION_END) :].removeprefix("\n")
    elif CITATIONS_HEADING in card:
        position = card.index(CITATIONS_HEADING)
        card = card[:position] + section + "\n" + card[position:]
    else:
        card = card.rstrip("\n") + "\n\n" + section
    path.write_text(card, encoding="utf-8")
