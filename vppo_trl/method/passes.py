"""VPPO's measurement: the batch scored again on perturbed images, and each token's visual dependency.

[`VisualDependencyPassesMixin`] holds the forward passes of [`VPPOTrainer`]: the perturbation of the images of the
completions that need measuring (on the images as loaded, or on the processed pixels), the original- and
perturbed-image passes of the `k3` and `kl` estimators, in eval mode and without gradient, with the same number of
passes on every process where parameters are sharded.

The module-level functions are the measurement itself, shared with `vppo_trl.tools.spotlight`: [`perturbation_seeds`]
(each image's draw, from the seed, the round, the process and the completion's index, whatever else is measured),
[`perturb_batch_images`], [`completion_hidden_states`] and [`kl_chunk_dependency`].
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import trl
from accelerate.utils import is_peft_model
from PIL import Image
from transformers.utils import logging
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .batch_rows import join_image_tensors, model_inputs, pad_like, select_rows
from .core import kl_token_dependency, token_dependency
from .perturbations import TEXT_KEYS, PixelLayout, perturb_pixel_values, perturbed_parts, process_images
from .shared_state import SharedStateMixin
from .vision import check_vision_model, family_name, freeze_vision_tower

logger = logging.get_logger(__name__)

# Batch key of each completion's images as the data delivered them (perturbation_space="original_image").
IMAGES_KEY = "vppo_images"
# Batch key of each completion's position in its generation batch when it was measured: its perturbation draw and its
# prompt group (TRL's sampler puts a group's completions next to each other) follow it through TRL's shuffle.
COMPLETION_INDEX_KEY = "vppo_completion_index"
# Batch key of the original-image entropies of TRL's old-log-prob pass, kept for the `entropy` token filter criterion.
ENTROPIES_KEY = "vppo_original_entropies"
# Logits (rows x positions x vocabulary) per chunk when the `kl` estimator projects hidden states onto the
# vocabulary: 2**25 float32 values are 128 MiB per temporary, whatever the batch, length and vocabulary.
KL_LOGITS_PER_CHUNK = 2**25


class VisualDependencyPassesMixin(SharedStateMixin):
    """The perturbed (and, where needed, original-image) forward passes of VPPO, for GRPOTrainer subclasses."""

    def __init__(self, *args, **kwargs):
        # The policy's forward passes of the round being generated, while it is, for the `entropy` criterion (below).
        self._round_forwards: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        super().__init__(*args, **kwargs)
        self._warned_image_mismatch = False
        # Everything a model family or setting could be refused for is checked here, before any model call.
        model = self.accelerator.unwrap_model(self.model)
        check_vision_model(model, self.processing_class)
        self.shared.pixel_layout = PixelLayout.from_image_processor(self.processing_class.image_processor)
        check_image_layout(model, self.processing_class, self.args.perturbation_space, self.shared.pixel_layout)
        if self.args.freeze_vision_tower:
            freeze_vision_tower(model)

    def _generate_and_score_round(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        # The `entropy` criterion reads the original-image entropies of TRL's old-log-prob pass when it runs, so that
        # reusing its log-probs costs no extra pass. That pass is recognised by its result, not by its place among
        # the round's forwards: the one whose log-probs TRL returns as `old_per_token_logps`.
        args = self.args
        wants_entropies = args.token_filter_criterion == "entropy" and args.token_filter_ratio < 1.0
        self._round_forwards = [] if wants_entropies and self.model.training else None
        try:
            output = super()._generate_and_score_round(inputs)
        finally:
            forwards, self._round_forwards = self._round_forwards, None
        old_logps = output.get("old_per_token_logps")
        if forwards is not None and old_logps is not None:
            output[ENTROPIES_KEY] = old_logps_entropies(forwards, old_logps)
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

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if self._round_forwards is None or model is not self.model:  # not generating, or the reference model
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        compute_entropy = kwargs.pop("compute_entropy", False)
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, *args, compute_entropy=True, **kwargs
        )
        self._round_forwards.append((logps, entropies))
        return logps, entropies if compute_entropy else None, aux_loss

    def _visual_dependency(
        self,
        batch: dict[str, Any],
        rows: list[int],
        mask: torch.Tensor,
        measure: Callable | None = None,
        compute_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        `[B, T]` token dependencies (or what `measure` gives for the perturbed batch) for `rows`, 0 elsewhere, and,
        with `compute_entropy`, the original-image entropies of those rows (`None` otherwise).

        Only the images of `rows` are perturbed, each completion's with its own draw (see [`perturbation_seeds`]).
        """
        measured_rows = rows
        if self.shared.forward_passes_must_match:
            # Pad with repeats so that every process runs as many forward passes; the repeats are discarded.
            counts = self.accelerator.gather(torch.tensor([len(rows)], device=mask.device))
            target = int(counts.max())
            filler = rows[:1] or self._rows_with_images(batch)[:1] or [0]
            measured_rows = rows + filler * (target - len(rows))
            if not measured_rows:  # no process measures anything: no pass, nothing measured
                zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
                return zeros, zeros.clone() if compute_entropy else None

        if COMPLETION_INDEX_KEY not in batch:
            batch[COMPLETION_INDEX_KEY] = torch.arange(mask.size(0), device=mask.device)
        everything = measured_rows == list(range(mask.size(0)))
        chosen = batch if everything else select_rows(batch, measured_rows)
        perturbed = (
            {**chosen, "pixel_values": self._perturbed_pixel_values(chosen)} if "pixel_values" in chosen else chosen
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
            positions = list(range(len(measured_rows)))
            measured, measured_entropies = measure(
                chosen, perturbed, positions, mask[measured_rows], logits_to_keep, compute_entropy=compute_entropy
            )
        batch.pop(ENTROPIES_KEY, None)
        dependency = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        entropies = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device) if compute_entropy else None
        if rows:
            dependency[rows] = measured[: len(rows)].float()
            if compute_entropy:
                entropies[rows] = measured_entropies[: len(rows)].float()
        return dependency, entropies

    def _rows_with_images(self, batch: dict[str, Any]) -> list[int]:
        return [i for i, n in enumerate(batch.get("num_images") or []) if n]

    def _perturbed_pixel_values(self, batch: dict[str, Any]) -> torch.Tensor:
        """
        Every image of `batch` (a generation batch, or some of its rows) perturbed, each completion's with the draw of
        this round, this process and its index in the generation batch (`COMPLETION_INDEX_KEY`, else its row).

        On the images as the data delivered them when the batch carries them (`perturbation_space="original_image"`),
        otherwise on the processed `pixel_values`. Either way the result has the batch's layout, shape and dtype.
        """
        count = batch["prompt_ids"].size(0)
        index = batch.get(COMPLETION_INDEX_KEY)
        completions = index.tolist() if index is not None else list(range(count))
        num_images = batch.get("num_images") or [1] * count
        seeds = perturbation_seeds(
            self.args.seed, self.shared.perturbation_round, self.accelerator.process_index, completions, num_images
        )
        layout, processor = self.shared.pixel_layout, self.processing_class
        # The images as loaded are processed one training micro-batch at a time: the processor's float32 copies of
        # the images then take no more memory than a training step's.
        samples_per_call = self.args.per_device_train_batch_size
        return perturb_batch_images(batch, self.args, layout, processor, seeds, samples_per_call)

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

    def _perturbed_token_logps(self, batch, perturbed, rows, mask, logits_to_keep, compute_entropy=False):
        return self._sampled_token_logps(self._select_rows(perturbed, rows), logits_to_keep), None

    def _k3_dependency(self, batch, perturbed, rows, mask, logits_to_keep, compute_entropy=False):
        """k3 dependencies of `rows` (and, with `compute_entropy`, their original-image entropies)."""
        index = torch.tensor(rows, device=mask.device, dtype=torch.long)
        entropies = None
        reuse = "old_per_token_logps" in batch and not self.shared.has_dropout
        if reuse and (not compute_entropy or ENTROPIES_KEY in batch):
            # TRL already scored the batch with the generating policy: reuse it, one forward pass saved (TRL scores
            # in train mode, which only differs from eval mode with dropout). Its entropies too, when kept.
            logps = batch["old_per_token_logps"][index]
            if compute_entropy:
                entropies = batch[ENTROPIES_KEY][index]
        elif compute_entropy:
            logps, entropies = self._score_tokens(self._select_rows(batch, rows), logits_to_keep, compute_entropy=True)
        else:
            logps = self._sampled_token_logps(self._select_rows(batch, rows), logits_to_keep)
        perturbed_logps, _ = self._perturbed_token_logps(batch, perturbed, rows, mask, logits_to_keep)
        return token_dependency(logps, perturbed_logps, mask[index]), entropies

    def _kl_dependency(self, batch, perturbed, rows, mask, logits_to_keep, compute_entropy=False):
        """Full-vocabulary KL per token (and original-image entropies), a few completions at a time."""
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            model = model.get_base_model()
        backbone, lm_head = model.base_model, model.get_output_embeddings()
        chunks, entropy_chunks = [], []
        step = self.args.per_device_train_batch_size
        for start in range(0, len(rows), step):
            chunk_rows = rows[start : start + step]
            kl, entropies = kl_chunk_dependency(
                backbone,
                lm_head,
                self._select_rows(batch, chunk_rows),
                self._select_rows(perturbed, chunk_rows),
                mask[torch.tensor(chunk_rows, device=mask.device, dtype=torch.long)],
                logits_to_keep,
                self.temperature,
                compute_entropy=compute_entropy,
                autocast=self.accelerator.autocast,
                hidden_states=self._completion_hidden_states,
            )
            chunks.append(kl)
            entropy_chunks.append(entropies)
        return torch.cat(chunks), torch.cat(entropy_chunks) if compute_entropy else None

    def _completion_hidden_states(self, backbone, inputs: dict, logits_to_keep: int) -> torch.Tensor:
        return completion_hidden_states(backbone, inputs, logits_to_keep, self.accelerator.autocast)


