"""Dataset loading from every supported source, the prompt layout GRPOTrainer expects, and bad-row handling."""

import io
import json
import logging

import pytest
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from trl.data_utils import prepare_multimodal_messages

from vppo_trl import data as data_module
from vppo_trl.data import INSTRUCTION_SUFFIX, DataReport, build_prompt, load_vppo_dataset

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png_bytes(color=RED, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 6), color).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path, color=RED, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color, mode))
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path, rows):
    features = Features({"id": Value("int64"), "problem": Value("string"), "answer": Value("string")})
    features["images"] = List(Image())
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def user_text(row) -> str:
    return row["prompt"][0]["content"][-1]["text"]


def assert_rgb(image, color):
    assert isinstance(image, PILImage.Image)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == color


class TestBuildPrompt:
    def test_images_first_then_problem_and_suffix(self):
        prompt = build_prompt("  What is x?  ", num_images=2)
        assert prompt == [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": "What is x?\n\n" + INSTRUCTION_SUFFIX},
                ],
            }
        ]

    def test_placeholders_are_interleaved(self):
        content = build_prompt("Compare <image> and <image>. Which is larger?", num_images=2)[0]["content"]
        assert content == [
            {"type": "text", "text": "Compare "},
            {"type": "image"},
            {"type": "text", "text": " and "},
            {"type": "image"},
            {"type": "text", "text": ". Which is larger?\n\n" + INSTRUCTION_SUFFIX},
        ]

    def test_leading_placeholder_and_adjacent_placeholders(self):
        content = build_prompt(" <image><image>\nFind x. ", num_images=2)[0]["content"]
        assert content == [
            {"type": "image"},
            {"type": "image"},
            {"type": "text", "text": "\nFind x.\n\n" + INSTRUCTION_SUFFIX},
        ]

    def test_placeholder_at_the_end_gets_its_own_suffix_block(self):
        content = build_prompt("Find the area of the shape.\n<image>", num_images=1)[0]["content"]
        assert content == [
            {"type": "text", "text": "Find the area of the shape.\n"},
            {"type": "image"},
            {"type": "text", "text": INSTRUCTION_SUFFIX},
        ]

    def test_text_only_and_no_suffix(self):
        assert build_prompt("1+1?", num_images=0, instruction_suffix="") == [
            {"role": "user", "content": [{"type": "text", "text": "1+1?"}]}
        ]

    def test_placeholder_count_must_match_images(self):
        with pytest.raises(ValueError, match="2 '<image>' placeholder\\(s\\) but 1 image"):
            build_prompt("<image> vs <image>", num_images=1)

    def test_suffix_is_the_papers_text(self):
        assert INSTRUCTION_SUFFIX == (
            "You first think through the reasoning process as an internal monologue, enclosed within <think> </think>"
            " tags. Then, provide your final answer enclosed within \\boxed{}."
        )


