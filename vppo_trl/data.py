"""Loading and validation of VPPO's multimodal math data (ViRL39K for training, MMK12 for validation).

Every source is turned into rows that [`~trl.GRPOTrainer`] consumes directly:

- `prompt`: one user message whose `content` is a list of typed blocks, `{"type": "image"}` placeholders (one per
  image, in order) and `{"type": "text", "text": ...}` blocks. TRL fills each placeholder with the matching entry of
  `images` (`trl.data_utils.prepare_multimodal_messages`). Text-only rows use a single text block too, because an
  Arrow column cannot mix string and list contents.
- `images`: the row's images, decoded lazily (when a row is read) to RGB `PIL.Image.Image`s; `[]` for text-only rows.
- `answer`: the ground truth as a string, passed by TRL to the reward functions.

Other columns (e.g. an id) are kept unchanged. Bad rows are found up front, not in the middle of a training run.
"""

import io
import logging
import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import PIL.Image
from datasets import Dataset, Features, Image, LargeList, List, Value, load_dataset
from datasets.data_files import DataFilesDict, get_data_patterns

logger = logging.getLogger(__name__)

# The paper's instruction, appended to every problem after a blank line ("\n\n").
INSTRUCTION_SUFFIX = (
    "You first think through the reasoning process as an internal monologue, enclosed within <think> </think> tags. "
    "Then, provide your final answer enclosed within \\boxed{}."
)
IMAGE_PLACEHOLDER = "<image>"
ON_BAD_ROW_CHOICES = ("raise", "skip")

_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_PROBLEMS_COLUMN = "__vppo_row_problems__"
_MAX_REPORTED_PROBLEMS = 5
_MAX_VALUE_CHARS = 80

_PROMPT_FEATURE = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
_ENCODED_IMAGE_FEATURE = {"bytes": Value("binary"), "path": Value("string")}


# Images with more pixels are scaled down when the data is loaded (aspect ratio kept). The largest image a Qwen-VL
# processor takes unresized is Qwen3-VL's 4096 x 4096 (Qwen2/2.5-VL: 12,845,056 pixels), so a larger one would only
# cost memory on its way there.
MAX_IMAGE_PIXELS = 4096 * 4096
# Largest image decoded at all, in place of Pillow's decompression-bomb limit (178,956,970 pixels), which refuses
# legitimate scans of e.g. 20000 x 20000 pixels. Larger images are bad rows.
MAX_SOURCE_IMAGE_PIXELS = 1 << 30
# Smallest picture: a single row or column of pixels (a 1x1 placeholder, say) shows nothing to look at.
MIN_IMAGE_SIDE = 2
# Qwen-VL processors refuse images more elongated than this (`smart_resize`): found up front, not mid-training.
MAX_IMAGE_ASPECT_RATIO = 200
# Modes whose `convert("RGB")` (what `datasets.Image(mode="RGB")` does when a row is read) is exact. Other images
# (16-bit, transparent...) are converted here and stored re-encoded.
_PLAIN_RGB_MODES = ("RGB", "L", "1", "CMYK", "YCbCr")

# The official VPPO run's image size limits (its config's min_pixels / max_pixels), in pixels per image.
PAPER_MIN_PIXELS = 200_704
PAPER_MAX_PIXELS = 1_003_520


def fit_image_pixels(
    image: PIL.Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
) -> PIL.Image.Image:
    """
    Resize `image`, keeping its aspect ratio, so that its pixel count lies within `[min_pixels, max_pixels]`, and
    convert it to RGB.

    This is the official VPPO code's image rule: larger images are scaled down, smaller ones up, by the factor
    `sqrt(limit / pixels)`, each side rounded down. It runs on the image itself (not in the processor), so that the
    generation engine and the trainer see the same picture. `None` leaves that side unbounded.
    """
    for limit, outside in ((max_pixels, lambda n, m: n > m), (min_pixels, lambda n, m: n < m)):
        pixels = image.width * image.height
        if limit is not None and pixels > 0 and outside(pixels, limit):
            factor = math.sqrt(limit / pixels)
            size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
            image = image.resize(size, PIL.Image.Resampling.BICUBIC)
    return image if image.mode == "RGB" else image.convert("RGB")


