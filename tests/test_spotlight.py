"""The token-perception tool measures what the trainer measures."""

import json
import random
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import asdict

import matplotlib
import pytest
import torch
from PIL import Image

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import (
    COLOUR_QUESTION,
    COLOURS,
    build_tiny_vlm,
    cached_family,
    colour_reward,
    make_colour_dataset,
    make_shape_image,
)
from vppo_trl.tools.spotlight import (
    TokenPerception,
    display_tokens,
    measurement_settings,
    perturbed_views,
    sample_perceptions,
    shape_group,
    token_perception,
    write_spotlight,
)
from vppo_trl.tools.spotlight_page import (
    KEPT_COLOUR,
    DependencyScale,
    _layout_tokens,
    drawable_text,
    fraction_colour,
    perception_page,
    save_perception_png,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def length_reward(completions, **kwargs) -> list[float]:
    return [float(len(str(completion)) % 3) for completion in completions]


@pytest.mark.parametrize(
    ("estimator", "space"), [("k3", "original_image"), ("kl", "original_image"), ("k3", "pixel_values")]
)
def test_measures_what_the_trainer_measures_for_one_batch_and_round(tmp_path, estimator, space):
    """Random patches: each completion's draw is the one the trainer makes for it, through the same functions."""
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    dataset = make_colour_dataset(4, seed=3)
    args = VPPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        report_to="none", use_cpu=True, bf16=False, dependency_estimator=estimator, perturbation_space=space,
        perturbation_prob=0.3, seed=5,
    )  # fmt: skip
    trainer = VPPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=dataset,
                          processing_class=processor)  # fmt: skip
    trainer.model.train()
    batch = trainer._generate_and_score_round([dict(dataset[0])] * 4)
    mask = batch["completion_mask"]
    trainer.shared.perturbation_round = 1  # the trainer's first generation batch
    expected, _ = trainer._visual_dependency(batch, [0, 1, 2, 3], mask)
    settings = measurement_settings(args)
    for row in range(4):
        ids = batch["completion_ids"][row][mask[row].bool()].tolist()
        result = token_perception(
            trainer.model, processor, dataset[0]["prompt"], dataset[0]["images"], completion=ids, settings=settings,
            seed=args.seed, completion_index=row,
        )  # fmt: skip
        # One row alone vs four padded together, TRL's fused LM head vs the logits: float32 rounding differs. KL
        # between two close distributions cancels to an absolute error of about eps * |log p| (~1e-6 here).
        atol = 1e-7 if estimator == "k3" else 1e-6
        torch.testing.assert_close(torch.tensor(result.dependency), expected[row][: len(ids)], atol=atol, rtol=1e-3)
        assert sum(result.kept) == -(-len(ids) * 2 // 5)
    # Another completion index is another draw: the dependencies differ.
    other = token_perception(
        trainer.model, processor, dataset[0]["prompt"], dataset[0]["images"], completion=ids, settings=settings,
        seed=args.seed, completion_index=7,
    )  # fmt: skip
    assert other.dependency != result.dependency


def test_command_line_defaults_are_vppo_configs():
    from dataclasses import fields

    from vppo_trl.tools.spotlight import build_parser

    _, settings = build_parser().parse_args_into_dataclasses(["--model", "m"])
    config = VPPOConfig(output_dir="unused", use_cpu=True, bf16=False)
    assert {f.name: getattr(settings, f.name) for f in fields(settings)} == asdict(measurement_settings(config))
    _, short = build_parser().parse_args_into_dataclasses(
        ["--model", "m", "--patch-size", "7", "--noise-std", "3", "--blur-radius", "2", "--estimator", "kl"]
    )
    assert (short.perturbation_patch_size, short.perturbation_noise_std, short.perturbation_blur_radius) == (7, 3, 2)
    assert short.dependency_estimator == "kl"


def test_samples_several_completions_with_rewards_and_scales(tmp_path):
    model, processor = build_tiny_vlm("qwen3_vl", extra_words=COLOURS)
    image = make_shape_image("blue", random.Random(1))
    perceptions = sample_perceptions(
        model, processor, COLOUR_QUESTION, [image], num_completions=4, answer="blue", reward_func=colour_reward,
        max_new_tokens=5, draws=2, perturbation_prob=0.5,
    )  # fmt: skip
    assert len(perceptions) == 4
    rewards = colour_reward([item.completion for item in perceptions], ["blue"] * 4)
    assert [item.reward for item in perceptions] == rewards
    for item in perceptions:
        assert len(item.tokens) == len(item.dependency) == len(item.kept) == len(item.special) > 0
        assert all(value >= 0 for value in item.dependency)
        assert item.advantage == pytest.approx(item.reward - sum(rewards) / 4)
        assert item.advantage_scale >= 0.9 - 1e-6
    paths = write_spotlight(tmp_path, perceptions, [image], [image], COLOUR_QUESTION)
    for path in paths.values():
        assert path.stat().st_size > 0
    saved = json.loads(paths["perception.json"].read_text())
    assert saved["prompt"] == COLOUR_QUESTION and len(saved["completions"]) == 4
    with Image.open(paths["perception.png"]) as png, Image.open(paths["distributions.png"]) as distributions:
        assert png.width > 800 and distributions.width > 800


def test_tas_scales_take_the_training_cap_on_the_dynamic_beta_max():
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    image = make_shape_image("blue", random.Random(1))

    def alternating_reward(completions, **kwargs):
        return [float(index % 2) for index in range(len(completions))]

    def largest_scale(**settings) -> float:
        perceptions = sample_perceptions(
            model, processor, COLOUR_QUESTION, [image], num_completions=6, answer="blue",
            reward_func=alternating_reward, max_new_tokens=5, draws=1, **settings,
        )  # fmt: skip
        return max(item.advantage_scale for item in perceptions)

    assert largest_scale() > 1.0  # the dynamic range gives the most image-dependent completion more than 1
    assert largest_scale(advantage_scale_max_cap=1.0) <= 1.0 + 1e-6


def test_kept_tokens_and_tas_scales_take_the_guards_blend_and_balance_as_training_does():
    """The spotlight shapes its group through the function training calls: with the guard, its TAS scales are blended
    and balanced (each side of the advantage's sign has a weighted mean scale of 1), its TGF ratio blended."""
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    image = make_shape_image("blue", random.Random(1))

    def uneven_reward(completions, **kwargs):
        return [1.0, 0.0, 0.0, 1.0, 0.0, 0.0][: len(completions)]

    guard = dict(cold_start_guard=True, cold_start_guard_floor=1e-9, cold_start_guard_full=1e-8)  # open
    perceptions = sample_perceptions(
        model, processor, COLOUR_QUESTION, [image], num_completions=6, answer="blue", reward_func=uneven_reward,
        max_new_tokens=5, draws=1, **guard,
    )  # fmt: skip
    advantages = torch.tensor([item.advantage for item in perceptions])
    scales = torch.tensor([item.advantage_scale for item in perceptions])
    for side in (advantages > 0, advantages < 0):
        weights = advantages[side].abs()
        assert (scales[side] * weights).sum().item() == pytest.approx(weights.sum().item(), rel=1e-5)
    assert not torch.allclose(scales, torch.ones(6))  # TAS did shape
    dependencies = [item.dependency for item in perceptions]
    settings = measurement_settings(VPPOConfig(output_dir="unused", use_cpu=True, **guard))
    shaped = shape_group(settings, dependencies, advantages.tolist())
    assert scales.tolist() == shaped.scales.tolist()
    assert [item.kept for item in perceptions] == [
        shaped.keep[row, : len(values)].tolist() for row, values in enumerate(dependencies)
    ]
    # A closed guard (no dependency reaches its floor): every token kept, every scale 1, as GRPO.
    closed = sample_perceptions(
        model, processor, COLOUR_QUESTION, [image], completions=[item.token_ids for item in perceptions],
        answer="blue", reward_func=uneven_reward, draws=1, cold_start_guard=True, cold_start_guard_floor=10.0,
        cold_start_guard_full=20.0,
    )  # fmt: skip
    assert [item.advantage_scale for item in closed] == [1.0] * 6
    assert all(all(item.kept) for item in closed)


def test_special_tokens_by_name_and_split_characters_without_replacement_characters():
    _, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    tokenizer = processor.tokenizer
    ids = tokenizer("red é ✓", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    texts, special = display_tokens(tokenizer, ids)
    assert len(texts) == len(ids)
    assert texts[-1] == "<|im_end|>" and special[-1] and not any(special[:-1])
    assert not any("\ufffd" in text for text in texts)
    assert "".join(text for text in texts[:-1] if text != "·") == "red é ✓"
    # The first byte of "é" alone completes no character: shown by its vocabulary entry, marked
    fragment, marked = display_tokens(tokenizer, ids[2:3])
    assert "\ufffd" not in fragment[0] and marked == [True]


def test_page_renders_in_a_browser_with_the_image_and_shaded_tokens(tmp_path):
    """The page, screenshotted by headless Chromium, shows the image and shaded, boxed tokens."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    image = Image.new("RGB", (56, 56), "white")
    image.paste((0, 200, 0), (8, 8, 48, 48))
    perturbed = Image.new("RGB", (56, 56), "black")
    tokens = ["The", " shape", " is", " green", ".", "<|im_end|>"]
    dependency = [1e-6, 2e-4, 1e-5, 2.0, 0.3, 0.05]
    kept = [False, False, False, True, True, True]
    perception = TokenPerception(tokens=tokens, dependency=dependency, kept=kept, trajectory_dependency=0.39,
                                 completion="The shape is green.", special=[False] * 5 + [True],
                                 advantage_scale=1.0)  # fmt: skip
    blank = TokenPerception(tokens=tokens, dependency=[0.0] * 6, kept=[False] * 6, trajectory_dependency=0.0,
                            completion="The shape is green.", special=[False] * 5 + [True])  # fmt: skip

    def screenshot(item: TokenPerception, name: str) -> Image.Image:
        page = tmp_path / f"{name}.html"
        page.write_text(perception_page([item], [image], [perturbed], COLOUR_QUESTION), encoding="utf-8")
        shot = tmp_path / f"{name}.png"
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tempfile.mkdtemp()}",
             f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return Image.open(shot).convert("RGB")

    def count(picture: Image.Image, colour: tuple[int, int, int], tolerance: int = 30) -> int:
        return sum(
            all(abs(channel - target) <= tolerance for channel, target in zip(pixel, colour, strict=True))
            for pixel in picture.getdata()
        )

    shaded, plain = screenshot(perception, "shaded"), screenshot(blank, "plain")
    # The image, shown at 4x (224 px): its 40 x 40 green square is 160 x 160 screen pixels.
    assert count(shaded, (0, 200, 0)) > 0.8 * 160 * 160
    # The most image-dependent token is shaded with the darkest colour of the scale, which only the legend shows
    # otherwise; the kept tokens are boxed in the kept colour, which only the legend's sample shows otherwise.
    darkest = tuple(int(fraction_colour(1.0)[i : i + 2], 16) for i in (1, 3, 5))
    kept_colour = tuple(int(KEPT_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    assert count(shaded, darkest, 12) > count(plain, darkest, 12) + 300
    assert count(shaded, kept_colour, 12) > count(plain, kept_colour, 12) + 3 * 100
    assert DependencyScale.for_values(dependency).fraction(2.0) == 1.0


def test_command_line(tmp_path, capsys):
    from vppo_trl.cli import main

    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    make_shape_image("red", random.Random(2)).save(tmp_path / "shape.png")
    common = ["spotlight", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "shape.png"), "--device",
              "cpu", "--draws", "2"]  # fmt: skip
    main(
        [*common, "--prompt", COLOUR_QUESTION, "--completion", "red", "--completion", "It is blue.", "--answer", "red",
         "--reward", "vppo_trl.testing.colour_reward", "--output-dir", str(tmp_path / "spot")]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "most image-dependent tokens" in printed and "reward 1" in printed and "reward 0" in printed
    for name in ("perception.png", "perception.html", "perception.json", "distributions.png"):
        assert (tmp_path / "spot" / name).stat().st_size > 0
    page = (tmp_path / "spot" / "perception.html").read_text()
    assert "data:image/png;base64," in page and COLOUR_QUESTION in page and "2 completions" in page


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--image", "missing.png"], "vppo-trl spotlight: error: image file '{tmp}/missing.png' not found"),
        (
            ["--model", "no-such-folder"],
            "vppo-trl spotlight: error: model folder '{tmp}/no-such-folder' does not exist",
        ),
        (["--prompt", "word " * 5000], "vppo-trl spotlight: error: The prompt is "),
    ],
)
def test_command_line_bad_input_gets_one_line(tmp_path, capsys, change, message):
    from vppo_trl.cli import main

    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    make_shape_image("red", random.Random(2)).save(tmp_path / "shape.png")
    values = {"--model": str(tmp_path / "model"), "--image": str(tmp_path / "shape.png"), "--prompt": COLOUR_QUESTION}
    option, value = change
    values[option] = value if option == "--prompt" else str(tmp_path / value)
    argv = ["spotlight", "--device", "cpu", "--output-dir", str(tmp_path / "spot")]
    for name, given in values.items():
        argv += [name, given]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    printed = capsys.readouterr().err
    # One line says what is wrong (after the model's loading progress bar, when it was loaded); no traceback.
    lines = [line for line in printed.strip().splitlines() if "Loading weights" not in line]
    assert lines == [printed.strip().splitlines()[-1]] and "Traceback" not in printed
    assert lines[0].startswith(message.format(tmp=tmp_path))
    if option == "--prompt":
        assert "more than the 4096 tokens the model reads" in lines[0]
    assert not (tmp_path / "spot").exists()


def test_command_line_distributions_over_a_dataset(tmp_path, capsys):
    from datasets import Dataset

    from vppo_trl.cli import main

    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    answers = ["red", "blue", "green"]
    rows = {"problem": [COLOUR_QUESTION] * 3, "images": [[make_shape_image(c, rng)] for c in answers]}
    Dataset.from_dict({**rows, "answer": answers}).to_parquet(tmp_path / "colours.parquet")
    main(
        ["spotlight", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "colours.parquet"),
         "--max-rows", "2", "--num-completions", "2", "--max-new-tokens", "3", "--draws", "1", "--device", "cpu",
         "--reward", "vppo_trl.testing.colour_reward", "--output-dir", str(tmp_path / "spot")]
    )  # fmt: skip
    assert "Share of tokens above: 0.001: " in capsys.readouterr().out
    summary = json.loads((tmp_path / "spot" / "distributions.json").read_text())
    assert summary["rows"] == 2 and summary["completions"] == 4
    assert summary["tokens"] == sum(len(item["tokens"]) for item in summary["completions_detail"])
    assert all(item["reward"] in (0.0, 1.0) for item in summary["completions_detail"])
    with Image.open(tmp_path / "spot" / "distributions.png") as picture:
        assert picture.width > 800


def test_every_option_has_help_text():
    from vppo_trl.tools.spotlight import build_parser

    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    assert "perception.html" in parser.description


def test_perturbed_views_are_the_processed_images():
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    image = make_shape_image("green", random.Random(4))
    originals, perturbed = perturbed_views(model, processor, COLOUR_QUESTION, [image], perturbation="solid")
    assert originals[0].size == perturbed[0].size == image.size
    assert max(abs(a - b) for a, b in zip(originals[0].tobytes(), image.tobytes(), strict=True)) <= 1
    assert set(perturbed[0].getdata()) == {(128, 128, 128)}


def test_perturbs_in_the_trainers_space_by_default():
    """As VPPOConfig's default, 14-px squares are blackened on the image as given, before the processor resizes it."""
    import numpy as np

    model, processor = build_tiny_vlm("qwen2_5_vl")
    image = Image.new("RGB", (150, 90), (200, 30, 30))

    def patch_blackness(space: str | None) -> np.ndarray:
        kwargs = {} if space is None else {"perturbation_space": space}
        _, perturbed = perturbed_views(
            model, processor, "What colour?", [image], perturbation="patch_blackening", perturbation_prob=0.5, **kwargs
        )
        black = np.asarray(perturbed[0]).sum(-1) < 30
        rows, columns = black.shape[0] // 14, black.shape[1] // 14
        return black[: rows * 14, : columns * 14].reshape(rows, 14, columns, 14).mean((1, 3))

    # Squares of the 150 x 90 original, resized to the processor's 56 x 28: every patch partly black, none fully.
    default = patch_blackness(None)
    assert ((default > 0) & (default < 1)).all()
    # The processed-pixels route blackens whole patches.
    rows = patch_blackness("pixel_values")
    assert set(np.unique(rows)) <= {0.0, 1.0} and (rows == 1).any()


@pytest.mark.parametrize(("family", "space"), [("idefics3", "original_image"), ("lfm2_vl", "pixel_values")])
def test_measures_tiled_and_patch_sequence_families(family, space):
    """The spotlight perturbs through the model's own processor, as training does: a tiling family (Idefics3 cuts
    each image into tiles) and a patch-sequence family (LFM2-VL) measure a dependency on the image."""
    model, processor = cached_family(family)
    image = make_shape_image("red", random.Random(0))
    perception = token_perception(
        model, processor, COLOUR_QUESTION, [image], completion="The shape is red.", perturbation_space=space
    )
    assert len(perception.dependency) == len(perception.tokens) > 0
    assert max(perception.dependency) > 0


def test_png_draws_characters_its_fonts_lack_as_escapes_without_a_warning_per_glyph(tmp_path):
    """Real tokenizers decode to scripts and stray code points matplotlib's bundled fonts lack (an untrained model's
    completion gave U+0381): the PNG writes them as escapes instead of empty boxes and a warning per glyph."""
    assert drawable_text("red é ␣ ⇥ ↵ ·") == "red é ␣ ⇥ ↵ ·"
    assert drawable_text("a\u0381中😀") == "a\\u0381\\u4e2d\\U0001f600"
    # As the docs say: a font that has the character, first in font.monospace, draws it (DejaVu Sans has U+144A).
    assert drawable_text("\u144a") == "\\u144a"
    with matplotlib.rc_context({"font.monospace": ["DejaVu Sans", "DejaVu Sans Mono"]}):
        assert drawable_text("\u144a") == "\u144a"
    image = Image.new("RGB", (28, 20), "red")
    item = TokenPerception(tokens=["\u0381", "中", " red", "<|im_end|>"], dependency=[1e-4, 0.02, 0.6, 0.01],
                           kept=[False, False, True, True], trajectory_dependency=0.16, completion="\u0381中 red",
                           special=[False, False, False, True])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_perception_png([item], [image], [image], "Qu'est-ce que c'est ? 中文", str(tmp_path / "p.png"),
                            title="Token perception 中")  # fmt: skip
    assert [str(warning.message) for warning in caught] == []
    # What the PNG draws for each token, and a box wide enough for the escape
    drawn = [(box[3], box[2]) for box in _layout_tokens(item, 600.0)]
    assert [text for text, _ in drawn] == ["\\u0381", "\\u4e2d", " red", "<|im_end|>"]
    assert drawn[0][1] > drawn[2][1]