class TestSources:
    def test_parquet_with_image_bytes(self, tmp_path):
        path = write_parquet(
            tmp_path / "train.parquet",
            [
                {"id": 7, "problem": "<image>\nHow many sides?", "answer": "6", "images": [png_bytes(RED, "L")]},
                {"id": 8, "problem": "Which is red?", "answer": "B", "images": [png_bytes(RED), png_bytes(BLUE)]},
            ],
        )
        dataset, report = load_vppo_dataset(str(path))
        assert report == DataReport(total_rows=2, kept_rows=2, skipped_rows=0, problems=[])
        assert dataset.column_names == ["id", "prompt", "images", "answer"]
        first, second = dataset[0], dataset[1]
        assert first["id"] == 7 and first["answer"] == "6"
        assert [block["type"] for block in first["prompt"][0]["content"]] == ["image", "text"]
        assert user_text(first) == "\nHow many sides?\n\n" + INSTRUCTION_SUFFIX
        red_as_grey = PILImage.new("RGB", (1, 1), RED).convert("L").getpixel((0, 0))
        assert_rgb(first["images"][0], (red_as_grey,) * 3)  # a greyscale source decodes to RGB
        assert_rgb(second["images"][0], RED)
        assert_rgb(second["images"][1], BLUE)

    def test_rows_are_accepted_by_trl(self, tmp_path):
        path = write_parquet(
            tmp_path / "train.parquet",
            [
                {
                    "id": 0,
                    "problem": "Is <image> bigger than <image>?",
                    "answer": "A",
                    "images": [png_bytes(RED), png_bytes(BLUE)],
                }
            ],
        )
        row = load_vppo_dataset(str(path))[0][0]
        # What GRPOTrainer._generate_and_score_completions does with each row.
        messages = prepare_multimodal_messages(row["prompt"], images=row["images"])
        filled = [block for block in messages[0]["content"] if block["type"] == "image"]
        assert [block["image"].getpixel((0, 0)) for block in filled] == [RED, BLUE]

    def test_jsonl_with_relative_paths_and_a_text_only_row(self, tmp_path):
        write_png(tmp_path / "data" / "imgs" / "a.png", GREEN)
        path = write_jsonl(
            tmp_path / "data" / "train.jsonl",
            [
                {"uid": "a", "problem": "Area?", "answer": "12 cm", "images": ["imgs/a.png"]},
                {"uid": "b", "problem": "2+2?", "answer": 4, "images": []},
                {"uid": "c", "problem": "3+3?", "answer": "6", "images": None},
            ],
        )
        dataset, report = load_vppo_dataset(str(path))
        assert report.kept_rows == 3
        assert dataset["uid"] == ["a", "b", "c"]
        assert_rgb(dataset[0]["images"][0], GREEN)
        assert dataset[1]["images"] == [] and dataset[2]["images"] == []
        assert dataset[1]["prompt"] == [
            {"role": "user", "content": [{"type": "text", "text": "2+2?\n\n" + INSTRUCTION_SUFFIX}]}
        ]
        assert dataset["answer"] == ["12 cm", "4", "6"]

    def test_relative_source_survives_a_change_of_directory(self, tmp_path, monkeypatch):
        write_png(tmp_path / "data" / "imgs" / "a.png", BLUE)
        write_jsonl(tmp_path / "data" / "train.jsonl", [{"problem": "p", "answer": "1", "images": ["imgs/a.png"]}])
        monkeypatch.chdir(tmp_path)
        dataset, _ = load_vppo_dataset("data/train.jsonl")
        monkeypatch.chdir(tmp_path / "data")  # images are decoded when rows are read, possibly elsewhere
        assert_rgb(dataset[0]["images"][0], BLUE)

    def test_image_root_and_custom_columns(self, tmp_path):
        write_png(tmp_path / "images" / "q1.png", BLUE)
        path = write_jsonl(tmp_path / "meta" / "val.jsonl", [{"question": "Q", "solution": "1", "pics": ["q1.png"]}])
        dataset, _ = load_vppo_dataset(
            str(path),
            split="validation",
            image_root=str(tmp_path / "images"),
            problem_column="question",
            answer_column="solution",
            images_column="pics",
            instruction_suffix="",
        )
        assert dataset.column_names == ["prompt", "images", "answer"]
        assert user_text(dataset[0]) == "Q"
        assert_rgb(dataset[0]["images"][0], BLUE)

    def test_imagefolder_with_metadata(self, tmp_path):
        write_png(tmp_path / "folder" / "x.png", RED, mode="RGBA")
        write_png(tmp_path / "folder" / "y.png", GREEN)
        write_jsonl(
            tmp_path / "folder" / "metadata.jsonl",
            [
                {"file_name": "x.png", "problem": "<image> Which colour?", "answer": "red"},
                {"file_name": "y.png", "problem": "And this one?", "answer": "green"},
            ],
        )
        dataset, report = load_vppo_dataset(str(tmp_path / "folder"))
        assert report.kept_rows == 2
        assert sorted(dataset["answer"]) == ["green", "red"]
        for row in dataset:
            assert len(row["images"]) == 1
            assert_rgb(row["images"][0], RED if row["answer"] == "red" else GREEN)
            assert row["prompt"][0]["content"][0]["type"] == "image"

    def test_directory_of_parquet_files_with_splits(self, tmp_path):
        folder = tmp_path / "virl"
        write_parquet(
            folder / "train-00000-of-00002.parquet",
            [{"id": 0, "problem": "a", "answer": "1", "images": [png_bytes()]}],
        )
        write_parquet(
            folder / "train-00001-of-00002.parquet",
            [{"id": 1, "problem": "b", "answer": "2", "images": [png_bytes()]}],
        )
        write_parquet(
            folder / "validation-00000-of-00001.parquet", [{"id": 9, "problem": "c", "answer": "3", "images": []}]
        )
        write_png(folder / "preview.png")  # stray non-data files are ignored
        train, _ = load_vppo_dataset(str(folder))
        validation, _ = load_vppo_dataset(str(folder), split="validation")
        assert sorted(train["id"]) == [0, 1]
        assert validation["id"] == [9]

    def test_directory_of_jsonl_files(self, tmp_path):
        write_png(tmp_path / "d" / "imgs" / "a.png", GREEN)
        write_jsonl(tmp_path / "d" / "part1.jsonl", [{"problem": "p", "answer": "1", "images": ["imgs/a.png"]}])
        write_jsonl(tmp_path / "d" / "part2.jsonl", [{"problem": "q", "answer": "2", "images": []}])
        dataset, _ = load_vppo_dataset(str(tmp_path / "d"))
        assert sorted(dataset["answer"]) == ["1", "2"]

    def test_max_rows(self, tmp_path):
        path = write_jsonl(tmp_path / "t.jsonl", [{"problem": str(i), "answer": str(i)} for i in range(5)])
        dataset, report = load_vppo_dataset(str(path), max_rows=2)
        assert dataset["answer"] == ["0", "1"]
        assert report.total_rows == 2

    def test_hub_ids_go_to_load_dataset(self, monkeypatch):
        calls = []
        hub_dataset = Dataset.from_dict({"problem": ["p"], "answer": ["1"]})
        monkeypatch.setattr(
            data_module, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or hub_dataset
        )
        dataset, _ = load_vppo_dataset("FanqingM/MMK12", split="test")
        assert calls == [(("FanqingM/MMK12",), {"split": "test"})]
        assert dataset["answer"] == ["1"]

    def test_missing_local_source(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_vppo_dataset(str(tmp_path / "nope.parquet"))

    def test_missing_column(self, tmp_path):
        path = write_jsonl(tmp_path / "t.jsonl", [{"question": "p", "answer": "1"}])
        with pytest.raises(ValueError, match="no column 'problem'.*'question'"):
            load_vppo_dataset(str(path))

    def test_invalid_on_bad_row(self, tmp_path):
        with pytest.raises(ValueError, match=r"on_bad_row must be one of \['raise', 'skip'\], got 'drop'"):
            load_vppo_dataset(str(tmp_path), on_bad_row="drop")


class TestBadRows:
    @pytest.fixture
    def bad_jsonl(self, tmp_path):
        write_png(tmp_path / "imgs" / "ok.png")
        (tmp_path / "imgs" / "corrupt.png").write_bytes(bytes(range(256)) * 4)
        noise = io.BytesIO()
        PILImage.frombytes("RGB", (64, 64), bytes(range(256)) * 48).save(noise, format="PNG")
        (tmp_path / "imgs" / "truncated.png").write_bytes(noise.getvalue()[: len(noise.getvalue()) // 2])
        rows = [
            {"id": 0, "problem": "good", "answer": "1", "images": ["imgs/ok.png"]},
            {"id": 1, "problem": "missing file", "answer": "1", "images": ["imgs/a.png"]},
            {"id": 2, "problem": "corrupt", "answer": "1", "images": ["imgs/corrupt.png"]},
            {"id": 3, "problem": "  ", "answer": "1", "images": ["imgs/ok.png"]},
            {"id": 4, "problem": "no answer", "answer": None, "images": []},
            {"id": 5, "problem": "good, text only", "answer": "2", "images": []},
            {"id": 6, "problem": "truncated", "answer": "1", "images": ["imgs/truncated.png"]},
            {"id": 7, "problem": "<image> and <image>", "answer": "1", "images": ["imgs/ok.png"]},
            {"id": 8, "problem": ["not", "text"], "answer": "1", "images": []},
        ]
        return write_jsonl(tmp_path / "train.jsonl", rows)

    def test_raise_names_row_field_and_value(self, bad_jsonl):
        with pytest.raises(ValueError) as error:
            load_vppo_dataset(str(bad_jsonl))
        message = str(error.value)
        assert "7 of 9 rows are invalid (7 problems)" in message
        assert "row 1, field 'images[0]': cannot read image 'imgs/a.png': file not found" in message
        assert "row 2, field 'images[0]': cannot read image 'imgs/corrupt.png': not an image" in message
        assert "row 3, field 'problem': empty problem '  '" in message
        assert "row 4, field 'answer': missing answer" in message
        assert "on_bad_row='skip'" in message
        assert "row 7" not in message  # only the first five problems are listed

    def test_skip_drops_exactly_the_bad_rows(self, bad_jsonl, caplog):
        with caplog.at_level(logging.WARNING, logger="vppo_trl"):
            dataset, report = load_vppo_dataset(str(bad_jsonl), on_bad_row="skip")
        assert dataset["id"] == [0, 5]
        assert (report.total_rows, report.kept_rows, report.skipped_rows) == (9, 2, 7)
        assert [problem.split(",")[0] for problem in report.problems] == [f"row {i}" for i in (1, 2, 3, 4, 6, 7, 8)]
        assert report.problems[4].endswith("cannot read image 'imgs/truncated.png': OSError: image file is truncated")
        assert report.problems[5].startswith("row 7, field 'problem': 2 '<image>' placeholder(s) but 1 image(s)")
        assert "expected a string, got list" in report.problems[6]
        assert "Skipped 7 of 9 rows" in caplog.text and "row 1, field 'images[0]'" in caplog.text
        assert_rgb(dataset[0]["images"][0], RED)

    def test_corrupt_bytes_in_parquet(self, tmp_path):
        path = write_parquet(
            tmp_path / "t.parquet",
            [
                {"id": 0, "problem": "p", "answer": "1", "images": [png_bytes()]},
                {"id": 1, "problem": "q", "answer": "1", "images": [{"bytes": b"not an image", "path": "x.png"}]},
            ],
        )
        dataset, report = load_vppo_dataset(str(path), on_bad_row="skip")
        assert dataset["id"] == [0]
        assert report.problems == [
            "row 1, field 'images[0]': cannot read image <12 bytes> ('x.png'): not an image or an unknown format"
        ]

    def test_images_must_be_a_list(self, tmp_path):
        write_png(tmp_path / "a.png")
        path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "1", "images": "a.png"}])
        with pytest.raises(ValueError, match="row 0, field 'images': expected a list of images, got str: 'a.png'"):
            load_vppo_dataset(str(path))


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # Upsampled towards the minimum by sqrt(200704 / 10000) = 4.48; 100 x 4.48 is 447.99... in floating point and
        # each side is rounded down, as in the official code.
        ((100, 100), (447, 447)),
        ((2000, 1000), (1416, 708)),  # downsampled to the maximum: sqrt(1003520 / 2e6) = 0.7083...
        ((500, 700), (500, 700)),  # 350,000 pixels: inside the limits, unchanged
    ],
)
def test_fit_image_pixels_applies_the_official_limits(size, expected):
    image = PILImage.new("L", size, 200)
    fitted = data_module.fit_image_pixels(image, data_module.PAPER_MIN_PIXELS, data_module.PAPER_MAX_PIXELS)
    assert fitted.size == expected
    assert fitted.mode == "RGB"
    assert data_module.PAPER_MIN_PIXELS * 0.99 <= fitted.width * fitted.height <= data_module.PAPER_MAX_PIXELS