def _fit_row_images(batch: dict[str, list], min_pixels: int | None, max_pixels: int | None) -> dict[str, list]:
    """Dataset transform: every decoded image of a batch of rows brought within the pixel limits."""
    batch["images"] = [[fit_image_pixels(image, min_pixels, max_pixels) for image in row] for row in batch["images"]]
    return batch


class BadInputError(ValueError):
    """
    Input the run cannot use (an invalid row, a prompt too long for the model), named by row or content. The training
    script prints it as a one-line error, without a traceback.
    """


def check_prompt_lengths(
    prompts: list, prompt_ids: list[list[int]], max_completion_length: int, model_config: Any
) -> None:
    """Raise [`BadInputError`] for a prompt that, followed by a full completion, exceeds the model's context."""
    limit = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    for prompt, ids in zip(prompts, prompt_ids, strict=True):
        if limit is not None and len(ids) + max_completion_length > limit:
            raise BadInputError(
                f"prompt {_preview(_prompt_text(prompt))} has {len(ids)} tokens: with max_completion_length="
                f"{max_completion_length}, {len(ids) + max_completion_length} positions, more than the model's "
                f"limit of {limit} (max_position_embeddings). Shorten or drop that row, or lower "
                "max_completion_length."
            )


def _prompt_text(prompt: Any) -> str:
    """The text of a prompt, plain or conversational (image blocks left out), to show it in a message."""
    if isinstance(prompt, str):
        return prompt
    texts = []
    for message in prompt:
        content = message.get("content") if isinstance(message, dict) else None
        blocks = [{"text": content}] if isinstance(content, str) else content or []
        texts.extend(block["text"] for block in blocks if isinstance(block, dict) and block.get("text"))
    return " ".join(texts)


@dataclass
class DataReport:
    """What [`load_vppo_dataset`] kept and dropped, so the caller can log it next to the training metrics."""

    total_rows: int
    kept_rows: int
    skipped_rows: int
    problems: list[str] = field(default_factory=list)


