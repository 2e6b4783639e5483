"""Bad input, as users meet it: broken or unusual images, bad rows, over-long prompts, command-line mistakes, and
malformed completions. Each test reads the error message (row, field, value) or checks the pixels or the scores."""

import io
import json
import math
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import yaml
from datasets import Dataset, Features, Image, Value
from huggingface_hub.errors import RepositoryNotFoundError
from PIL import Image as PILImage

from vppo_trl import VPPOConfig, VPPOTrainer, cli
from vppo_trl import rewards as rewards_module
from vppo_trl import train as train_module
from vppo_trl.data import MAX_IMAGE_PIXELS, BadInputError, load_vppo_dataset
from vppo_trl.rewards import accuracy_reward, format_reward
from vppo_trl.testing import COLOURS, build_processor, build_tiny_vlm, colour_reward, make_colour_dataset

RED, WHITE = (255, 0, 0), (255, 255, 255)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def raw_png(pixels: np.ndarray, width: int | None = None, height: int | None = None) -> bytes:
    """A PNG written byte by byte: 16-bit grayscale (2-D `uint16`) or 16-bit RGB (3-D `uint16`), which Pillow cannot
    write, or, with `width`/`height`, a header that claims another size (0x0)."""
    colour_type = 0 if pixels.ndim == 2 else 2
    rows = pixels.astype(">u2").reshape(pixels.shape[0], -1)
    scanlines = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    size = (pixels.shape[1] if width is None else width, pixels.shape[0] if height is None else height)
    header = struct.pack(">IIBBBBB", *size, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b"")
    )