def perturbation_seeds(
    seed: int, round_index: int, process_index: int, completions: Sequence[int], num_images: Sequence[int]
) -> list[int]:
    """
    One seed per image, from the trainer seed, the perturbation round, the process, the completion's index in its
    generation batch and the image's rank in the completion: a completion's draw is the same whichever other
    completions are perturbed with it (skipped or not), and the spotlight can make the very draw training made.
    """
    return [
        hash((seed, round_index, process_index, completion, image)) % (2**63)
        for completion, count in zip(completions, num_images, strict=True)
        for image in range(count)
    ]


def perturb_batch_images(
    batch: dict[str, Any],
    settings: Any,
    layout: PixelLayout,
    processor: Any,
    seeds: Sequence[int],
    samples_per_call: int | None = None,
) -> torch.Tensor:
    """
    `batch["pixel_values"]` with every image perturbed, image `i` with a generator seeded by `seeds[i]`.

    On the images as the data delivered them when the batch carries them (`IMAGES_KEY`): perturbed there, then
    processed again by `processor` called as GRPOTrainer calls it ([`process_images`]), `samples_per_call` completions
    at a time (all at once by default), so that every tile or crop it cuts from an image carries that image's
    perturbation. The processor pads to the largest image of the rows it is given, which need not be the batch's
    largest (the batch may be some rows of a generation batch, and each call has some of those rows): each call's
    result is padded to the batch's shape as the processor pads (with zeros, at the end of each dimension), and must
    then have the batch's token layout (every other image tensor equal, the batch's pixels padding wherever these are),
    or a `RuntimeError` says what differs. Otherwise on the
    processed pixels, each tile with the draw of its image ([`entry_images`]). `processor` is the model's processor
    (for Qwen-VL patch rows its image processor also does). `settings` has [`VPPOConfig`]'s perturbation fields.
    """
    pixel_values = batch["pixel_values"]
    kwargs = {
        "patch_size": settings.perturbation_patch_size,
        "prob": settings.perturbation_prob,
        "noise_std": settings.perturbation_noise_std,
        "blur_radius": settings.perturbation_blur_radius,
    }
    grid = batch.get("image_grid_thw")
    if IMAGES_KEY not in batch:
        owners = entry_images(batch)
        generators = [
            torch.Generator(device=pixel_values.device).manual_seed(seeds[owner] if owner is not None else 0)
            for owner in owners
        ]
        return perturb_pixel_values(
            pixel_values, layout, settings.perturbation, generators, image_grid_thw=grid,
            spatial_shapes=batch.get("spatial_shapes"), image_position_ids=batch.get("image_position_ids"), **kwargs,
        )  # fmt: skip
    generators = [torch.Generator(device=pixel_values.device).manual_seed(seed) for seed in seeds]
    per_sample = batch[IMAGES_KEY]
    images = [image for row in per_sample for image in row]
    samples = [len(row) for row in per_sample]
    parts = perturbed_parts(
        images, processor, settings.perturbation, generators, pixel_values.device, samples, samples_per_call, **kwargs
    )
    # Each call's pixels are written into the result as they come: the result and one call's tensors are all that
    # is held at once (joining the calls' outputs would hold the batch's pixels twice).
    perturbed = torch.zeros_like(pixel_values)  # the padding, where a call's images are smaller than the batch's
    others, differences, rows, trailing = [], [], 0, [0] * (pixel_values.ndim - 1)
    for part in parts:
        values = part.pop("pixel_values")
        others.append(part)
        if values.ndim != pixel_values.ndim:
            differences.append(f"pixel_values of {values.ndim} dimensions instead of {pixel_values.ndim}")
            break
        trailing = [max(size, seen) for size, seen in zip(values.shape[1:], trailing, strict=True)]
        end = rows + values.size(0)
        fits = end <= pixel_values.size(0) and all(
            size <= target for size, target in zip(values.shape[1:], pixel_values.shape[1:], strict=True)
        )
        if fits:
            perturbed[(slice(rows, end), *(slice(0, size) for size in values.shape[1:]))] = values
            differences.extend(padding_differences(pixel_values[rows:end], values.shape))
        rows = end
    differences.extend(layout_differences(pad_like(join_image_tensors(others), batch), batch))
    shape, expected = (rows, *trailing), tuple(pixel_values.shape)
    too_large = rows != expected[0] or any(size > target for size, target in zip(shape, expected, strict=True))
    if too_large or (differences and shape != expected):  # a shape that only padding would fill is fine alone
        differences.insert(0, f"pixel_values of shape {shape} instead of {expected}")
    if differences:
        raise RuntimeError(
            "The perturbed images do not have the original batch's token layout: processing them again gave "
            f"{' and '.join(dict.fromkeys(differences))}. Was the processor called with other settings for the batch "
            "(a processor changed after the trainer was built)? Set perturbation_space='pixel_values' to perturb the "
            "processed pixels instead."
        )
    return perturbed


