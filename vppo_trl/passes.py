"""VPPO's measurement: the batch scored again on perturbed images, and each token's visual dependency.

[`VisualDependencyPassesMixin`] holds the forward passes of [`VPPOTrainer`]: the perturbation of a generation
batch's images (on the images as loaded, or on the processed pixels), the original- and perturbed-image passes of
the `k3` and `kl` estimators, in eval mode and without gradient, on the completions that need measuring, with the same
number of passes on every process where parameters are sharded.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from transformers.utils import logging
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, maybe_gather_lm_head_ctx

from .batch_rows import model_inputs, select_rows
from .core import kl_token_dependency, token_dependency
from .perturbations import perturb_original_images, perturb_pixel_values

logger = logging.get_logger(__name__)

# Batch key of each completion's images as the data delivered them (perturbation_space="original_image").
IMAGES_KEY = "vppo_images"
# Image layouts the perturbation cannot rebuild (tiled or position-indexed pixels).
UNSUPPORTED_PIXEL_KEYS = ("spatial_shapes", "num_tiles", "image_position_ids")
# Logits (rows x positions x vocabulary) per chunk when the `kl` estimator projects hidden states onto the
# vocabulary: 2**25 float32 values are 128 MiB per temporary, whatever the batch, length and vocabulary.
KL_LOGITS_PER_CHUNK = 2**25


class VisualDependencyPassesMixin:
    """The perturbed (and, where needed, original-image) forward passes of VPPO, for GRPOTrainer subclasses."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._warned_image_mismatch = False

    def _generate_and_score_round(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        output = super()._generate_and_score_round(inputs)
        if self.args.perturbation_space == "original_image" and output.get("num_images") is not None:
            images = completion_images(inputs)
            if [len(row) for row in images] == list(output["num_images"]):
                output[IMAGES_KEY] = images
            elif not self._warned_image_mismatch:
                # Tool calls can add images to a completion: only the processed pixels hold all of them.
                logger.warning(
                    "The batch's images are not those of the training data (tool images?): perturbing the processed "
                    "pixel_values instead (perturbation_space='pixel_values')."
                )
                self._warned_image_mismatch = True
        return output

    def _visual_dependency(
        self, batch: dict[str, Any], rows: list[int], mask: torch.Tensor, measure: Callable | None = None
    ) -> torch.Tensor:
        """`[B, T]` token dependencies (or what `measure` gives for the perturbed batch) for `rows`, 0 elsewhere."""
        unsupported = [key for key in UNSUPPORTED_PIXEL_KEYS if key in batch]
        if unsupported:
            raise ValueError(
                f"VPPO cannot perturb this model's images: its processor returns {unsupported}. Supported layouts are "
                "Qwen-VL patch rows (`image_grid_thw`) and plain [N, C, H, W] `pixel_values`."
            )
        measured_rows = rows
        if self._forward_passes_must_match():
            # Pad with repeats so that every process runs as many forward passes; the repeats are discarded.
            counts = self.accelerator.gather(torch.tensor([len(rows)], device=mask.device))
            target = int(counts.max())
            filler = rows[:1] or self._rows_with_images(batch)[:1] or [0]
            measured_rows = rows + filler * (target - len(rows))
            if not measured_rows:
                return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)

        dependency = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        # The whole batch is perturbed, so each completion's draw does not depend on which rows are measured.
        perturbed = (
            {**batch, "pixel_values": self._perturbed_pixel_values(batch)} if "pixel_values" in batch else batch
        )
        logits_to_keep = mask.size(1)
        if measure is None:
            measure = self._k3_dependency if self.args.dependency_estimator == "k3" else self._kl_dependency
        # Both passes in eval mode (no dropout), as the official code scores them.
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            eval_mode(self.model),
        ):
            measured = measure(batch, perturbed, measured_rows, mask, logits_to_keep)
        if rows:
            dependency[rows] = measured[: len(rows)]
        return dependency

    def _rows_with_images(self, batch: dict[str, Any]) -> list[int]:
        return [i for i, n in enumerate(batch.get("num_images") or []) if n]

    def _perturbed_pixel_values(self, batch: dict[str, Any]) -> torch.Tensor:
        """
        Every image of the generation batch perturbed, with a draw seeded by trainer seed, round and process.

        On the images as the data delivered them when the batch carries them (`perturbation_space="original_image"`),
        otherwise on the processed `pixel_values`. Either way the result has the batch's layout, shape and dtype.
        """
        pixel_values = batch["pixel_values"]
        seed = hash((self.args.seed, self._perturbation_round, self.accelerator.process_index)) % (2**63)
        generator = torch.Generator(device=pixel_values.device).manual_seed(seed)
        args = self.args
        kwargs = {
            "patch_size": args.perturbation_patch_size,
            "prob": args.perturbation_prob,
            "noise_std": args.perturbation_noise_std,
            "blur_radius": args.perturbation_blur_radius,
        }
        if IMAGES_KEY not in batch:
            return perturb_pixel_values(
                pixel_values,
                self.pixel_layout,
                args.perturbation,
                generator,
                image_grid_thw=batch.get("image_grid_thw"),
                **kwargs,
            )
        images = [image for row in batch[IMAGES_KEY] for image in row]
        processed = perturb_original_images(
            images, self.processing_class.image_processor, args.perturbation, generator, pixel_values.device, **kwargs
        )
        grid = batch.get("image_grid_thw")
        if processed["pixel_values"].shape != pixel_values.shape or (
            grid is not None and not torch.equal(processed["image_grid_thw"].to(grid.device), grid)
        ):
            raise RuntimeError(
                "The perturbed images do not have the original batch's token layout (the processor was called with "
                "other settings for the batch?); set perturbation_space='pixel_values'."
            )
        return processed["pixel_values"].to(pixel_values.dtype)

    @staticmethod
    def _select_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict:
        """Model inputs for the completions `rows` of a generation batch (prompt + completion)."""
        if list(rows) == list(range(batch["prompt_ids"].size(0))):
            return model_inputs(batch)  # nothing skipped: no copies
        return model_inputs(select_rows(batch, list(rows)))

    def _score_tokens(self, inputs: dict, logits_to_keep: int, compute_entropy: bool = False):
        """Log-probs (and entropies) of the completion tokens of `inputs`, chunked like TRL's own scoring."""
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            self.model,
            inputs["input_ids"],
            inputs["attention_mask"],
            logits_to_keep,
            batch_size=self.args.per_device_train_batch_size,
            compute_entropy=compute_entropy,
            **{key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")},
        )
        return logps, entropies

    def _sampled_token_logps(self, inputs: dict, logits_to_keep: int) -> torch.Tensor:
        return self._score_tokens(inputs, logits_to_keep)[0]

    def _original_token_entropies(self, batch, perturbed, rows, mask, logits_to_keep) -> torch.Tensor:
        """The policy's per-token entropies on the original images (the `entropy` token filter criterion)."""
        return self._score_tokens(self._select_rows(batch, rows), logits_to_keep, compute_entropy=True)[1]

    def _perturbed_token_logps(self, batch, perturbed, rows, mask, logits_to_keep) -> torch.Tensor:
        return self._sampled_token_logps(self._select_rows(perturbed, rows), logits_to_keep)

    def _k3_dependency(self, batch, perturbed, rows, mask, logits_to_keep) -> torch.Tensor:
        index = torch.tensor(rows, device=mask.device, dtype=torch.long)
        if "old_per_token_logps" in batch and not self._has_dropout:
            # TRL already scored the batch with the generating policy: reuse it, one forward pass saved (TRL scores
            # in train mode, which only differs from eval mode with dropout).
            logps = batch["old_per_token_logps"][index]
        else:
            logps = self._sampled_token_logps(self._select_rows(batch, rows), logits_to_keep)
        perturbed_logps = self._perturbed_token_logps(batch, perturbed, rows, mask, logits_to_keep)
        return token_dependency(logps, perturbed_logps, mask[index])

    def _kl_dependency(self, batch, perturbed, rows, mask, logits_to_keep) -> torch.Tensor:
        """Full-vocabulary KL per token, a few completions and positions at a time so that logits stay small."""
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            model = model.get_base_model()
        backbone, lm_head = model.base_model, model.get_output_embeddings()
        chunks = []
        step = self.args.per_device_train_batch_size
        for start in range(0, len(rows), step):
            chunk_rows = rows[start : start + step]
            inputs = self._select_rows(batch, chunk_rows)
            hidden = self._completion_hidden_states(backbone, inputs, logits_to_keep)
            perturbed_hidden = self._completion_hidden_states(
                backbone, self._select_rows(perturbed, chunk_rows), logits_to_keep
            )
            chunk_mask = mask[torch.tensor(chunk_rows, device=mask.device, dtype=torch.long)]
            kl = torch.zeros(chunk_mask.shape, dtype=torch.float32, device=mask.device)
            # `out_features`, not the weight shape: under ZeRO-3 the weight is a 0-size shard until gathered.
            positions = max(1, KL_LOGITS_PER_CHUNK // (len(chunk_rows) * lm_head.out_features))
            with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias), self.accelerator.autocast():
                for position in range(0, logits_to_keep, positions):
                    window = slice(position, position + positions)
                    # F.linear on the gathered weight: no per-window collectives, whatever the local length.
                    logits = F.linear(hidden[:, window], lm_head.weight, lm_head.bias) / self.temperature
                    perturbed_logits = F.linear(perturbed_hidden[:, window], lm_head.weight, lm_head.bias)
                    perturbed_logits = perturbed_logits / self.temperature
                    kl[:, window] = kl_token_dependency(logits, perturbed_logits, chunk_mask[:, window])
            chunks.append(kl)
        return torch.cat(chunks)

    def _completion_hidden_states(self, backbone, inputs: dict, logits_to_keep: int) -> torch.Tensor:
        """Final hidden states at the positions that predict the completion tokens."""
        model_inputs = {key: value for key, value in inputs.items() if key != "num_images"}
        with self.accelerator.autocast():
            hidden = backbone(**model_inputs, use_cache=False).last_hidden_state
        return hidden[:, -logits_to_keep - 1 : -1]