def test_fit_image_pixels_without_limits_only_converts_to_rgb():
    image = PILImage.new("RGBA", (3, 5))
    fitted = data_module.fit_image_pixels(image)
    assert fitted.size == (3, 5) and fitted.mode == "RGB"


def test_loaded_images_are_fitted_to_the_pixel_limits(tmp_path):
    """The limits act on the rows as the trainer reads them: one image per row, by index, batch or sampler."""
    PILImage.new("RGB", (100, 100), RED).save(tmp_path / "small.png")
    PILImage.new("RGB", (2000, 1000), GREEN).save(tmp_path / "large.png")
    PILImage.new("RGB", (500, 700), BLUE).save(tmp_path / "inside.png")
    rows = [
        {"problem": "a", "answer": "1", "images": ["small.png"]},
        {"problem": "b", "answer": "2", "images": ["large.png", "inside.png"]},
        {"problem": "c", "answer": "3", "images": []},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    limits = {"min_pixels": data_module.PAPER_MIN_PIXELS, "max_pixels": data_module.PAPER_MAX_PIXELS}
    dataset, _ = load_vppo_dataset(str(path), **limits)
    assert [image.size for image in dataset[0]["images"]] == [(447, 447)]  # 100 x 100 upsampled to the minimum
    assert [image.size for image in dataset[1]["images"]] == [(1416, 708), (500, 700)]
    assert dataset[2]["images"] == []
    assert_rgb(dataset[0]["images"][0], RED)
    sizes = [[image.size for image in row["images"]] for row in dataset.__getitems__([1, 0])]
    assert sizes == [[(1416, 708), (500, 700)], [(447, 447)]]
    assert [image.size for image in dataset.select([0])[0]["images"]] == [(447, 447)]
    unlimited, _ = load_vppo_dataset(str(path))
    assert unlimited[0]["images"][0].size == (100, 100)


@pytest.mark.parametrize(
    ("limits", "message"),
    [({"min_pixels": 0}, "min_pixels must be a positive"), ({"min_pixels": 10, "max_pixels": 5}, "must not exceed")],
)
def test_bad_pixel_limits(tmp_path, limits, message):
    path = write_jsonl(tmp_path / "train.jsonl", [{"problem": "a", "answer": "1"}])
    with pytest.raises(ValueError, match=message):
        load_vppo_dataset(str(path), **limits)