def build_prompt(problem: str, num_images: int, instruction_suffix: str = INSTRUCTION_SUFFIX) -> list[dict[str, Any]]:
    """
    Build the conversational prompt of one row, in the layout TRL's GRPOTrainer fills with the row's images.

    Without `<image>` placeholders in `problem`, all image blocks come first (where TRL itself would put them). With
    placeholders, each one is replaced by an image block and the text between them is kept as written, so the
    rendered prompt reads like the original problem; this needs exactly one placeholder per image. The instruction
    suffix follows the problem after a blank line.
    """
    text = problem.strip()
    segments = text.split(IMAGE_PLACEHOLDER)
    num_placeholders = len(segments) - 1
    if num_placeholders == 0:
        content = [{"type": "image"} for _ in range(num_images)]
        if text:
            content.append({"type": "text", "text": text})
    elif num_placeholders == num_images:
        content = []
        for index, segment in enumerate(segments):
            if index > 0:
                content.append({"type": "image"})
            if segment.strip():
                content.append({"type": "text", "text": segment})
    else:
        raise ValueError(f"{num_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {num_images} image(s)")
    if instruction_suffix:
        if content and content[-1]["type"] == "text":
            content[-1]["text"] += "\n\n" + instruction_suffix
        else:
            content.append({"type": "text", "text": instruction_suffix})
    return [{"role": "user", "content": content}]


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _preview(value: Any) -> str:
    """Short printable form of an offending value (image bytes by their size, not their content), for messages."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return f"<{len(value['bytes'])} bytes>" + (f" ({_shorten(repr(value['path']))})" if value.get("path") else "")
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    return _shorten(repr(value))


def _resolve_path(path: str, image_folder: Path | None) -> str:
    """Absolute form of a local image path (relative ones start from `image_folder`, else the current directory)."""
    if "://" in path:  # remote file, read by `datasets` itself
        return path
    return str((image_folder or Path.cwd()) / Path(path).expanduser())


def _encode_image(value: Any, image_folder: Path | None) -> dict[str, Any]:
    """
    Turn an image given as a `{"bytes", "path"}` dict (an undecoded `datasets.Image`) or a path into the form that
    `datasets.Image` stores, and check that it decodes. Raises `ValueError` with a readable reason otherwise.
    """
    if value is None:
        raise ValueError("missing image (None)")
    if isinstance(value, dict) and value.get("bytes") is not None:
        encoded = {"bytes": value["bytes"], "path": value.get("path")}
    elif isinstance(value, (str, dict)):
        path = value if isinstance(value, str) else value.get("path")
        if not path:
            raise ValueError(f"image {_preview(value)} has neither bytes nor a path")
        encoded = {"bytes": None, "path": _resolve_path(path, image_folder)}
        if "://" not in encoded["path"] and not Path(encoded["path"]).is_file():
            raise ValueError(f"cannot read image {_preview(path)}: file not found at {encoded['path']}")
    else:
        raise ValueError(
            f"expected a path or a {{'bytes', 'path'}} dict, got {type(value).__name__}: {_preview(value)}"
        )
    try:
        image = _decode_image(encoded)
    except PIL.UnidentifiedImageError:
        raise ValueError(f"cannot read image {_preview(value)}: not an image or an unknown format") from None
    except PIL.Image.DecompressionBombError as error:  # more than MAX_SOURCE_IMAGE_PIXELS
        raise ValueError(f"cannot read image {_preview(value)}: {error}") from None
    except Exception as error:  # PIL signals damaged data with many exception types (OSError, SyntaxError, ...)
        reason = _shorten(f"{type(error).__name__}: {error}")
        raise ValueError(f"cannot read image {_preview(value)}: {reason}") from None
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"image {_preview(value)} is {width}x{height} pixels: too small to show anything")
    if max(width, height) / min(width, height) > MAX_IMAGE_ASPECT_RATIO:
        raise ValueError(
            f"image {_preview(value)} is {width}x{height} pixels: more elongated than the "
            f"{MAX_IMAGE_ASPECT_RATIO}:1 that Qwen-VL processors accept"
        )
    if _reads_exactly(image):
        return encoded
    buffer = io.BytesIO()
    try:
        to_rgb(image).save(buffer, format="PNG", compress_level=1)
    except Exception as error:  # e.g. a mode Pillow cannot convert
        reason = _shorten(f"{type(error).__name__}: {error}")
        raise ValueError(f"cannot convert image {_preview(value)} ({image.mode}) to RGB: {reason}") from None
    return {"bytes": buffer.getvalue(), "path": encoded["path"]}


def _decode_image(encoded: dict[str, Any]) -> PIL.Image.Image:
    """Decode an image as `datasets` does (EXIF rotation applied), up to `MAX_SOURCE_IMAGE_PIXELS` pixels."""
    default_limit = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = MAX_SOURCE_IMAGE_PIXELS // 2  # Pillow warns above the limit and fails above twice it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            return Image().decode_example(encoded)
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = default_limit


def _reads_exactly(image: PIL.Image.Image) -> bool:
    """Whether reading the file later with `convert("RGB")` gives `to_rgb(image)`, so that it need not be copied."""
    plain = image.mode in _PLAIN_RGB_MODES or image.mode == "P"
    return plain and "transparency" not in image.info and image.width * image.height <= MAX_IMAGE_PIXELS


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """
    Convert an image of any mode to 8-bit RGB with at most `MAX_IMAGE_PIXELS` pixels (aspect ratio kept).

    Unlike `convert("RGB")`, 16- and 32-bit grayscale is scaled to 8 bits (not clipped to white) and transparent
    pixels are laid on white (as Qwen's own `qwen-vl-utils` does), not shown in whatever colour they happen to store.
    """
    if image.mode in ("P", "PA", "1"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    if image.mode.startswith("I") or image.mode == "F":
        image = _grayscale_to_8_bits(image)
    factor = math.isqrt(image.width * image.height // MAX_IMAGE_PIXELS)
    if factor >= 2:  # a cheap box reduction of huge images first; `fit_image_pixels` does the exact resize
        image = image.reduce(factor)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return fit_image_pixels(image, max_pixels=MAX_IMAGE_PIXELS)


def _has_alpha(image: PIL.Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _grayscale_to_8_bits(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit grayscale from 16-bit (`I;16*`), 32-bit integer (`I`) or float (`F`) grayscale, scaled over its range."""
    values = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:  # no declared range: 1 (floats only), 255 or 65535, whichever holds the values, else their maximum
        largest = float(values.max(initial=0.0))
        ranges = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
        top = next((limit for limit in ranges if largest <= limit), largest)
    return PIL.Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8))


