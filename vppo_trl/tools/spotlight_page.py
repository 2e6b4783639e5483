"""Draw token perception: a self-contained HTML page, a PNG of the same view, and dependency distributions.

The colour scale is logarithmic: visual dependencies span orders of magnitude (a k3 value of 1e-6 for a token that
ignores the image, 1 or more for one that reads it), and a linear scale would leave all but the top token blank.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

# Shown for the second and later tokens of a character split over several tokens (its text is on the first one).
CONTINUATION = "·"
# Decades of the colour scale below the largest dependency shown; smaller values are not shaded.
SCALE_DECADES = 3
COLOUR_MAP = "YlOrRd"
KEPT_COLOUR = "#1552c8"
# Thresholds of the "share of tokens above" statistics (the paper's "few tokens matter" figure).
SHARE_THRESHOLDS = (1e-3, 1e-2, 1e-1, 1.0)
# Shortest side, in CSS pixels, that images are shown at (small images are scaled up without smoothing).
IMAGE_DISPLAY_SIZE = 260


@dataclass
class DependencyScale:
    """Logarithmic colour scale from `vmax / 10**SCALE_DECADES` (unshaded) to `vmax` (darkest)."""

    vmax: float

    @classmethod
    def for_values(cls, values: Sequence[float]) -> DependencyScale:
        peak = max((value for value in values if math.isfinite(value)), default=0.0)
        return cls(peak if peak > 0 else 1.0)

    @property
    def vmin(self) -> float:
        return self.vmax / 10**SCALE_DECADES

    def fraction(self, value: float) -> float:
        """Position of `value` on the scale, 0 (at or below `vmin`) to 1 (`vmax`)."""
        if not value > self.vmin:
            return 0.0
        return min(1.0, math.log10(value / self.vmin) / SCALE_DECADES)

    def colour(self, value: float) -> str:
        return fraction_colour(self.fraction(value))

    def ticks(self) -> list[float]:
        return [self.vmin * 10**decade for decade in range(SCALE_DECADES + 1)]


def fraction_colour(fraction: float) -> str:
    """Hex colour of a position on the scale; 0 is white, so that unshaded tokens look like plain text."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if fraction <= 0:
        return "#ffffff"
    return to_hex(colormaps[COLOUR_MAP](0.08 + 0.92 * fraction))


def text_colour(fraction: float) -> str:
    return "#ffffff" if fraction > 0.62 else "#1a1a1a"


def shown_text(text: str) -> str:
    """
    A token as it is shown: spaces of a whitespace-only token as `␣` (a shaded blank box would hide what it is), tabs
    as `⇥` and other control characters escaped (`\\x0c`); newlines stay (the page breaks the line there).
    """
    if text and not text.strip(" "):
        return text.replace(" ", "␣")
    return "".join(
        "⇥"
        if char == "\t"
        else f"\\x{ord(char):02x}"
        if (ord(char) < 32 and char != "\n") or ord(char) == 127
        else char
        for char in text
    )


@functools.cache
def _font_code_points(path: str) -> frozenset[int]:
    """The code points the font file at `path` has a glyph for."""
    from matplotlib import ft2font

    return frozenset(ft2font.FT2Font(path).get_charmap())


def drawable_text(text: str, family: str = "monospace") -> str:
    """
    `text` as the PNG can draw it in matplotlib's generic `family` ("monospace", "sans-serif"): a character the font
    it picks for that family lacks is written as its escape (`\\u0381`, `\\u4e2d`) instead of an empty box and a
    warning per glyph (real tokenizers decode to scripts and stray code points the bundled DejaVu fonts lack; the HTML
    page, drawn by the browser with its own font fallback, keeps them).
    """
    from matplotlib import font_manager

    # The one font matplotlib draws `family` with: the first installed of its `font.<family>` list (it falls back
    # across a text's families, not across that list); `findfont` caches it and follows changes to the list.
    drawable = _font_code_points(font_manager.findfont(font_manager.FontProperties(family=[family])))
    return "".join(
        char
        if char in "\n\t" or ord(char) in drawable
        else f"\\u{ord(char):04x}"
        if ord(char) <= 0xFFFF
        else f"\\U{ord(char):08x}"
        for char in text
    )


def format_value(value: float) -> str:
    return f"{value:.3g}" if value >= 1e-3 or value == 0 else f"{value:.2e}"


def image_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def shares_above(values: Sequence[float], thresholds: Sequence[float] = SHARE_THRESHOLDS) -> dict[float, float]:
    """Share of `values` strictly above each threshold."""
    count = max(len(values), 1)
    return {threshold: sum(value > threshold for value in values) / count for threshold in thresholds}


