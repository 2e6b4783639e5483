"""The vision side of a vision-language model, found from its own structure, for every family.

A transformers VLM's backbone (`model.model`) holds its decoder (`get_decoder()`), its vision tower and the projector
that maps image features to the decoder's width, under names that vary by family: [`vision_parts`] finds them. The
tower is every child of the backbone that is neither the decoder nor a projector, less the projector parts some towers
hold inside (Qwen-VL's and GLM-4.1V's mergers); the names of projectors are the one declarative piece.
"""

from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl.trainer.utils import get_config_model_id

# Names of the modules that map image features to the language model's width (projectors), as families name them:
# beside the tower (LLaVA and most others, Idefics3 and SmolVLM's connector, Gemma 4's embedder) or inside it (the
# patch mergers of Qwen-VL and GLM-4.1V, Qwen3-VL's DeepStack mergers, GLM-4.1V's down-sampling convolution).
PROJECTOR_NAMES = (
    "multi_modal_projector",
    "connector",
    "embed_vision",
    "merger",
    "deepstack_merger_list",
    "downsample",
)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` without its PEFT wrapper."""
    return model.get_base_model() if is_peft_model(model) else model


def family_name(model: torch.nn.Module) -> str:
    model = base_model(model)
    return f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"


def vision_parts(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """
    The vision tower's modules and the projector's modules of a VLM (`*ForConditionalGeneration`, PEFT-wrapped or
    not). Raises `ValueError` naming the family when its structure shows no vision tower.
    """
    model = base_model(model)
    backbone = getattr(model, "model", model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    towers, projectors = [], []
    if decoder is backbone:  # a language model alone
        decoder = None
    for name, child in backbone.named_children() if decoder is not None else ():
        if child is decoder or name in ("language_model", "text_model"):
            continue
        (projectors if name in PROJECTOR_NAMES else towers).append(child)
    for tower in towers:
        projectors += [child for name, child in tower.named_children() if name in PROJECTOR_NAMES]
    if decoder is None or not towers:
        raise ValueError(
            f"Cannot find the vision tower of {family_name(model)}: its backbone "
            f"({type(backbone).__name__}) has children {[name for name, _ in backbone.named_children()]}, none of "
            "them a vision tower beside a decoder (`get_decoder()`)."
        )
    return towers, projectors


def vision_tower_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters of the vision tower, projector excluded, by name (in `model.named_parameters()`)."""
    towers, projectors = vision_parts(model)
    projector_ids = {id(p) for projector in projectors for p in projector.parameters()}
    tower_ids = {id(p) for tower in towers for p in tower.parameters()} - projector_ids
    return {name: p for name, p in model.named_parameters() if id(p) in tower_ids}


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Stop training the vision tower (LoRA adapters in it included); the projector and decoder train on. Returns the
    number of parameters frozen."""
    frozen = vision_tower_parameters(model)
    for parameter in frozen.values():
        parameter.requires_grad_(False)
    return sum(p.numel() for p in frozen.values())


def check_vision_model(model: torch.nn.Module, processing_class: Any) -> None:
    """Refuse a model without a vision tower, or a processor without an image processor: nothing to perturb."""
    model = base_model(model)
    if getattr(model.config, "vision_config", None) is None:
        raise ValueError(
            f"VPPOTrainer needs a vision-language model, but {type(model).__name__} "
            f"({get_config_model_id(model.config)}) has no vision tower (its config has no `vision_config`)."
        )
    if getattr(processing_class, "image_processor", None) is None:
        raise ValueError(
            f"VPPOTrainer needs a processor with an image processor to perturb images, got "
            f"{type(processing_class).__name__}. Pass the model's processor as `processing_class`."
        )