def save(image: PILImage.Image, path: Path, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path.name


def load_rows(tmp_path: Path, rows: list[dict], **kwargs):
    return load_vppo_dataset(str(write_jsonl(tmp_path / "train.jsonl", rows)), **kwargs)


def image_row(name: str, **extra) -> dict:
    return {"problem": "What is shown?", "answer": "1", "images": [name], **extra}


class TestUnreadableImages:
    @pytest.fixture
    def rows(self, tmp_path) -> list[dict]:
        save(PILImage.new("RGB", (8, 8), RED), tmp_path / "ok.png")
        noise = io.BytesIO()
        PILImage.frombytes("RGB", (64, 64), bytes(range(256)) * 48).save(noise, format="PNG")
        (tmp_path / "truncated.png").write_bytes(noise.getvalue()[: len(noise.getvalue()) // 2])
        (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
        (tmp_path / "empty.png").write_bytes(b"")
        (tmp_path / "zero.png").write_bytes(raw_png(np.zeros((1, 1), np.uint16), width=0, height=0))
        save(PILImage.new("RGB", (1, 1), RED), tmp_path / "pixel.png")
        save(PILImage.new("RGB", (500, 2), RED), tmp_path / "line.png")
        (tmp_path / "bomb.png").write_bytes(raw_png(np.zeros((1, 1), np.uint16), width=40000, height=40000))
        names = ["ok.png", "missing.png", "truncated.png", "corrupt.jpg", "empty.png", "zero.png", "pixel.png"]
        return [image_row(name, id=index) for index, name in enumerate([*names, "line.png", "bomb.png"])]

    def test_each_bad_image_is_named_with_its_row_and_field(self, tmp_path, rows):
        dataset, report = load_rows(tmp_path, rows, on_bad_row="skip")
        assert dataset["id"] == [0]
        assert report.problems == [
            f"row 1, field 'images[0]': cannot read image 'missing.png': file not found at {tmp_path / 'missing.png'}",
            "row 2, field 'images[0]': cannot read image 'truncated.png': OSError: image file is truncated",
            "row 3, field 'images[0]': cannot read image 'corrupt.jpg': not an image or an unknown format",
            "row 4, field 'images[0]': cannot read image 'empty.png': not an image or an unknown format",
            "row 5, field 'images[0]': cannot read image 'zero.png': not an image or an unknown format",
            "row 6, field 'images[0]': image 'pixel.png' is 1x1 pixels: too small to show anything",
            "row 7, field 'images[0]': image 'line.png' is 500x2 pixels: more elongated than the 200:1 that Qwen-VL "
            "processors accept",
            "row 8, field 'images[0]': cannot read image 'bomb.png': Image size (1600000000 pixels) exceeds limit of "
            "1073741824 pixels, could be decompression bomb DOS attack.",
        ]

    def test_raise_puts_the_whole_first_problem_on_the_first_line(self, tmp_path, rows):
        with pytest.raises(ValueError) as error:
            load_rows(tmp_path, rows)
        first_line, *others = str(error.value).splitlines()
        assert first_line == (
            f"{str(tmp_path / 'train.jsonl')!r} (split 'train'): row 1, field 'images[0]': cannot read image "
            f"'missing.png': file not found at {tmp_path / 'missing.png'}; 8 of 9 rows are invalid (8 problems). "
            "Fix the data, or pass on_bad_row='skip' to drop these rows."
        )
        assert [line.split(",")[0] for line in others] == ["  row 2", "  row 3", "  row 4", "  row 5"]


class TestImageModes:
    def test_every_mode_is_read_as_the_rgb_picture_it_shows(self, tmp_path):
        gradient = np.arange(0, 65536, 4096, dtype=np.uint16).reshape(2, 8)  # 0, 4096, ..., 61440
        (tmp_path / "gray16.png").write_bytes(raw_png(gradient))
        rgb16 = np.array([[[65535, 32896, 0], [257, 0, 65535]]] * 2, dtype=np.uint16)  # 8-bit: (255,128,0), (1,0,255)
        (tmp_path / "rgb16.png").write_bytes(raw_png(rgb16))
        rgba = PILImage.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black background...
        rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))  # ...with an opaque red left half
        palette = PILImage.new("P", (8, 8), 0)
        palette.putpalette([0, 0, 0, 0, 0, 255])
        palette.paste(1, (4, 0, 8, 8))  # left half colour 0 (transparent), right half blue
        names = [
            "gray16.png",
            "rgb16.png",
            save(rgba, tmp_path / "rgba.png"),
            save(PILImage.new("LA", (8, 8), (90, 128)), tmp_path / "la.png"),
            save(palette, tmp_path / "palette.png", transparency=0),
            save(PILImage.new("L", (8, 8), 77), tmp_path / "gray.png"),
            save(PILImage.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100),
            save(PILImage.new("I", (8, 8), 1000), tmp_path / "int32.tif"),
            save(PILImage.new("F", (8, 8), 0.5), tmp_path / "float.tif"),
        ]
        dataset, report = load_rows(tmp_path, [image_row(name) for name in names])
        assert report.skipped_rows == 0
        images = {name: row["images"][0] for name, row in zip(names, dataset, strict=True)}
        assert all(image.mode == "RGB" and image.size[0] > 1 for image in images.values())

        # 16-bit grayscale is scaled to 8 bits (v / 257), not clipped: only the brightest pixel is near white.
        gray = np.asarray(images["gray16.png"])[..., 0]
        np.testing.assert_array_equal(gray, np.rint(gradient / 257).astype(np.uint8))
        assert gray.max() == 239 and (gray == 255).sum() == 0
        assert images["rgb16.png"].getpixel((0, 0)) == (255, 128, 0)
        assert images["rgb16.png"].getpixel((1, 0)) == (1, 0, 255)
        # Transparent pixels are laid on white, opaque ones keep their colour, half-transparent ones are blended.
        assert images["rgba.png"].getpixel((1, 1)) == RED and images["rgba.png"].getpixel((6, 1)) == WHITE
        assert images["la.png"].getpixel((0, 0)) == (172,) * 3  # 90 * 128/255 + 255 * (1 - 128/255)
        assert images["palette.png"].getpixel((1, 1)) == WHITE
        assert images["palette.png"].getpixel((6, 1)) == (0, 0, 255)
        assert images["gray.png"].getpixel((0, 0)) == (77, 77, 77)
        red, green, blue = images["cmyk.jpg"].getpixel((4, 4))
        assert red > 250 and green < 5 and blue < 5
        assert images["int32.tif"].getpixel((0, 0)) == (4, 4, 4)  # 1000 of 65535
        assert images["float.tif"].getpixel((0, 0)) == (128, 128, 128)  # 0.5 of 1.0

    def test_a_20000_by_20000_image_is_scaled_down_to_what_a_processor_takes(self, tmp_path):
        huge = PILImage.new("L", (20000, 20000), 0)
        huge.paste(200, (10000, 0, 20000, 20000))  # black left half, light grey right half
        name = save(huge, tmp_path / "scan.png", compress_level=1)
        del huge
        dataset, report = load_rows(tmp_path, [image_row(name)])
        assert report.skipped_rows == 0
        image = dataset[0]["images"][0]  # read when the trainer reads the row
        assert image.mode == "RGB" and image.size == (4096, 4096) and image.width * image.height <= MAX_IMAGE_PIXELS
        assert image.getpixel((100, 2000)) == (0, 0, 0) and image.getpixel((4000, 2000)) == (200, 200, 200)
        processor = build_processor("qwen2_5_vl")
        grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        patch = processor.image_processor.patch_size
        assert int(grid.prod()) * patch * patch <= processor.image_processor.size["longest_edge"]


class TestBadRows:
    def test_a_missing_image_is_named_not_trained_as_text(self, tmp_path):
        save(PILImage.new("RGB", (8, 8), RED), tmp_path / "ok.png")
        rows = [
            {"problem": "<image> What is shown?", "answer": "1", "images": []},
            {"problem": "What is shown?", "answer": "1", "images": [None]},
            {"problem": "What is shown?", "answer": "1", "images": ["ok.png", None]},
            {"problem": "What is shown?", "answer": "1", "images": [{"bytes": None, "path": None}]},
        ]
        _, report = load_rows(tmp_path, rows, on_bad_row="skip")
        assert report.problems == [
            "row 0, field 'problem': 1 '<image>' placeholder(s) but 0 image(s): '<image> What is shown?'",
            "row 1, field 'images[0]': missing image (None)",
            "row 2, field 'images[1]': missing image (None)",
            "row 3, field 'images[0]': image {'bytes': None, 'path': None} has neither bytes nor a path",
        ]

    def test_a_missing_image_in_a_single_image_column(self, tmp_path):
        # MMK12's layout: one `image` per row; a null there is a lost image, not a text-only question.
        features = Features({"question": Value("string"), "answer": Value("string"), "image": Image()})
        buffer = io.BytesIO()
        PILImage.new("RGB", (8, 8), RED).save(buffer, format="PNG")
        rows = {"question": ["a", "b"], "answer": ["1", "2"], "image": [{"bytes": buffer.getvalue()}, None]}
        Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "mmk12.parquet"))
        with pytest.raises(ValueError, match=r"row 1, field 'image\[0\]': missing image \(None\); 1 of 2 rows"):
            load_vppo_dataset(str(tmp_path / "mmk12.parquet"), problem_column="question")

    @pytest.mark.parametrize(
        ("answer", "problem"),
        [
            ("", "empty answer ''"),
            ("   ", "empty answer '   '"),
            (None, "missing answer (None)"),
            (["1", "2"], "expected a string or number, got list: ['1', '2']"),
            ({"value": 1}, "expected a string or number, got dict: {'value': 1}"),
            (True, "expected a string or number, got bool: True"),
            (float("nan"), "expected a string or number, got nan"),
        ],
    )
    def test_an_answer_that_is_empty_or_not_text(self, tmp_path, answer, problem):
        rows = [{"problem": "2+2?", "answer": "4"}, {"problem": "3+3?", "answer": answer}]
        path = tmp_path / "train.parquet" if isinstance(answer, float) else tmp_path / "train.jsonl"
        if isinstance(answer, float):  # NaN in a float column (JSON cannot hold one)
            Dataset.from_dict({"problem": ["2+2?", "3+3?"], "answer": [4.0, answer]}).to_parquet(str(path))
        else:
            write_jsonl(path, rows)
        with pytest.raises(ValueError) as error:
            load_vppo_dataset(str(path))
        first_line = str(error.value).splitlines()[0]
        assert first_line.startswith(f"{str(path)!r} (split 'train'): row 1, field 'answer': {problem}; 1 of 2 rows")