def _convert_row(
    row: dict[str, Any],
    index: int,
    *,
    problem_column: str,
    answer_column: str,
    images_column: str | None,
    single_image: bool,
    image_folder: Path | None,
    instruction_suffix: str,
) -> dict[str, Any]:
    """Convert one source row to the trainer layout, collecting every problem instead of stopping at the first."""
    problems = []

    def report(field_name: str, message: str) -> None:
        problems.append(f"row {index}, field '{field_name}': {message}")

    problem = row[problem_column]
    if problem is None:
        report(problem_column, "missing problem (None)")
    elif not isinstance(problem, str):
        report(problem_column, f"expected a string, got {type(problem).__name__}: {_preview(problem)}")
    elif not problem.strip():
        report(problem_column, f"empty problem {_preview(problem)}")

    answer = row[answer_column]
    if answer is None:
        report(answer_column, "missing answer (None)")
    elif isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        report(answer_column, f"expected a string or number, got {type(answer).__name__}: {_preview(answer)}")
    elif isinstance(answer, float) and not math.isfinite(answer):  # e.g. a missing value in a pandas float column
        report(answer_column, f"expected a string or number, got {answer!r}")
    elif not str(answer).strip():
        report(answer_column, f"empty answer {_preview(answer)}")

    raw_images = row[images_column] if images_column is not None else None
    if single_image:  # one image per row (imagefolder, MMK12): None is a missing image, not a text-only row
        raw_images = [raw_images]
    elif raw_images is None:
        raw_images = []
    encoded_images = []
    if isinstance(raw_images, list):
        for position, image in enumerate(raw_images):
            try:
                encoded_images.append(_encode_image(image, image_folder))
            except ValueError as error:
                report(f"{images_column}[{position}]", str(error))
    else:
        report(images_column, f"expected a list of images, got {type(raw_images).__name__}: {_preview(raw_images)}")

    prompt = []
    if not problems:
        try:
            prompt = build_prompt(problem, len(encoded_images), instruction_suffix)
        except ValueError as error:
            report(problem_column, f"{error}: {_preview(problem)}")
    if problems:
        return {"prompt": [], "images": [], "answer": "", _PROBLEMS_COLUMN: problems}
    return {"prompt": prompt, "images": encoded_images, "answer": str(answer).strip(), _PROBLEMS_COLUMN: []}


