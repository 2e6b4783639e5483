"""The CPU demo runs end to end and writes its table, log, summary and plot.

Learning itself is shown by the full demo (`python -m vppo_trl.demo`, a few minutes); here a few steps check the
pipeline only, with no timing or learning assertions.
"""

import csv
import json

import torch
from PIL import Image

from vppo_trl import demo
from vppo_trl.testing import COLOURS, build_tiny_vlm, suppressed_token_ids


def test_quick_demo_writes_table_log_summary_and_plot(tmp_path, capsys):
    summary = demo.main(["--quick", "--output-dir", str(tmp_path)])

    printed = capsys.readouterr().out
    assert "step  reward" in printed
    assert "Verdict: quick run" in printed
    assert str(tmp_path / "vppo_demo.png") in printed

    with (tmp_path / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(row["step"])) for row in rows] == [1, 2, 3]
    for key in ("reward", "vppo/advantage_scale_max", "vppo/skipped_fraction"):
        assert key in rows[0]

    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["steps"] == 3
    assert 0.0 <= summary["start_reward"] <= 1.0 and 0.0 <= summary["end_reward"] <= 1.0

    with Image.open(tmp_path / "vppo_demo.png") as image:
        assert image.format == "PNG"
        image.verify()


def test_masked_tokens_get_zero_probability_and_stay_frozen():
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    masked = suppressed_token_ids(processor)
    demo.mask_tokens(model, masked)

    bias = model.get_output_embeddings().bias
    assert not bias.requires_grad
    assert bias[masked].eq(demo.MASKED_LOGIT_BIAS).all()
    input_ids = processor.tokenizer("What colour is the shape?", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = model(input_ids=input_ids).logits.softmax(-1)
    assert probs[..., masked].max() == 0.0
    assert torch.isfinite(probs).all()