def tiny_trainer(tmp_path, dataset, reward_funcs, **overrides):
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    settings.update(overrides)
    args = VPPOConfig(**settings)
    return VPPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=processor
    )


def test_a_prompt_longer_than_the_context_is_named(tmp_path):
    dataset = make_colour_dataset(1)
    long_text = "Describe the shape. " + "red green blue yellow " * 1100
    dataset = dataset.map(
        lambda row: {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": long_text}]}]}
    )
    trainer = tiny_trainer(tmp_path, dataset, colour_reward, max_completion_length=100)
    limit = trainer.model.config.get_text_config().max_position_embeddings
    with pytest.raises(BadInputError) as error:
        trainer.train()
    message = str(error.value)
    tokens = int(re.search(r"has (\d+) tokens", message).group(1))
    assert tokens > limit - 100
    assert message == (
        "prompt 'Describe the shape. red green blue yellow red green blue yellow red green bl... has "
        f"{tokens} tokens: with max_completion_length=100, {tokens + 100} positions, more than the model's limit of "
        f"{limit} (max_position_embeddings). Shorten or drop that row, or lower max_completion_length."
    )


class TestMalformedCompletions:
    COMPLETIONS = [
        "\\boxed{3}",  # right
        [{"role": "assistant", "content": "<think>x</think> \\boxed{3}"}],  # right, as a list of messages
        "",  # empty
        "The answer is 3.",  # no boxed answer
        "\\boxed{}",  # empty boxed answer
        "\\boxed{3",  # never closed
        "\\boxed{\\frac{1}{}}",  # unparseable LaTeX
        "\\boxed{}}}{{{\\\\",  # unbalanced garbage after an empty boxed answer
        "\\boxed{" + "9" * 5000 + "}",  # 5000 digits: more than Python turns into text by default
        "\\boxed{9^{9^{9^{9}}}}",  # hours of exact arithmetic for sympy
        "\\boxed{(10^{10})!}",
        None,
        42,
        [],
        [{"role": "assistant"}],
    ]
    EXPECTED = {"not_text": 4, "no_boxed_answer": 5, "unparseable": 4}

    def score(self):
        logged = {}
        rewards = accuracy_reward(self.COMPLETIONS, ["3"] * len(self.COMPLETIONS), log_metric=logged.__setitem__)
        return rewards, logged

    def test_they_score_zero_and_are_counted(self):
        rewards, logged = self.score()
        assert rewards == [1.0, 1.0] + [0.0] * (len(self.COMPLETIONS) - 2)
        n = len(self.COMPLETIONS)
        assert logged == {f"rewards/accuracy_reward/{name}": count / n for name, count in self.EXPECTED.items()}
        format_logged = {}
        assert format_reward(self.COMPLETIONS, log_metric=format_logged.__setitem__) == [0.0, 1.0] + [0.0] * (n - 2)
        assert format_logged == {"rewards/format_reward/not_text": 4 / n}

    def test_huge_numbers_do_not_hang_outside_the_main_thread(self):
        # math-verify's timeout needs the main thread; without the size guard, the power tower keeps a thread (and,
        # holding the GIL in exact arithmetic, the whole process) busy: still stuck after 100 s when tried. A
        # subprocess can be stopped if it hangs.
        script = (
            "import json, threading\n"
            "from vppo_trl.rewards import accuracy_reward\n"
            "completions = ['\\\\boxed{9^{9^{9^{9}}}}', '\\\\boxed{(10^{10})!}', '\\\\boxed{0.5}']\n"
            "results = []\n"
            "score = lambda: results.append(accuracy_reward(completions, ['3', '3', '1/2']))\n"
            "thread = threading.Thread(target=score)\n"
            "thread.start()\n"
            "thread.join()\n"
            "print(json.dumps(results[0]))\n"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1]) == [0.0, 0.0, 1.0]

    def test_a_math_verify_timeout_scores_zero_and_is_counted(self, monkeypatch):
        monkeypatch.setattr(rewards_module, "MAX_ANSWER_DIGITS", math.inf)  # let the tower reach math-verify
        monkeypatch.setattr(rewards_module, "MATH_VERIFY_TIMEOUT_SECONDS", 1)
        logged = {}
        assert accuracy_reward(["\\boxed{9^{9^{9^{9}}}}"], ["3"], log_metric=logged.__setitem__) == [0.0]
        assert logged["rewards/accuracy_reward/unparseable"] == 1.0

    @pytest.mark.parametrize(
        ("prediction", "gold"),
        [
            ("10^{100000}", "100^{50000}"),  # 100,001 digits: still compared
            ("9" * 4000, "10^{4000}-1"),
            ("+\\infty", "\\infty"),
        ],
    )
    def test_large_but_gradable_answers_are_still_graded(self, prediction, gold):
        logged = {}
        assert accuracy_reward([f"\\boxed{{{prediction}}}"], [gold], log_metric=logged.__setitem__) == [1.0]
        assert logged["rewards/accuracy_reward/unparseable"] == 0.0

    def test_counts_reach_the_training_log(self, tmp_path):
        trainer = tiny_trainer(tmp_path, make_colour_dataset(4), [accuracy_reward, format_reward])
        trainer.train()
        log = trainer.state.log_history[0]
        # The random tiny model never writes a boxed answer: every completion is counted as such.
        assert log["rewards/accuracy_reward/no_boxed_answer"] == 1.0
        assert log["rewards/accuracy_reward/not_text"] == 0.0 and log["rewards/accuracy_reward/unparseable"] == 0.0
        assert log["rewards/format_reward/not_text"] == 0.0


