"""Processes whose batch holds no image keep in step with the others: no hang under ZeRO-3, FSDP or DDP.

Every process runs the vision tower in every scoring forward, so that ZeRO-3 and FSDP gather in step.

Under DeepSpeed ZeRO-3 (and FSDP) a module's parameters are gathered collectively when it runs. A process whose
batch holds no image skips the vision tower while the others run it, and the processes wait on each other forever:
a hang reported for many trainers (DeepSpeed, ms-swift, Qwen-VL). The fix used there is applied here without
touching the model's code, for every family: when a forward has no `pixel_values`, the model's own image path
(`get_image_features`: vision tower and projector) runs on a small blank image, processed by the model's processor,
between the token embedding and the decoder (where real image features are merged in), and `0 x` its output is added
to the embeddings, so that the backward pass runs through the tower too. The output is unchanged.

The hooks are on only while the trainer trains, evaluates or predicts: the model handed back afterwards runs no
vision tower on a text-only input.
"""

import contextlib
import inspect
from typing import Any

import torch
from accelerate.utils import gather_object
from PIL import Image

from ..method.perturbations import process_images
from ..method.shared_state import SharedStateMixin
from ..method.vision import base_model, check_vision_model, family_name

# Side of the blank image: small, and a size every processor takes as it is (4 x 4 patches of 14 px).
BLANK_SIDE = 56


def _image_features(output: Any) -> list[torch.Tensor]:
    """The tensors of `get_image_features`' output that the model merges into the embeddings (`pooler_output` of a
    model output; not the tower's other outputs, which the model does not use)."""
    pooled = getattr(output, "pooler_output", None)
    return _tensors(pooled if pooled is not None else output)


def _tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor of an image-feature output (a tensor, a tuple or list of them, or a model output)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _tensors(item)]
    return []


def _deepstack_features(output: Any) -> list[torch.Tensor] | None:
    """Qwen3-VL's features of inner vision layers, if the image path returns any (one tensor per layer; the model
    splits each per image)."""
    features = getattr(output, "deepstack_features", None)
    if not isinstance(features, (tuple, list)):
        return None
    return [torch.cat(list(feature)) if isinstance(feature, (tuple, list)) else feature for feature in features]


class VisionTowerSync:
    """
    Forward hooks on a VLM's backbone (`model.model`, with `get_image_features`) and on its decoder that run the
    model's image path on a blank image when a forward has no image, while in a `with` block (blocks may nest).

    Only forwards without a filled cache are concerned (training, scoring and generation prefill), not the decoding
    steps of generation, which run no vision tower on any process. Raises `ValueError` naming the family and the
    reason when its image path cannot be run this way (when built: before any hook is added).
    """

    def __init__(self, model: torch.nn.Module, processor: Any):
        model = base_model(model)
        backbone = getattr(model, "model", model)
        family = family_name(model)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if not hasattr(backbone, "get_image_features") or decoder is None or decoder is backbone:
            raise ValueError(
                f"{family} has no image path VPPO can run on its own (`get_image_features` on "
                f"{type(backbone).__name__} and a separate decoder), so a process whose batch has no image cannot "
                "keep in step under ZeRO-3 or FSDP: keep images in every process's batch, or train without sharding."
            )
        try:
            blank = process_images(processor, [[Image.new("RGB", (BLANK_SIDE, BLANK_SIDE))]])
        except Exception as error:  # any failure of the processor is the reason given
            raise ValueError(
                f"{family}'s processor cannot process a blank image ({type(error).__name__}: {error}), so a process "
                "whose batch has no image cannot keep in step under ZeRO-3 or FSDP: keep images in every process's "
                "batch, or train without sharding."
            ) from error
        accepted = inspect.signature(backbone.get_image_features).parameters
        self.image_features = backbone.get_image_features
        self.inputs = {key: value for key, value in blank.items() if key in accepted}
        self._needs_image = False
        self.takes_deepstack = "deepstack_visual_embeds" in inspect.signature(decoder.forward).parameters
        self.backbone, self.decoder = backbone, decoder
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.depth = 0  # `with` blocks entered and not left

    def __enter__(self) -> "VisionTowerSync":
        if self.depth == 0:
            self.handles = [
                self.backbone.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                self.decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True),
            ]
        self.depth += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.remove()

    def _before_forward(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        self._needs_image = kwargs.get("pixel_values") is None and prefill

    def _before_decoder(self, module, args, kwargs):
        if not self._needs_image or kwargs.get("inputs_embeds") is None:
            return None
        self._needs_image = False
        embeddings = kwargs["inputs_embeds"]
        dtype = next(module.parameters()).dtype
        inputs = {
            key: value.to(device=embeddings.device, dtype=dtype if value.is_floating_point() else value.dtype)
            for key, value in self.inputs.items()
        }
        features = self.image_features(**inputs)
        # Between the embedding and the decoder layers, like real image features: the same order of parameter
        # gathering on every process, forward and backward.
        total = sum(tensor.float().sum() for tensor in _image_features(features) if tensor.is_floating_point())
        kwargs["inputs_embeds"] = embeddings + 0.0 * total.to(embeddings.dtype)
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
        self.handles, self._needs_image = [], False


class ImagelessProcessMixin(SharedStateMixin):
    """
    Keeps a process whose whole batch is text-only in step with processes that have images, for GRPOTrainer
    subclasses: under ZeRO-3 or FSDP it runs the vision tower on a blank image ([`VisionTowerSync`], while `train`,
    `evaluate` or `predict` runs, even when it raises; a family whose image path cannot run that way is refused when
    the trainer is built), and on any multi-process run it takes part in the gathering of the images that TRL logs
    (TRL 1.16 skips that collective on a process without images, and the other processes then wait for it forever).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._vision_syncs = []
        if not self.shared.forward_passes_must_match:
            return
        check_vision_model(self.accelerator.unwrap_model(self.model), self.processing_class)
        for model in (self.model, self.ref_model):
            if model is None:
                continue
            model = getattr(model, "module", model)  # a DeepSpeed engine wraps the reference model
            self._vision_syncs.append(VisionTowerSync(model, self.processing_class))

    @contextlib.contextmanager
    def _vision_towers_in_step(self):
        """The blank-image hooks on, inside the block only: the user's model is handed back as it was given."""
        with contextlib.ExitStack() as hooks:
            for sync in self._vision_syncs:
                hooks.enter_context(sync)
            yield

    def train(self, *args, **kwargs):
        with self._vision_towers_in_step():
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self._vision_towers_in_step():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._vision_towers_in_step():
            return super().predict(*args, **kwargs)

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
