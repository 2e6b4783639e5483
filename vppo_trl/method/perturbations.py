"""Image perturbations that make an image uninformative, applied on the device.

Two places to perturb, both keeping exactly the token layout of the original batch (same image size, same grid):

- [`perturb_original_images`] (the official code's way, the default): the images as the data delivers them, before the
  processor resizes them, then processed exactly like the originals.
- [`perturb_pixel_values`]: the processed `pixel_values`, in image space at the resolution the vision tower sees.
  [`PixelLayout`] converts between a processor's `pixel_values` and images. Cheaper (no second image processing).

Both work in image space (0-255 RGB) on the device, with no round trip through PIL.
"""

import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision.transforms.v2 import functional as F
from transformers.image_transforms import convert_to_rgb

from .batch_rows import join_image_tensors

SOLID_GREY = 128.0
# What a processor returns besides the images' own tensors (the tokenizer's part).
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")

# One generator for every image, drawn from in image order, or one generator per image (its own draw).
Generators = torch.Generator | Sequence[torch.Generator] | None


def _random(sample, shape: tuple[int, ...], generator: Generators, **kwargs) -> torch.Tensor:
    """`sample(shape)` (`torch.rand`, `torch.randn`); with one generator per image, each image's slice from its own."""
    if generator is None or isinstance(generator, torch.Generator):
        return sample(shape, generator=generator, **kwargs)
    if len(generator) != shape[0]:
        raise ValueError(f"Got {len(generator)} generators for {shape[0]} images: give one per image.")
    return torch.cat([sample((1, *shape[1:]), generator=image_generator, **kwargs) for image_generator in generator])


def _subset(generator: Generators, indices: Sequence[int]) -> Generators:
    """The generators of the images `indices` (a shared generator is shared by all)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [generator[i] for i in indices]


def perturb_images(
    images: torch.Tensor,
    kind: str,
    generator: Generators = None,
    patch_size: int = 14,
    prob: float = 0.5,
    noise_std: float = 189.0,
    blur_radius: float = 6.0,
) -> torch.Tensor:
    """
    Perturb a batch of images given as float tensors `[N, C, H, W]` with values in [0, 255].

    Every image gets its own random draw from `generator`, so the same generator state gives the same result. With a
    sequence of generators, one per image, each image's draw comes from its own generator: it does not depend on the
    other images of the batch.

    Args:
        images: the images, 0-255.
        kind: `"patch_blackening"` (each `patch_size` x `patch_size` patch, aligned to the top-left corner, is set to
            0 with probability `prob`), `"gaussian_noise"` (additive noise of standard deviation `noise_std`, clipped
            to [0, 255]), `"gaussian_blur"` (Gaussian blur whose standard deviation is `blur_radius` pixels) or
            `"solid"` (every pixel 128).
        generator: source of randomness for the random perturbations, or one per image.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if kind == "patch_blackening":
        num_images, _, height, width = images.shape
        rows, cols = math.ceil(height / patch_size), math.ceil(width / patch_size)
        draws = _random(torch.rand, (num_images, 1, rows, cols), generator, device=images.device)
        blacken = (draws < prob).repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
        return images.masked_fill(blacken[:, :, :height, :width], 0.0)
    if kind == "gaussian_noise":
        noise = _random(torch.randn, tuple(images.shape), generator, device=images.device, dtype=images.dtype)
        return (images + noise_std * noise).clamp(0.0, 255.0)
    if kind == "gaussian_blur":
        if blur_radius <= 0:
            return images.clone()
        # Three standard deviations each side, but never wider than the reflect padding allows.
        half_width = min(math.ceil(3 * blur_radius), min(images.shape[-2:]) - 1)
        kernel_size = 2 * half_width + 1
        return F.gaussian_blur(images, kernel_size=[kernel_size, kernel_size], sigma=[blur_radius, blur_radius])
    if kind == "solid":
        return torch.full_like(images, SOLID_GREY)
    raise ValueError(f"Unknown perturbation {kind!r}.")