# The command line. Each error is one line on stderr, exit status 2, no traceback.
RECIPE = {"model_name_or_path": "./model", "dataset_name": "./train.jsonl", "report_to": "none", "use_cpu": True}


class _RepositoryNotFound(RepositoryNotFoundError):
    def __init__(self):
        Exception.__init__(self, "404 Client Error: Repository Not Found")


@pytest.fixture
def recipe(tmp_path, monkeypatch) -> Path:
    """A minimal recipe whose model folder exists (only its existence is checked before the data is read)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    save(PILImage.new("RGB", (8, 8), RED), tmp_path / "ok.png")
    write_jsonl(tmp_path / "train.jsonl", [image_row("ok.png")])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def one_line_error(stderr: str) -> str:
    """The error line of a failed command: a single line, the last one (progress bars and library warnings may come
    first), and no traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("vppo-trl train: error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *args])
    assert exit_info.value.code == 2
    return one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("token_filter_ration: 0.5", "unknown recipe key 'token_filter_ration' (did you mean 'token_filter_ratio'?)"),
        ("perturbaton: gaussian_blur", "unknown recipe key 'perturbaton' (did you mean 'perturbation'?)"),
        ("max_steps: 2.5", "recipe key 'max_steps' must be int, got 2.5 (float)"),
        ("max_steps: true", "recipe key 'max_steps' must be int, got True (bool)"),
        ("use_peft: 3", "recipe key 'use_peft' must be true or false, got 3 (int)"),
        ("reward_weights: [1.0, heavy]", "recipe key 'reward_weights' must be float, got 'heavy' (str)"),
        ("learning_rate: fast", "argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
        ("seed: [1, 2", "while parsing a flow sequence in"),
    ],
)
def test_a_recipe_mistake_names_the_key(recipe, capsys, entry, message):
    recipe.write_text(recipe.read_text() + entry + "\n")
    assert cli_error(capsys, "--config", str(recipe)).startswith(f"vppo-trl train: error: {message}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--token_filter_ratio", "0.5", "--perturbation_prop", "0.3"],
            "unknown argument '--perturbation_prop' (did you mean '--perturbation_prob'?)",
        ),
        (["--max_steps", "abc"], "argument --max_steps/--max-steps: invalid int value: 'abc'"),
        (["--perturbation", "blur"], "argument --perturbation: invalid choice: 'blur'"),
    ],
)
def test_a_command_line_mistake_names_the_flag(recipe, capsys, args, message):
    assert cli_error(capsys, "--config", str(recipe), *args).startswith(f"vppo-trl train: error: {message}")


