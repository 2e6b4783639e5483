"""Every `vppo-trl` command built from a dataclass ends a mistake with one line naming it, and the closest flag."""

import pytest

from vppo_trl import cli


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--setps", "3"], "vppo-trl demo: error: unknown argument '--setps' (did you mean '--steps'?)"),
        (["demo", "--steps", "0"], "vppo-trl demo: error: --steps must be >= 1, got 0"),
        (
            ["tiny", "--ouput-dir", "x"],
            "vppo-trl tiny: error: unknown argument '--ouput-dir' (did you mean '--output-dir'?)",
        ),
        (
            ["spotlight", "--model", "m", "--image", "a.png", "--prompt", "p", "--num-complteions", "2"],
            "vppo-trl spotlight: error: unknown argument '--num-complteions' (did you mean '--num-completions'?)",
        ),
        (
            ["eval", "--model", "m", "--output-dir", "o", "--benchmakrs", "geo3k"],
            "vppo-trl eval: error: unknown argument '--benchmakrs' (did you mean '--benchmarks'?)",
        ),
        (
            ["train", "--model_name_or_path", "m", "--max_setps", "2"],
            "vppo-trl train: error: unknown argument '--max_setps' (did you mean '--max_steps'?)",
        ),
    ],
)
def test_a_mistyped_flag_is_one_line_with_the_closest_flag(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and certainly not into the checkout
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message + "\n"
    assert list(tmp_path.iterdir()) == []