def check_vision_model(model: torch.nn.Module, processing_class: Any) -> None:
    """Refuse a model without a vision tower, or a processor without an image processor: nothing to perturb."""
    if is_peft_model(model):
        model = model.get_base_model()
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


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a train-mode forward of `model` is random: a dropout layer (LoRA's included) or attention dropout."""
    dropout_layers = (
        torch.nn.Dropout,
        torch.nn.Dropout1d,
        torch.nn.Dropout2d,
        torch.nn.Dropout3d,
        torch.nn.AlphaDropout,
        torch.nn.FeatureAlphaDropout,
    )
    for module in model.modules():
        attention_dropout = getattr(module, "attention_dropout", None)  # a probability in transformers' attention
        if (isinstance(module, dropout_layers) and module.p > 0) or (
            isinstance(attention_dropout, float | int) and attention_dropout > 0
        ):
            return True
    return False


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` in eval mode inside the block, then give every module back its own train/eval mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def completion_images(inputs: list[dict[str, Any]]) -> list[list[Any]]:
    """Each completion's images as the data delivers them (`images` or `image` column), as GRPOTrainer reads them."""
    if "images" in inputs[0]:
        return [list(example.get("images") or []) for example in inputs]
    return [[example["image"]] if example.get("image") is not None else [] for example in inputs]