def padding_differences(original: torch.Tensor, shape: Sequence[int]) -> list[str]:
    """
    What is wrong with padding images of `shape` to `original`'s shape (the same rows of the batch): the batch's own
    pixels must be padding there too (zero), or its images are larger than these.
    """
    return [
        f"images smaller than the batch's (dimension {dim})"
        for dim, (size, target) in enumerate(zip(shape, original.shape, strict=True))
        if dim and size < target and bool(original.narrow(dim, size, target - size).any())
    ]


def layout_differences(processed: dict[str, Any], batch: dict[str, Any]) -> list[str]:
    """The image tensors other than `pixel_values` in which `processed` differs from `batch`."""
    differences = []
    for key, value in processed.items():
        if key == "pixel_values" or key in TEXT_KEYS or key not in batch:
            continue
        original = batch[key]
        if isinstance(value, torch.Tensor) and isinstance(original, torch.Tensor):
            same = value.shape == original.shape and torch.equal(value.to(original.device), original)
        else:
            same = value == original
        if not same:
            differences.append(f"another {key}")
    return differences


def entry_images(batch: dict[str, Any]) -> list[int | None]:
    """
    For each image, tile or patch sequence of `batch["pixel_values"]` (in [`PixelLayout.to_images`]'s order), the
    index of the image (in batch order) whose perturbation draw it takes, `None` for padding of an image-less row.

    Tiles of one image share its draw. Where tiles are grouped per prompt rather than per image (Idefics3 and SmolVLM
    `[prompts, tiles, C, H, W]`, InternVL and LFM2-VL with `num_tiles`), a prompt's tiles share the draw of its first
    image. Raises `ValueError` when the layout says nothing of which image an entry belongs to.
    """
    pixel_values = batch["pixel_values"]
    rows = batch["prompt_ids"].size(0) if "prompt_ids" in batch else len(batch.get("num_images") or [1])
    num_images = list(batch.get("num_images") or [1] * rows)
    first = [sum(num_images[:row]) for row in range(len(num_images))]
    total = sum(num_images)
    if (
        "image_grid_thw" in batch
        or "image_position_ids" in batch
        or "spatial_shapes" in batch
        and not batch.get("num_tiles")
    ):
        return list(range(total))
    tiles = pixel_values.size(1) if pixel_values.ndim == 5 else 1
    if batch.get("num_tiles") is not None:
        counts = list(batch["num_tiles"])
    elif pixel_values.size(0) == total:
        return [image for image in range(total) for _ in range(tiles)]
    elif pixel_values.size(0) == len(num_images):
        counts = [1] * len(num_images)
    else:
        raise ValueError(
            f"pixel_values of shape {tuple(pixel_values.shape)} hold neither one entry per image ({total}) nor one "
            f"per prompt ({len(num_images)}), and no num_tiles says which image each tile belongs to."
        )
    return [first[row] if num_images[row] else None for row, count in enumerate(counts) for _ in range(count * tiles)]