@pytest.mark.parametrize("name", ["data/missing.parquet", "./data/missing.parquet", "missing.jsonl", "a/b/c"])
def test_a_missing_local_dataset(recipe, capsys, name):
    assert cli_error(capsys, "--config", str(recipe), "--dataset_name", name) == (
        f"vppo-trl train: error: Dataset {name!r} does not exist. For recipes/cpu_demo.yaml, its header shows how to "
        "create its model and data."
    )


@pytest.mark.parametrize(
    ("hub", "problem"),
    [
        ("unreachable", "the Hub cannot be reached to look for it (ConnectionError)"),
        ("not found", "the Hub has no model of that name (if it is private, log in with `hf auth login`)"),
        ("offline", "the Hub is offline (HF_HUB_OFFLINE) and has no copy of it in the local cache"),
    ],
)
def test_a_model_id_neither_on_disk_nor_on_the_hub(recipe, capsys, monkeypatch, hub, problem):
    def repo_info(self, repo_id, **kwargs):
        raise ConnectionError("no route to host") if hub == "unreachable" else _RepositoryNotFound()

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: hub == "offline")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(recipe.parent / "empty-cache"))
    assert cli_error(capsys, "--config", str(recipe), "--model_name_or_path", "models/tiny-vlm") == (
        f"vppo-trl train: error: Model folder 'models/tiny-vlm' is neither a local file or folder nor usable on the "
        f"Hub: {problem}."
    )