# ----------------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------------

PAGE_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1100px;
       padding: 0 20px; color: #1a1a1a; background: #fafafa; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 22px 0 8px; }
.sub { color: #555; margin: 0 0 16px; font-size: 14px; }
.images { display: flex; gap: 24px; flex-wrap: wrap; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; }
figure img { display: block; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 13px; color: #444; margin-top: 6px; max-width: 320px; }
.prompt { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px; font-size: 14px;
          white-space: pre-wrap; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.legend { display: flex; align-items: center; gap: 22px; flex-wrap: wrap; font-size: 13px; margin: 8px 0; }
.gradient { position: relative; width: 320px; height: 14px; border: 1px solid #999; }
.ticks { position: relative; width: 320px; height: 16px; font-size: 11px; color: #444; }
.ticks span { position: absolute; transform: translateX(-50%); white-space: nowrap; }
.completion { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px; margin: 10px 0; }
.meta { font-size: 13px; color: #333; margin-bottom: 8px; display: flex; gap: 16px; flex-wrap: wrap;
        align-items: center; }
.rank { font-weight: 700; font-size: 15px; }
.bar { display: inline-block; width: 120px; height: 10px; background: #eee; border-radius: 5px; overflow: hidden;
       vertical-align: middle; }
.bar i { display: block; height: 100%; background: #e8590c; }
.tokens { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 17px; line-height: 2.3;
          white-space: pre-wrap; word-break: break-word; }
.t { padding: 3px 2px; border-radius: 3px; border: 3px solid transparent; cursor: help; }
.t.k { border-color: KEPT; font-weight: 700; box-shadow: 0 0 0 1px #fff inset; }
.t.s { font-size: 12px; color: #555; border: 1px dashed #888; padding: 1px 4px; font-style: italic; }
.t.s.k { border: 3px solid KEPT; }
.t.p { color: #999; }
footer { color: #555; font-size: 12px; margin: 24px 0; line-height: 1.5; }
""".replace("KEPT", KEPT_COLOUR)


def _token_span(text: str, special: bool, value: float, kept: bool, rank: int, count: int, scale) -> str:
    fraction = scale.fraction(value)
    classes = "t" + (" k" if kept else "") + (" s" if special else "") + (" p" if text == CONTINUATION else "")
    if kept:
        kept_text = f", kept by TGF (trained), rank {rank} of {count}"
    else:
        kept_text = f", filtered out by TGF, rank {rank} of {count}"
    title = f"{text!r}: visual dependency {value:.6g}{kept_text}"
    style = f"background:{scale.colour(value)};color:{text_colour(fraction)}"
    shown = html.escape(shown_text(text).replace("\n", "↵\n"))
    return f'<span class="{classes}" style="{style}" title="{html.escape(title)}">{shown}</span>'


def _ranks(values: Sequence[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda index: (-values[index], index))
    ranks = [0] * len(values)
    for rank, index in enumerate(order, start=1):
        ranks[index] = rank
    return ranks


def _legend_html(scale: DependencyScale) -> str:
    stops = ", ".join(fraction_colour(step / 10) + f" {step * 10}%" for step in range(11))
    ticks = "".join(
        f'<span style="left:{100 * index / SCALE_DECADES:.1f}%">{format_value(tick)}</span>'
        for index, tick in enumerate(scale.ticks())
    )
    return (
        '<div class="legend"><div><div>Visual dependency of each token (log scale; at or below '
        f"{format_value(scale.vmin)}: not shaded)</div>"
        f'<div class="gradient" style="background: linear-gradient(to right, {stops})"></div>'
        f'<div class="ticks">{ticks}</div></div>'
        '<div><span class="tokens"><span class="t k">kept</span></span> kept by TGF: these tokens get policy '
        "gradient</div>"
        '<div><span class="tokens"><span class="t s">&lt;|im_end|&gt;</span></span> special token</div>'
        "<div>Hover a token for its exact value.</div></div>"
    )


def _completion_html(item, position: int, scale: DependencyScale, peak_trajectory: float) -> str:
    ranks = _ranks(item.dependency)
    spans = "".join(
        _token_span(text, special, value, kept, rank, len(item.tokens), scale)
        for text, special, value, kept, rank in zip(
            item.tokens, item.special, item.dependency, item.kept, ranks, strict=True
        )
    )
    width = 100 * item.trajectory_dependency / peak_trajectory if peak_trajectory > 0 else 0
    meta = [
        f'<span class="rank">#{position}</span>',
        f"trajectory dependency <b>{format_value(item.trajectory_dependency)}</b> "
        f'<span class="bar"><i style="width:{width:.1f}%"></i></span>',
    ]
    if item.advantage_scale is not None:
        meta.append(f"TAS scale <b>×{item.advantage_scale:.3f}</b>")
    if item.reward is not None:
        meta.append(f"reward <b>{item.reward:g}</b>")
    if item.advantage is not None:
        meta.append(f"advantage <b>{item.advantage:+.3g}</b>")
    meta.append(f"TGF keeps {sum(item.kept)} of {len(item.kept)} tokens")
    return (
        f'<article class="completion"><div class="meta">{" ".join(f"<span>{m}</span>" for m in meta)}</div>'
        f'<div class="tokens">{spans}</div></article>'
    )


def perception_page(
    perceptions: Sequence,
    images: Sequence[Image.Image],
    perturbed_images: Sequence[Image.Image],
    prompt: str,
    *,
    title: str = "Token perception",
    subtitle: str = "",
) -> str:
    """
    A self-contained HTML page: the images and their perturbed copies, the prompt, and each completion (sorted by
    trajectory dependency) with its tokens shaded by visual dependency, the TGF-kept ones boxed.

    Args:
        perceptions: [`~vppo_trl.tools.spotlight.TokenPerception`]s of completions of the same prompt.
        images: the images as the model sees them (after the processor's resizing).
        perturbed_images: their perturbed copies (the draw that was measured first).
        prompt: the prompt text.
        title, subtitle: heading of the page (e.g. the model and the settings).
    """
    ordered = sorted(perceptions, key=lambda item: -item.trajectory_dependency)
    scale = DependencyScale.for_values([value for item in ordered for value in item.dependency])
    peak_trajectory = max((item.trajectory_dependency for item in ordered), default=0.0)
    figures = []
    for index, (image, perturbed) in enumerate(zip(images, perturbed_images, strict=True)):
        zoom = max(1, IMAGE_DISPLAY_SIZE // max(1, min(image.size)))
        width, height = image.width * zoom, image.height * zoom
        label = f" {index + 1}" if len(images) > 1 else ""
        for picture, caption in (
            (image, f"Image{label} as the model sees it ({image.width}×{image.height} px)"),
            (perturbed, f"Perturbed copy{label}: what the dependency is measured against"),
        ):
            figures.append(
                f'<figure><img src="{image_data_uri(picture)}" width="{width}" height="{height}" alt="{caption}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    completions = "".join(
        _completion_html(item, position, scale, peak_trajectory) for position, item in enumerate(ordered, 1)
    )
    heading = "completion" if len(ordered) == 1 else f"{len(ordered)} completions, sorted by trajectory dependency"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="sub">{html.escape(subtitle)}</p>'
        f'<section class="images">{"".join(figures)}</section>'
        f'<h2>Prompt</h2><div class="prompt">{html.escape(prompt)}</div>'
        f"<h2>The {heading}</h2>{_legend_html(scale)}{completions}"
        "<footer>Visual dependency: how much the model's prediction of a token changes when the image is replaced "
        "by its perturbed copy (VPPO, arXiv 2510.09285). Trajectory dependency: its mean over the completion's "
        "tokens; Trajectory-level Advantage Shaping (TAS) scales each completion's advantage by it. Token-level "
        "Gradient Filtering (TGF) trains only the boxed tokens, the most image-dependent of each completion.</footer>"
        "</body></html>\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# PNG: the same view, drawn with matplotlib
# ----------------------------------------------------------------------------------------------------------------

FIGURE_WIDTH = 760.0  # points
MARGIN = 24.0
TOKEN_FONT = 11.0
CHAR_WIDTH = 0.602 * TOKEN_FONT  # DejaVu Sans Mono advance width
LINE_HEIGHT = 24.0


def _layout_tokens(item, width: float) -> list[tuple[float, float, float, str, bool, float, bool]]:
    """(x, row, box width, text, special, value, kept) of each token, wrapped at `width`."""
    boxes, x, row = [], 0.0, 0
    for text, special, value, kept in zip(item.tokens, item.special, item.dependency, item.kept, strict=True):
        for piece_index, piece in enumerate(text.split("\n")):
            if piece_index:  # a newline inside the token: the next piece starts a new row
                x, row = 0.0, row + 1
            shown = drawable_text(shown_text(piece)) if piece or len(text.split("\n")) == 1 else "↵"
            size = TOKEN_FONT * 0.85 if special else TOKEN_FONT
            box = max(len(shown), 1) * 0.602 * size + 6
            if x + box > width and x > 0:
                x, row = 0.0, row + 1
            boxes.append((x, row, box, shown, special, value, kept))
            x += box + 2
    return boxes


def save_perception_png(
    perceptions: Sequence,
    images: Sequence[Image.Image],
    perturbed_images: Sequence[Image.Image],
    prompt: str,
    path: str,
    *,
    title: str = "Token perception",
    subtitle: str = "",
    dpi: int = 150,
) -> None:
    """The view of [`perception_page`] as a PNG (for papers and issue threads)."""
    import textwrap

    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch, Rectangle

    ordered = sorted(perceptions, key=lambda item: -item.trajectory_dependency)
    scale = DependencyScale.for_values([value for item in ordered for value in item.dependency])
    inner = FIGURE_WIDTH - 2 * MARGIN
    prompt_lines = textwrap.wrap(drawable_text(" ".join(prompt.split())), width=int(inner / (0.602 * 10))) or [""]
    image_size = 150.0
    layouts = [_layout_tokens(item, inner) for item in ordered]
    height = MARGIN + 44 + image_size + 30 + 16 + 14 * len(prompt_lines) + 16 + 52
    height += sum(22 + LINE_HEIGHT * (1 + max((box[1] for box in layout), default=0)) + 8 for layout in layouts)
    height += MARGIN

    # A Figure of its own, not pyplot's: the user's backend and open figures are left as they are.
    figure = Figure(figsize=(FIGURE_WIDTH / 72, height / 72), dpi=dpi)
    canvas = figure.add_axes((0, 0, 1, 1))
    canvas.set_xlim(0, FIGURE_WIDTH)
    canvas.set_ylim(height, 0)
    canvas.axis("off")

    def place_image(picture: Image.Image, left: float, top: float, caption: str) -> None:
        side = image_size
        axes = figure.add_axes(
            (left / FIGURE_WIDTH, 1 - (top + side) / height, side / FIGURE_WIDTH, side / height), anchor="NW"
        )
        axes.imshow(picture, interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
        canvas.text(left, top + side + 12, caption, fontsize=8, color="#444", va="center")

    y = MARGIN
    canvas.text(MARGIN, y + 8, drawable_text(title, "sans-serif"), fontsize=15, fontweight="bold", va="center")
    canvas.text(MARGIN, y + 28, drawable_text(subtitle, "sans-serif"), fontsize=8.5, color="#555", va="center")
    y += 44
    left = MARGIN
    for index, (image, perturbed) in enumerate(zip(images, perturbed_images, strict=True)):
        label = f" {index + 1}" if len(images) > 1 else ""
        place_image(image, left, y, f"image{label} ({image.width}×{image.height} px)")
        place_image(perturbed, left + image_size + 16, y, f"perturbed copy{label}")
        left += 2 * image_size + 40
    y += image_size + 30
    canvas.text(MARGIN, y, "Prompt", fontsize=10, fontweight="bold", va="center")
    y += 16
    for line in prompt_lines:
        canvas.text(MARGIN, y, line, fontsize=10 * 0.85, family="monospace", va="center")
        y += 14
    y += 16

    # Legend: the colour scale and the kept-token box.
    bar_width, bar_left = 240.0, MARGIN
    for step in range(60):
        canvas.add_patch(
            Rectangle(
                (bar_left + bar_width * step / 60, y), bar_width / 60 + 0.5, 10, color=fraction_colour(step / 59)
            )
        )
    canvas.add_patch(Rectangle((bar_left, y), bar_width, 10, fill=False, edgecolor="#888", linewidth=0.6))
    for index, tick in enumerate(scale.ticks()):
        canvas.text(bar_left + bar_width * index / SCALE_DECADES, y + 20, format_value(tick), fontsize=7,
                    ha="center", va="center")  # fmt: skip
    canvas.text(bar_left, y - 9, "visual dependency (log scale)", fontsize=8, va="center")
    legend_x = bar_left + bar_width + 30
    canvas.add_patch(
        FancyBboxPatch((legend_x, y - 4), 34, 18, boxstyle="round,pad=0,rounding_size=2", facecolor="#fff",
                       edgecolor=KEPT_COLOUR, linewidth=2.2)
    )  # fmt: skip
    canvas.text(legend_x + 17, y + 5, "kept", fontsize=9, ha="center", va="center", family="monospace",
                fontweight="bold")  # fmt: skip
    canvas.text(legend_x + 42, y + 5, "kept by TGF (gets policy gradient)", fontsize=8, va="center")
    y += 52

    peak_trajectory = max((item.trajectory_dependency for item in ordered), default=0.0)
    for position, (item, layout) in enumerate(zip(ordered, layouts, strict=True), start=1):
        meta = f"#{position}   trajectory dependency {format_value(item.trajectory_dependency)}"
        if item.advantage_scale is not None:
            meta += f"   TAS scale ×{item.advantage_scale:.3f}"
        if item.reward is not None:
            meta += f"   reward {item.reward:g}"
        if item.advantage is not None:
            meta += f"   advantage {item.advantage:+.3g}"
        meta += f"   TGF keeps {sum(item.kept)} of {len(item.kept)}"
        canvas.text(MARGIN, y + 6, meta, fontsize=8.5, va="center", color="#222")
        if peak_trajectory > 0:
            bar_x = MARGIN + inner - 100
            canvas.add_patch(Rectangle((bar_x, y + 2), 100, 7, color="#eee"))
            canvas.add_patch(Rectangle((bar_x, y + 2), 100 * item.trajectory_dependency / peak_trajectory, 7,
                                       color="#e8590c"))  # fmt: skip
        y += 22
        for x, row, box, text, special, value, kept in layout:
            top = y + row * LINE_HEIGHT
            fraction = scale.fraction(value)
            canvas.add_patch(
                FancyBboxPatch(
                    (MARGIN + x, top), box, LINE_HEIGHT - 6, boxstyle="round,pad=0,rounding_size=2",
                    facecolor=scale.colour(value), edgecolor=KEPT_COLOUR if kept else ("#888" if special else "none"),
                    linewidth=2.2 if kept else 0.7, linestyle="-" if kept or not special else (0, (2, 1.5)),
                )
            )  # fmt: skip
            canvas.text(
                MARGIN + x + box / 2, top + (LINE_HEIGHT - 6) / 2, text,
                fontsize=TOKEN_FONT * (0.85 if special else 1), family="monospace", ha="center", va="center",
                color=text_colour(fraction), fontweight="bold" if kept else "normal",
                fontstyle="italic" if special else "normal",
            )  # fmt: skip
        y += LINE_HEIGHT * (1 + max((box[1] for box in layout), default=0)) + 8
    figure.savefig(path, dpi=dpi, facecolor="#fafafa")


def save_distributions_png(
    token_dependencies: Sequence[float],
    trajectory_dependencies: Sequence[float],
    path: str,
    *,
    title: str = "",
    thresholds: Sequence[float] = SHARE_THRESHOLDS,
) -> dict[float, float]:
    """
    Histogram of token dependency (log scale, with the share of tokens above each threshold) and of trajectory
    dependency, for a set of completions. Returns the shares.
    """
    import numpy as np
    from matplotlib.figure import Figure

    values = np.asarray(token_dependencies, dtype=float)
    shares = shares_above(values.tolist(), thresholds)
    figure = Figure(figsize=(11, 3.8))
    left, right = figure.subplots(1, 2, width_ratios=(3, 2))
    floor = 1e-8

    def log_histogram(axis, data: np.ndarray, colour: str, bins: int) -> None:
        clipped = np.clip(data[data > 0], floor, None)
        top = max(float(clipped.max()) if clipped.size else 1.0, 10.0)
        axis.hist(clipped, bins=np.logspace(math.log10(floor), math.log10(top), bins), color=colour, alpha=0.85)
        axis.set_xscale("log")
        axis.yaxis.get_major_locator().set_params(integer=True)

    log_histogram(left, values, "#e8590c", 50)
    left.set_xlabel(f"token visual dependency (log scale; below {floor:g} drawn at {floor:g})")
    left.set_ylabel("tokens")
    zero = int((values <= 0).sum())
    left.set_title(f"{len(values)} tokens" + (f" ({zero} exactly 0, not drawn)" if zero else ""), fontsize=10)
    for threshold in thresholds:
        left.axvline(threshold, color="#1552c8", linestyle="--", linewidth=1)
    share_text = "share of tokens above\n" + "\n".join(f"{t:g}: {share:.1%}" for t, share in shares.items())
    left.text(0.02, 0.96, share_text, transform=left.transAxes, fontsize=8.5, color="#1552c8", va="top",
              bbox={"facecolor": "white", "edgecolor": "#1552c8", "alpha": 0.9})  # fmt: skip
    log_histogram(right, np.asarray(trajectory_dependencies, dtype=float), "#5b6abf", 30)
    right.set_xlabel("trajectory dependency (mean over a completion's tokens)")
    right.set_ylabel("completions")
    right.set_title(f"{len(trajectory_dependencies)} completions", fontsize=10)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return shares
