"""The session caches of tests/conftest.py give what the builders they stand for give."""

import torch

import vppo_trl.testing as testing
from vppo_trl.testing import COLOURS, build_tokenizer


def test_tiny_vlm_gives_a_fresh_builds_model_processor_and_random_state(tiny_vlm, tmp_path):
    first_model, first_processor = tiny_vlm("qwen3_vl", extra_words=COLOURS, seed=2)
    with torch.no_grad():
        next(first_model.parameters()).add_(1.0)  # a test may change its copy
    first_processor.tokenizer.padding_side = "left"
    model, processor = tiny_vlm("qwen3_vl", extra_words=COLOURS, seed=2)
    after_cached = torch.get_rng_state()
    fresh_model, fresh_processor = testing.build_tiny_vlm("qwen3_vl", extra_words=COLOURS, seed=2)
    assert torch.equal(after_cached, torch.get_rng_state())  # build_model seeds torch: the cache leaves the same state
    assert type(model) is type(fresh_model) and model.config.to_dict() == fresh_model.config.to_dict()
    fresh = fresh_model.state_dict()
    assert all(torch.equal(value, fresh[name]) for name, value in model.state_dict().items())
    assert not model.training and processor.tokenizer.padding_side == fresh_processor.tokenizer.padding_side
    processor.save_pretrained(tmp_path / "cached")
    fresh_processor.save_pretrained(tmp_path / "fresh")
    for path in sorted((tmp_path / "fresh").iterdir()):
        assert (tmp_path / "cached" / path.name).read_bytes() == path.read_bytes(), path.name


def test_build_tiny_vlm_trains_its_tokenizer_once_and_hands_out_copies(tmp_path):
    real = build_tokenizer(COLOURS)  # imported by name: the real function, not the session's cache
    cached = testing.build_tokenizer(COLOURS)
    again = testing.build_tokenizer(COLOURS)
    assert cached is not again and testing.build_tokenizer is not build_tokenizer
    assert real.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    real.save_pretrained(tmp_path / "real")
    cached.save_pretrained(tmp_path / "cached")
    for path in sorted((tmp_path / "real").iterdir()):
        assert (tmp_path / "cached" / path.name).read_bytes() == path.read_bytes(), path.name
