"""Processes whose batch holds no image keep in step with the others: no hang under ZeRO-3, FSDP or DDP.

Every process runs the vision tower in every scoring forward, so that ZeRO-3 and FSDP gather in step.

Under DeepSpeed ZeRO-3 (and FSDP) a module's parameters are gathered collectively when it runs. A process whose
batch holds no image skips the vision tower while the others run it, and the processes wait on each other forever:
a hang reported for many trainers (DeepSpeed, ms-swift, Qwen-VL). The fix used there is applied here without
touching the model's code: when a forward has no `pixel_values`, the vision tower runs on a tiny blank image between
the token embedding and the decoder layers (where the real image features are merged in), and `0 x` its output is
added to the embeddings, so that the backward pass runs through the tower too. The output is unchanged.
"""

import inspect
import warnings
from typing import Any

import torch
from accelerate.utils import gather_object
from PIL import Image

from ..method.shared_state import SharedStateMixin


def _image_embeddings(output: Any) -> torch.Tensor:
    """The tensor of a vision tower's output that the model feeds to its language model (the merged features)."""
    if getattr(output, "pooler_output", None) is not None:
        return output.pooler_output
    return output[0] if isinstance(output, (tuple, list)) else output


def _deepstack_features(output: Any) -> list[torch.Tensor] | None:
    """Qwen3-VL's features of inner vision layers, if the vision tower returns any."""
    features = getattr(output, "deepstack_features", None)
    if features is None and isinstance(output, (tuple, list)) and len(output) > 1:
        features = output[1]
    return list(features) if isinstance(features, (tuple, list)) else None


class VisionTowerSync:
    """
    Forward hooks on a Qwen-VL backbone (the module with `visual` and the token embedding) that run its vision tower
    on a blank image when a forward has no image.

    Only forwards without a filled cache are concerned (training, scoring and generation prefill), not the decoding
    steps of generation, which run no vision tower on any process.
    """

    def __init__(self, backbone: torch.nn.Module, image_processor: Any):
        self.visual = backbone.visual
        side = image_processor.patch_size * getattr(image_processor, "merge_size", 1)
        blank = image_processor(images=[Image.new("RGB", (side, side))], return_tensors="pt")
        self.pixel_values = blank["pixel_values"]
        self.image_grid_thw = blank["image_grid_thw"]
        self._needs_image = False
        self.takes_deepstack = (
            "deepstack_visual_embeds" in inspect.signature(backbone.language_model.forward).parameters
        )
        self.handles = [
            backbone.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            backbone.language_model.register_forward_pre_hook(self._before_language_model, with_kwargs=True),
        ]

    def _before_forward(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        self._needs_image = kwargs.get("pixel_values") is None and prefill

    def _before_language_model(self, module, args, kwargs):
        if not self._needs_image or kwargs.get("inputs_embeds") is None:
            return None
        self._needs_image = False
        embeddings = kwargs["inputs_embeds"]
        parameter = next(self.visual.parameters())
        features = self.visual(
            self.pixel_values.to(device=embeddings.device, dtype=parameter.dtype),
            grid_thw=self.image_grid_thw.to(embeddings.device),
        )
        # Between the embedding and the decoder layers, like real image features: the same order of parameter
        # gathering on every process, forward and backward.
        kwargs["inputs_embeds"] = embeddings + 0.0 * _image_embeddings(features).sum().to(embeddings.dtype)
        deepstack = _deepstack_features(features)
        if deepstack and self.takes_deepstack and kwargs.get("deepstack_visual_embeds") is None:
            # Qwen3-VL adds features of inner vision layers inside its first decoder layers: pass empty ones (no
            # visual position), so that their gradients flow back at the same point of the backward pass.
            kwargs["visual_pos_masks"] = torch.zeros(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device)
            kwargs["deepstack_visual_embeds"] = [feature[:0].to(embeddings.dtype) for feature in deepstack]
        return args, kwargs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ImagelessProcessMixin(SharedStateMixin):
    """
    Keeps a process whose whole batch is text-only in step with processes that have images, for GRPOTrainer
    subclasses: under ZeRO-3 or FSDP it runs the vision tower on a blank image ([`VisionTowerSync`]), and on any
    multi-process run it takes part in the gathering of the images that TRL logs (TRL 1.16 skips that collective on a
    process without images, and the other processes then wait for it forever).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._vision_syncs = []
        if not self.shared.forward_passes_must_match:
            return
        for model in (self.model, self.ref_model):
            if model is None:
                continue
            model = getattr(model, "module", model)  # a DeepSpeed engine wraps the reference model
            backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
            backbone = getattr(backbone, "model", backbone)
            if not hasattr(backbone, "visual"):
                warnings.warn(
                    f"{type(model).__name__} has no Qwen-VL vision tower (`model.visual`): under ZeRO-3 or FSDP, keep "
                    "images in every process's batch, or a process with only text-only prompts will wait forever.",
                    stacklevel=2,
                )
                return
            self._vision_syncs.append(VisionTowerSync(backbone, self.processing_class.image_processor))

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        gather_images = self.log_multimodal and self.accelerator.num_processes > 1
        if not gather_images:
            return super()._generate_and_score_completions(inputs)
        self.log_multimodal = False
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.log_multimodal = True
        self._logs["images"].extend(gather_object([example.get("images") or None for example in inputs]))
        return output