def check_image_layout(model: torch.nn.Module, processor: Any, space: str, layout: PixelLayout) -> None:
    """
    Refuse, when the trainer is built, a model whose images VPPO cannot perturb in `space`, naming the family, the
    reason and the space that works: its processor is tried on a probe image, as the perturbed pass will use it.
    """
    family = family_name(model)
    probe = Image.new("RGB", (40, 30), (200, 120, 40))
    try:
        processed = process_images(processor, [[probe]])
        problem = None if "pixel_values" in processed else "its processor returns no pixel_values"
    except Exception as error:  # any failure of the processor is the reason given
        processed, problem = None, f"its processor cannot process images alone ({type(error).__name__}: {error})"
    if space == "original_image":
        if problem:
            raise ValueError(
                f"VPPO cannot perturb the images of {family} as the data delivers them: {problem}. "
                "Set perturbation_space='pixel_values' to perturb the processed pixels instead."
            )
        return
    if problem:
        return  # the layout shows itself in the first batch only; the processed pixels need no processing again
    try:
        batch = {**processed, "num_images": [1]}
        tiles = processed["pixel_values"].size(0)
        if tiles > 1 and "image_grid_thw" not in processed and "image_position_ids" not in processed:
            batch["num_tiles"] = [tiles]  # several tiles for one image: as GRPOTrainer counts them
        entry_images(batch)
        grids = {key: processed.get(key) for key in ("spatial_shapes", "image_position_ids")}
        images = layout.to_images(processed["pixel_values"], processed.get("image_grid_thw"), **grids)
        layout.to_pixel_values(images, processed["pixel_values"], **grids)
    except (ValueError, RuntimeError) as error:
        raise ValueError(
            f"VPPO cannot perturb the processed pixel_values of {family}: they do not map back to images ({error}). "
            "Use perturbation_space='original_image' (the default) to perturb the images as the data delivers them."
        ) from error