def test_a_cached_model_id_is_accepted_offline(recipe, monkeypatch):
    cache = recipe.parent / "cache"
    (cache / "models--models--tiny-vlm").mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    train_module._check_source("models/tiny-vlm", "Model folder", "model")  # no error


def test_the_real_command_without_the_hub(recipe):
    # As a user runs it, on a machine that cannot reach the Hub (or can, and hears it has no such model).
    result = subprocess.run(
        [str(Path(sys.executable).with_name("vppo-trl")), "train", "--config", str(recipe)]
        + ["--model_name_or_path", "models/tiny-vlm"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert one_line_error(result.stderr).startswith(
        "vppo-trl train: error: Model folder 'models/tiny-vlm' is neither a local file or folder nor usable on the "
        "Hub: "
    )


def test_a_bad_row_on_the_command_line(recipe, capsys):
    write_jsonl(recipe.parent / "train.jsonl", [image_row("ok.png"), image_row("gone.png")])
    assert cli_error(capsys, "--config", str(recipe)) == (
        "vppo-trl train: error: './train.jsonl' (split 'train'): row 1, field 'images[0]': cannot read image "
        f"'gone.png': file not found at {recipe.parent / 'gone.png'}; 1 of 2 rows are invalid (1 problems). Fix the "
        "data, or pass on_bad_row='skip' to drop these rows."
    )


def test_a_too_long_prompt_on_the_command_line_keeps_what_was_saved(recipe, capsys):
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    model.save_pretrained(recipe.parent / "model")
    processor.save_pretrained(recipe.parent / "model")
    write_jsonl(recipe.parent / "train.jsonl", [image_row("ok.png", problem="Describe. " + "red " * 5000)])
    earlier = recipe.parent / "out" / "checkpoint-7"
    earlier.mkdir(parents=True)
    (earlier / "model.safetensors").write_bytes(b"weights of an earlier run")
    args = ["--output_dir", "out", "--per_device_train_batch_size", "2", "--num_generations", "2"]
    err = cli_error(capsys, "--config", str(recipe), *args, "--max_steps", "1", "--max_completion_length", "8")
    assert err.startswith("vppo-trl train: error: prompt 'Describe. red red red")
    assert "tokens: with max_completion_length=8" in err and "more than the model's limit of 4096" in err
    assert (earlier / "model.safetensors").read_bytes() == b"weights of an earlier run"
