"""Every process runs the vision tower in every scoring forward, so that ZeRO-3 and FSDP gather in step.

Under DeepSpeed ZeRO-3 (and FSDP) a module's parameters are gathered collectively when it runs. A process whose
batch holds no image skips the vision tower while the others run it, and the processes wait on each other forever:
a hang reported for many trainers (DeepSpeed, ms-swift, Qwen-VL). The fix used there is applied here without
touching the model's code: when a forward has no `pixel_values`, the vision tower runs on a tiny blank image right
after the token embedding (where the real image features are computed), and `0 x` its output is added to the
embeddings, so that the backward pass runs through the tower too. The output is unchanged.
"""

from typing import Any

import torch
from PIL import Image


def _sum_of_tensors(output: Any) -> torch.Tensor:
    """Sum of every tensor in a vision tower's output (a tensor, a tuple, a list or a `ModelOutput`)."""
    if isinstance(output, torch.Tensor):
        return output.float().sum()
    values = output.values() if isinstance(output, dict) else output
    return sum(_sum_of_tensors(value) for value in values if isinstance(value, (torch.Tensor, tuple, list, dict)))


class VisionTowerSync:
    """
    Forward hooks on a Qwen-VL-style model that run its vision tower on a blank image when a forward has no image.

    Only forwards without a filled cache are concerned (training, scoring and generation prefill), not the decoding
    steps of generation, which run no vision tower on any process.
    """

    def __init__(self, model: torch.nn.Module, image_processor: Any):
        backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = getattr(backbone, "model", backbone)
        self.visual = backbone.visual
        side = image_processor.patch_size * getattr(image_processor, "merge_size", 1)
        blank = image_processor(images=[Image.new("RGB", (side, side))], return_tensors="pt")
        self.pixel_values = blank["pixel_values"]
        self.image_grid_thw = blank["image_grid_thw"]
        self._needs_image = False
        self.handles = [
            backbone.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            backbone.get_input_embeddings().register_forward_hook(self._after_embedding),
        ]

    def _before_forward(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        self._needs_image = kwargs.get("pixel_values") is None and prefill

    def _after_embedding(self, module, args, embeddings: torch.Tensor) -> torch.Tensor | None:
        if not self._needs_image:
            return None
        self._needs_image = False
        parameter = next(self.visual.parameters())
        features = self.visual(
            self.pixel_values.to(device=embeddings.device, dtype=parameter.dtype),
            grid_thw=self.image_grid_thw.to(embeddings.device),
        )
        return embeddings + 0.0 * _sum_of_tensors(features).to(embeddings.dtype)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