def completion_hidden_states(
    backbone: torch.nn.Module, inputs: dict, logits_to_keep: int, autocast: Callable = contextlib.nullcontext
) -> torch.Tensor:
    """Final hidden states at the positions that predict the completion tokens."""
    model_inputs = {key: value for key, value in inputs.items() if key != "num_images"}
    with autocast():
        hidden = backbone(**model_inputs, use_cache=False).last_hidden_state
    return hidden[:, -logits_to_keep - 1 : -1]


def kl_chunk_dependency(
    backbone: torch.nn.Module,
    lm_head: torch.nn.Module,
    inputs: dict,
    perturbed_inputs: dict,
    mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float,
    compute_entropy: bool = False,
    autocast: Callable = contextlib.nullcontext,
    hidden_states: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Full-vocabulary KL per token between the original and the perturbed inputs' predictions (and the entropies of the
    original ones), a few positions at a time so that logits stay small (`KL_LOGITS_PER_CHUNK` values).

    `hidden_states(backbone, inputs, logits_to_keep)` defaults to [`completion_hidden_states`] under `autocast`.
    """
    if hidden_states is None:

        def hidden_states(backbone, inputs, logits_to_keep):
            return completion_hidden_states(backbone, inputs, logits_to_keep, autocast)

    hidden = hidden_states(backbone, inputs, logits_to_keep)
    perturbed_hidden = hidden_states(backbone, perturbed_inputs, logits_to_keep)
    kl = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    entropies = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device) if compute_entropy else None
    # `out_features`, not the weight shape: under ZeRO-3 the weight is a 0-size shard until gathered.
    positions = max(1, KL_LOGITS_PER_CHUNK // (mask.size(0) * lm_head.out_features))
    with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias), autocast():
        for position in range(0, logits_to_keep, positions):
            window = slice(position, position + positions)
            # F.linear on the gathered weight: no per-window collectives, whatever the local length.
            logits = F.linear(hidden[:, window], lm_head.weight, lm_head.bias) / temperature
            perturbed_logits = F.linear(perturbed_hidden[:, window], lm_head.weight, lm_head.bias) / temperature
            kl[:, window] = kl_token_dependency(logits, perturbed_logits, mask[:, window])
            if compute_entropy:
                logp = torch.log_softmax(logits.float(), dim=-1)
                entropy = -(logp.exp() * logp).sum(-1)
                entropies[:, window] = torch.where(mask[:, window].bool(), entropy, torch.zeros_like(entropy))
    return kl, entropies


def old_logps_entropies(
    forwards: Sequence[tuple[torch.Tensor, torch.Tensor]], old_logps: torch.Tensor
) -> torch.Tensor:
    """The entropies of the forward among `forwards` ((log-probs, entropies) pairs) whose log-probs are `old_logps`."""
    for logps, entropies in forwards:
        if logps is old_logps or (logps.shape == old_logps.shape and torch.equal(logps, old_logps)):
            return entropies
    raise RuntimeError(
        f"None of the policy's {len(forwards)} forward pass(es) of the generation round gave the old log-probs "
        f"(old_per_token_logps) that GRPOTrainer of the installed trl {trl.__version__} returned, as trl 1.16's "
        "old-log-prob pass does. VPPO's entropy token filter reads that pass's entropies and stops rather than use "
        "another's. Install a trl this vppo-trl supports (setup.cfg: trl>=1.16,<1.17)."
    )


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