def _load_source(source: str, split: str) -> tuple[Dataset, Path | None]:
    """Load `source` with the matching `datasets` builder; also return the folder relative image paths start from."""
    path = Path(source).expanduser().absolute()  # image paths must stay valid if the working directory changes
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise BadInputError(f"Unsupported data file {source!r}: expected one of {sorted(_FILE_BUILDERS)}.")
        return load_dataset(builder, data_files={split: str(path)}, split=split), path.parent
    if path.is_dir():
        if any(any(path.rglob(name)) for name in _IMAGEFOLDER_METADATA):
            return load_dataset("imagefolder", data_dir=str(path), split=split), path
        for builder in ("parquet", "json"):
            extensions = [suffix for suffix, name in _FILE_BUILDERS.items() if name == builder]
            if any(file.suffix.lower() in extensions for file in path.rglob("*")):
                # Split names follow the `datasets` conventions (e.g. "train-0.parquet", "validation/"); other files
                # in the folder, such as images, are ignored.
                data_files = DataFilesDict.from_patterns(
                    get_data_patterns(str(path)), base_path=str(path), allowed_extensions=extensions
                )
                return load_dataset(builder, data_files=data_files, split=split), path
        raise BadInputError(
            f"No data in directory {source!r}: expected parquet or JSON Lines files, or images with one of "
            f"{list(_IMAGEFOLDER_METADATA)}."
        )
    if path.suffix.lower() in _FILE_BUILDERS or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Dataset file or directory {source!r} does not exist.")
    return load_dataset(source, split=split), None


def _find_images_column(dataset: Dataset, images_column: str) -> tuple[str | None, bool]:
    """Name of the column holding the images and whether it holds a single image per row (e.g. imagefolder's)."""
    if images_column in dataset.column_names:
        return images_column, isinstance(dataset.features[images_column], Image)
    if "image" in dataset.column_names:
        return "image", True
    return None, False


def _without_image_decoding(dataset: Dataset, column: str) -> Dataset:
    """Read images as `{"bytes", "path"}` dicts so that validation, not `datasets`, reports unreadable files."""
    feature = dataset.features[column]
    if isinstance(feature, Image):
        return dataset.cast_column(column, Image(decode=False))
    if isinstance(feature, (List, LargeList)) and isinstance(feature.feature, Image):
        return dataset.cast_column(column, List(Image(decode=False)))
    return dataset