@dataclass(frozen=True)
class PixelLayout:
    """
    How a processor encodes images in `pixel_values`, and the inverse.

    Supported layouts, read from the batch's keys and `pixel_values`' shape:
    - patch rows (`image_grid_thw`: Qwen-VL, GLM-4.1V): each image is `t * h * w` rows of `C * T * P * P` values,
      ordered by merge window (`merge_size` x `merge_size` patches), each patch repeated `T` times in time;
    - image tensors `[N, C, H, W]`, one per image or per tile (LLaVA, Gemma 3, Mistral 3, PaliGemma, InternVL's tiles);
    - tiled image tensors `[N, T, C, H, W]` (LLaVA-NeXT and OneVision: per image; Idefics3 and SmolVLM: per prompt);
    - padded patch sequences `[N, P, p * p * C]`, patches row by row, with each row's grid in `spatial_shapes`
      (`[N, 2]` patches high and wide: LFM2-VL) or in `image_position_ids` (`[N, P, 2]` x and y, -1 for padding:
      Gemma 4); the padding is left as it is.
    Values are normalised: `(x * rescale_factor - mean) / std`.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    patch_size: int | None = None
    temporal_patch_size: int | None = None
    merge_size: int | None = None

    @classmethod
    def from_image_processor(cls, image_processor) -> "PixelLayout":
        """Read the layout from a transformers image processor."""
        mean = image_processor.image_mean if getattr(image_processor, "do_normalize", True) else (0.0, 0.0, 0.0)
        std = image_processor.image_std if getattr(image_processor, "do_normalize", True) else (1.0, 1.0, 1.0)
        rescale = image_processor.rescale_factor if getattr(image_processor, "do_rescale", True) else 1.0
        if isinstance(mean, int | float):
            mean, std = [mean] * 3, [std] * 3
        return cls(
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            rescale_factor=float(rescale),
            patch_size=getattr(image_processor, "patch_size", None),
            temporal_patch_size=getattr(image_processor, "temporal_patch_size", None),
            merge_size=getattr(image_processor, "merge_size", None),
        )

    def _normalisation(self, reference: torch.Tensor, channel_dim: int, ndim: int) -> tuple[torch.Tensor, ...]:
        shape = [1] * ndim
        shape[channel_dim] = -1
        mean = torch.tensor(self.mean, device=reference.device, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, device=reference.device, dtype=torch.float32).view(shape)
        return mean, std

    def _patch_grids(
        self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None, image_position_ids: torch.Tensor | None
    ) -> tuple[int, list[tuple[int, int]]]:
        """Patch side and (patches high, patches wide) of each row of a padded patch-sequence layout."""
        channels = len(self.mean)
        side = math.isqrt(pixel_values.size(-1) // channels)
        if side * side * channels != pixel_values.size(-1):
            raise ValueError(f"patches of {pixel_values.size(-1)} values are not square {channels}-channel patches")
        if spatial_shapes is not None:
            return side, [tuple(shape) for shape in spatial_shapes.tolist()]
        grids = []
        for positions in image_position_ids:
            valid = positions[positions[:, 0] >= 0]
            grids.append((int(valid[:, 1].max()) + 1, int(valid[:, 0].max()) + 1))
        return side, grids

    def to_images(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        *,
        spatial_shapes: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Turn `pixel_values` into a list of float32 images `[C, H, W]` in 0-255 (one per image, tile or row)."""
        if image_grid_thw is not None:
            return self._patch_rows_to_images(pixel_values, image_grid_thw)
        if pixel_values.ndim == 3 and (spatial_shapes is not None or image_position_ids is not None):
            side, grids = self._patch_grids(pixel_values, spatial_shapes, image_position_ids)
            images = []
            for row, (height, width) in zip(pixel_values, grids, strict=True):
                patches = row[: height * width].float().view(height, width, side, side, -1)
                image = patches.permute(4, 0, 2, 1, 3).reshape(-1, height * side, width * side)
                mean, std = self._normalisation(image, 0, 3)
                images.append((image * std + mean) / self.rescale_factor)
            return images
        if pixel_values.ndim not in (4, 5):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} is not a supported image layout (expected Qwen-VL "
                "patch rows with image_grid_thw, [N, C, H, W], [N, tiles, C, H, W], or patch sequences with "
                "spatial_shapes or image_position_ids)."
            )
        flat = pixel_values.flatten(0, pixel_values.ndim - 4)
        mean, std = self._normalisation(flat, 1, 4)
        return list((flat.float() * std + mean) / self.rescale_factor)

    def _patch_rows_to_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        channels = len(self.mean)
        patch, temporal, merge = self.patch_size, self.temporal_patch_size, self.merge_size
        images = []
        for rows, (grid_t, grid_h, grid_w) in zip(
            torch.split(pixel_values, image_grid_thw.prod(-1).tolist()), image_grid_thw.tolist(), strict=True
        ):
            if grid_t != 1:
                raise ValueError(f"Only still images can be perturbed; got a temporal grid of {grid_t}.")
            patches = rows.float().view(
                grid_h // merge, grid_w // merge, merge, merge, channels, temporal, patch, patch
            )
            patches = patches[:, :, :, :, :, 0]  # the temporal copies of an image are identical
            image = patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, grid_h * patch, grid_w * patch)
            mean, std = self._normalisation(image, 0, 3)
            images.append((image * std + mean) / self.rescale_factor)
        return images

    def to_pixel_values(
        self,
        images: list[torch.Tensor],
        like: torch.Tensor,
        *,
        spatial_shapes: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inverse of [`to_images`]: encode 0-255 images back into the layout, shape and dtype of `like`."""
        if like.ndim == 3 and (spatial_shapes is not None or image_position_ids is not None):
            side, grids = self._patch_grids(like, spatial_shapes, image_position_ids)
            encoded = like.clone()
            for index, (image, (height, width)) in enumerate(zip(images, grids, strict=True)):
                mean, std = self._normalisation(image, 0, 3)
                normalised = (image * self.rescale_factor - mean) / std
                patches = normalised.view(-1, height, side, width, side).permute(1, 3, 2, 4, 0)
                encoded[index, : height * width] = patches.reshape(height * width, -1).to(like.dtype)
            return encoded
        if like.ndim in (4, 5):
            stacked = torch.stack(images)
            mean, std = self._normalisation(stacked, 1, 4)
            return ((stacked * self.rescale_factor - mean) / std).to(like.dtype).view(like.shape)
        channels = len(self.mean)
        patch, temporal, merge = self.patch_size, self.temporal_patch_size, self.merge_size
        all_rows = []
        for image in images:
            mean, std = self._normalisation(image, 0, 3)
            normalised = (image * self.rescale_factor - mean) / std
            grid_h, grid_w = image.shape[1] // patch, image.shape[2] // patch
            patches = normalised.view(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
            patches = patches.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5)
            patches = patches.expand(-1, -1, -1, -1, -1, temporal, -1, -1)
            all_rows.append(patches.reshape(grid_h * grid_w, channels * temporal * patch * patch))
        return torch.cat(all_rows).to(like.dtype)


def perturb_pixel_values(
    pixel_values: torch.Tensor,
    layout: PixelLayout,
    kind: str,
    generator: Generators = None,
    image_grid_thw: torch.Tensor | None = None,
    *,
    spatial_shapes: torch.Tensor | None = None,
    image_position_ids: torch.Tensor | None = None,
    **perturbation_kwargs,
) -> torch.Tensor:
    """
    Perturb processed `pixel_values` in image space and return them in the same layout, shape and dtype.

    The images are those of [`PixelLayout.to_images`] (one per image, tile or patch sequence; with one generator per
    image, one per entry there). Tiles whose values are all exactly 0 are padding (Idefics3 and LLaVA-NeXT pad with
    them, and Idefics3 finds its real images by them): they are left as they are. Images of the same size are
    perturbed together, so a batch of copies of one image (one per completion) costs a single batched operation.
    Blackening patches of the processor's own patch size is done directly on Qwen-VL's patch rows (one row is one
    patch), with no reshaping and no host-device synchronisation.
    """
    patch_size = perturbation_kwargs.get("patch_size", layout.patch_size)
    if kind == "patch_blackening" and image_grid_thw is not None and patch_size == layout.patch_size:
        prob, rows_per_image = perturbation_kwargs.get("prob", 0.5), image_grid_thw.prod(-1).tolist()
        return blacken_patch_rows(pixel_values, layout, prob, generator, rows_per_image)
    grids = {"spatial_shapes": spatial_shapes, "image_position_ids": image_position_ids}
    images = layout.to_images(pixel_values, image_grid_thw, **grids)
    perturbed: list[torch.Tensor | None] = list(images)
    padding = set()
    if pixel_values.ndim in (4, 5):
        tiles = pixel_values.flatten(0, pixel_values.ndim - 4)
        padding = set((tiles == 0).flatten(1).all(-1).nonzero().squeeze(-1).tolist())
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        if index not in padding:
            by_size.setdefault(tuple(image.shape), []).append(index)
    if not (generator is None or isinstance(generator, torch.Generator)) and len(generator) != len(images):
        raise ValueError(f"Got {len(generator)} generators for {len(images)} images: give one per image.")
    for indices in by_size.values():
        batch = torch.stack([images[i] for i in indices])
        batch = perturb_images(batch, kind, _subset(generator, indices), **perturbation_kwargs)
        for i, image in zip(indices, batch, strict=True):
            perturbed[i] = image
    encoded = layout.to_pixel_values(perturbed, like=pixel_values, **grids)
    if padding:  # exactly as they were (the round trip through 0-255 is not exact in floating point)
        tiles = encoded.flatten(0, encoded.ndim - 4)
        tiles[sorted(padding)] = 0
    return encoded


def blacken_patch_rows(
    pixel_values: torch.Tensor,
    layout: PixelLayout,
    prob: float,
    generator: Generators = None,
    rows_per_image: Sequence[int] | None = None,
) -> torch.Tensor:
    """
    Set each Qwen-VL patch row to black (0 in pixel space, normalised per channel) with probability `prob`.

    With one generator per image, `rows_per_image` (the product of each image's `image_grid_thw`) says which rows are
    whose.
    """
    channels = len(layout.mean)
    black = torch.tensor(
        [(0.0 * layout.rescale_factor - m) / s for m, s in zip(layout.mean, layout.std, strict=True)],
        device=pixel_values.device,
        dtype=pixel_values.dtype,
    )
    black_row = black.repeat_interleave(pixel_values.size(-1) // channels)
    if generator is None or isinstance(generator, torch.Generator):
        draws = torch.rand(pixel_values.size(0), generator=generator, device=pixel_values.device)
    else:
        if rows_per_image is None or len(rows_per_image) != len(generator):
            raise ValueError("One generator per image needs `rows_per_image`, one count per image.")
        pieces = zip(rows_per_image, generator, strict=True)
        draws = torch.cat([torch.rand(rows, generator=g, device=pixel_values.device) for rows, g in pieces])
    blacken = draws < prob
    return torch.where(blacken.unsqueeze(-1), black_row, pixel_values)


# `return_numpy=True` where transformers has it (returning PIL is deprecated there), nothing in older releases.
CONVERT_TO_RGB_KWARGS = (
    {"return_numpy": True} if "return_numpy" in inspect.signature(convert_to_rgb).parameters else {}
)


def image_tensor(image: PIL.Image.Image, image_processor) -> torch.Tensor:
    """A PIL image as the `[C, H, W]` uint8 tensor the image processor itself starts from (same RGB conversion)."""
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(
            f"perturbation_space='original_image' needs PIL images in the training data, got {type(image).__name__}; "
            "use perturbation_space='pixel_values'."
        )
    if getattr(image_processor, "do_convert_rgb", True):
        # Alpha composited on white, as the processor does. transformers < 5.18 has no `return_numpy` and returns PIL.
        array = np.asarray(convert_to_rgb(image, **CONVERT_TO_RGB_KWARGS))
    else:
        array = np.asarray(image)
    # A copy only where needed: PIL's arrays can be read-only, which torch warns about.
    tensor = torch.from_numpy(np.require(array, requirements=("C", "W")))
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def distinct_image_tensors(
    images: Sequence[PIL.Image.Image], image_processor, samples: Sequence[int]
) -> list[torch.Tensor]:
    """
    [`image_tensor`] of each of `images` (`samples[i]` of them for sample `i`), converted once per distinct image.

    A prompt group's completions are consecutive samples with copies of the prompt's images (the same objects, or
    equal images decoded again from the data): an image that is the same object as, or equal to (PIL's equality:
    mode, size, palette, pixels), the image at its place in the sample before shares that image's tensor.
    """
    tensors: list[torch.Tensor] = []
    previous: list[int] = []  # indices of the images of the sample before
    for count in samples:
        current = list(range(len(tensors), len(tensors) + count))
        for place, index in enumerate(current):
            image = images[index]
            twin = images[previous[place]] if place < len(previous) else None
            if twin is not None and (twin is image or (isinstance(image, PIL.Image.Image) and image == twin)):
                tensors.append(tensors[previous[place]])
            else:
                tensors.append(image_tensor(image, image_processor))
        previous = current
    return tensors


def perturb_original_images(
    images: Sequence[PIL.Image.Image],
    processor,
    kind: str,
    generator: Generators = None,
    device: torch.device | str | None = None,
    samples: Sequence[int] | None = None,
    samples_per_call: int | None = None,
    **perturbation_kwargs,
) -> dict[str, torch.Tensor]:
    """
    Perturb images as the data delivers them, before any resizing, and process them exactly like the originals.

    This is the official VPPO code's operation (14-px squares blackened on the loaded image, then the processor's
    resize), done on `device`: each group of same-size images is uploaded once as uint8, perturbed there, brought back
    to 8-bit values as the official PIL images are (noise truncated, like its `astype(np.uint8)`; blur rounded, like
    PIL's filter), and handed to the (torchvision) image processor on the same device. A perturbed image has its
    original's size, so the processor gives it the same resize and token grid, and every tile or crop it cuts from the
    image carries the image's perturbation. With `samples_per_call`, the calls' image tensors ([`perturbed_parts`])
    are joined as one call would give them (padded to the largest image where the processor pads).

    Args:
        images: the images in batch order (every image of every completion, each completion's in order).
        processor: the model's processor, called as GRPOTrainer calls it (one list of images per sample: see
            [`process_images`]), or an image processor, called on the images directly (each image a sample).
        kind, generator, perturbation_kwargs: as in [`perturb_images`]; each image gets its own draw (from its own
            generator when one per image is given; a shared generator is drawn from call by call).
        device: where the work is done (where the model's inputs are).
        samples: with a processor, how many of `images` each sample holds (default: all in one sample).
        samples_per_call: samples perturbed and processed together (default: all of them).

    Returns:
        The processor's image tensors (`pixel_values`, and what else its layout has: `image_grid_thw`, ...).
    """
    parts = perturbed_parts(
        images, processor, kind, generator, device, samples, samples_per_call, **perturbation_kwargs
    )
    return join_image_tensors(list(parts))


def perturbed_parts(
    images: Sequence[PIL.Image.Image],
    processor,
    kind: str,
    generator: Generators = None,
    device: torch.device | str | None = None,
    samples: Sequence[int] | None = None,
    samples_per_call: int | None = None,
    **perturbation_kwargs,
) -> Iterator[dict[str, torch.Tensor]]:
    """
    [`perturb_original_images`]' work, `samples_per_call` samples at a time: each call's image tensors, in order, as
    the processor gives them for those samples (padded to their own largest image).

    Each distinct image is converted to a tensor once ([`distinct_image_tensors`]), and only one call's images are
    perturbed and processed at a time, which bounds the processor's intermediates (float32 copies of each image) to
    those of `samples_per_call` samples.
    """
    image_processor = getattr(processor, "image_processor", processor)
    if processor is image_processor:
        counts = [1] * len(images)
    else:
        counts = list(samples) if samples is not None else [len(images)]
    tensors = distinct_image_tensors(images, image_processor, counts)
    starts = [sum(counts[:index]) for index in range(len(counts) + 1)]
    step = samples_per_call or max(len(counts), 1)
    for first in range(0, len(counts), step):
        chunk = counts[first : first + step]
        indices = list(range(starts[first], starts[first] + sum(chunk)))
        perturbed = _perturbed_uint8([tensors[i] for i in indices], kind, _subset(generator, indices), device,
                                     **perturbation_kwargs)  # fmt: skip
        if processor is image_processor:
            # Channels first, said explicitly: transformers < 5.18 guesses the layout of a small tensor wrong.
            output = image_processor(
                images=perturbed, return_tensors="pt", device=device, input_data_format="channels_first"
            )
            yield dict(output)
        else:
            offsets = [sum(chunk[:index]) for index in range(len(chunk))]
            yield process_images(
                processor, [perturbed[at : at + count] for at, count in zip(offsets, chunk, strict=True)], device
            )


def _perturbed_uint8(
    tensors: Sequence[torch.Tensor], kind: str, generator: Generators, device, **perturbation_kwargs
) -> list[torch.Tensor]:
    """`[C, H, W]` uint8 images perturbed on `device`, each group of same-size images together, back in 8 bits."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_size.setdefault(tuple(tensor.shape), []).append(index)
    perturbed: list[torch.Tensor | None] = [None] * len(tensors)
    for indices in by_size.values():
        batch = torch.stack([tensors[i] for i in indices]).to(device).float()
        batch = perturb_images(batch, kind, _subset(generator, indices), **perturbation_kwargs)
        if kind == "gaussian_blur":
            batch = batch.round()
        batch = batch.clamp(0.0, 255.0).to(torch.uint8)
        for i, image in zip(indices, batch, strict=True):
            perturbed[i] = image
    return perturbed


def process_images(processor: Any, images_per_sample: Sequence[Sequence[Any]], device: Any = None) -> dict:
    """
    `processor`'s image tensors for `images_per_sample`, called as GRPOTrainer calls it: one list of images per
    sample, `padding=True`, the processor's own image settings (tiling, crops, sizes). The text is each sample's image
    placeholders only (the image tensors do not depend on the rest of it), and what the tokenizer returns is dropped.
    Images are PIL images or `[C, H, W]` uint8 tensors.
    """
    texts = [processor.image_token * len(images) for images in images_per_sample]
    tensors = any(isinstance(image, torch.Tensor) for images in images_per_sample for image in images)
    output = processor(
        images=[list(images) for images in images_per_sample],
        text=texts,
        padding=True,
        return_tensors="pt",
        device=device,
        # Channels first, said explicitly: transformers < 5.18 guesses the layout of a small tensor wrong.
        **({"input_data_format": "channels_first"} if tensors else {}),
    )
    return {key: value for key, value in output.items() if key not in TEXT_KEYS}