def load_vppo_dataset(
    source: str,
    split: str = "train",
    *,
    on_bad_row: str = "raise",
    image_root: str | None = None,
    max_rows: int | None = None,
    instruction_suffix: str = INSTRUCTION_SUFFIX,
    problem_column: str = "problem",
    answer_column: str = "answer",
    images_column: str = "images",
    num_proc: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[Dataset, DataReport]:
    """
    Load a VPPO dataset, validate every row and convert it to the prompt/images/answer layout of GRPOTrainer.

    Args:
        source (`str`):
            A Hub dataset id, a local `.parquet`, `.jsonl` or `.json` file, or a local directory holding parquet or
            JSON Lines files, or images with a `metadata.jsonl`/`metadata.csv` (`imagefolder` layout).
        split (`str`, *optional*, defaults to `"train"`):
            Split to load. For a single local file, the name given to that file.
        on_bad_row (`str`, *optional*, defaults to `"raise"`):
            `"raise"` fails with a `ValueError` listing the first problems and their count; `"skip"` drops the bad
            rows and logs a warning. Problems: missing, empty or wrongly typed problem or answer, an image that is
            missing or unreadable, under 2 pixels a side or more elongated than 200:1, or a number of `<image>`
            placeholders different from the number of images. Images are read as the RGB picture they show (16-bit
            and transparent ones included), larger ones scaled down to `MAX_IMAGE_PIXELS`.
        image_root (`str`, *optional*):
            Folder that relative image paths start from. Defaults to the folder of the data file (or the directory
            given); for Hub datasets, to the current directory.
        max_rows (`int`, *optional*):
            Keep only the first `max_rows` rows, before validation (for quick runs).
        instruction_suffix (`str`, *optional*, defaults to `INSTRUCTION_SUFFIX`):
            Text appended to every problem after a blank line; `""` appends nothing.
        problem_column, answer_column, images_column (`str`, *optional*):
            Source column names. Without `images_column`, a single-image `image` column (imagefolder, MMK12 layout)
            is used as a one-image list; without either, rows are text-only.
        num_proc (`int`, *optional*):
            Processes used to validate the rows (each image is fully decoded once).
        min_pixels, max_pixels (`int`, *optional*):
            Pixel-count limits applied to every image when a row is read, with [`fit_image_pixels`] (the official
            code's rule: smaller images are scaled up, larger ones down, aspect ratio kept). The images the trainer
            hands to vLLM and to its processor are then the same picture. The paper's run uses `PAPER_MIN_PIXELS`
            (200,704) and `PAPER_MAX_PIXELS` (1,003,520); `None` leaves that side unbounded.

    Returns:
        `tuple[Dataset, DataReport]`: the converted dataset, with images decoding to RGB PIL images when rows are
        read, and a report of how many rows were kept and skipped, and why.
    """
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {list(ON_BAD_ROW_CHOICES)}, got {on_bad_row!r}.")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be non-negative, got {max_rows}.")
    for name, limit in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be a positive number of pixels, got {limit}.")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels}).")

    dataset, data_folder = _load_source(source, split)
    for column in (problem_column, answer_column):
        if column not in dataset.column_names:
            raise BadInputError(f"{source!r} has no column {column!r}; its columns are {dataset.column_names}.")
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    source_images_column, single_image = _find_images_column(dataset, images_column)
    if source_images_column is not None:
        dataset = _without_image_decoding(dataset, source_images_column)

    replaced_columns = {problem_column, answer_column, source_images_column, "prompt", "images", "answer"}
    kept_columns = [column for column in dataset.column_names if column not in replaced_columns]
    converted_features = Features(
        {
            **{column: dataset.features[column] for column in kept_columns},
            "prompt": _PROMPT_FEATURE,
            "images": List(_ENCODED_IMAGE_FEATURE),
            "answer": Value("string"),
            _PROBLEMS_COLUMN: List(Value("string")),
        }
    )
    convert = partial(
        _convert_row,
        problem_column=problem_column,
        answer_column=answer_column,
        images_column=source_images_column,
        single_image=single_image,
        image_folder=Path(image_root).expanduser().absolute() if image_root is not None else data_folder,
        instruction_suffix=instruction_suffix,
    )
    # No cache reuse: the cache key ignores the image files, so a fixed or deleted image would go unnoticed.
    dataset = dataset.map(
        convert,
        with_indices=True,
        remove_columns=[column for column in dataset.column_names if column not in kept_columns],
        features=converted_features,
        num_proc=num_proc,
        load_from_cache_file=False,
        desc="Validating rows",
    )

    row_problems = list(dataset[_PROBLEMS_COLUMN])
    problems = [problem for problems_of_row in row_problems for problem in problems_of_row]
    total_rows = len(dataset)
    skipped_rows = sum(1 for problems_of_row in row_problems if problems_of_row)
    if skipped_rows and on_bad_row == "raise":
        # The first line is the whole error (what the command line prints first); more problems follow it.
        raise BadInputError(
            f"{source!r} (split {split!r}): {problems[0]}; {skipped_rows} of {total_rows} rows are invalid "
            f"({len(problems)} problems). Fix the data, or pass on_bad_row='skip' to drop these rows."
            + "".join(f"\n  {problem}" for problem in problems[1:_MAX_REPORTED_PROBLEMS])
        )
    if skipped_rows:
        dataset = dataset.filter(
            lambda problems_of_row: not problems_of_row, input_columns=_PROBLEMS_COLUMN, num_proc=num_proc
        )
        logger.warning(
            "Skipped %d of %d rows of %r (split %r). First problems:\n  %s",
            skipped_rows,
            total_rows,
            source,
            split,
            "\n  ".join(problems[:_MAX_REPORTED_PROBLEMS]),
        )
    dataset = dataset.remove_columns(_PROBLEMS_COLUMN).cast_column("images", List(Image(mode="RGB")))
    if min_pixels is not None or max_pixels is not None:
        dataset = dataset.with_transform(partial(_fit_row_images, min_pixels=min_pixels, max_pixels=max_pixels))
    report = DataReport(total_rows=total_rows, kept_rows=len(dataset), skipped_rows=skipped_rows, problems=problems)
    return dataset, report
