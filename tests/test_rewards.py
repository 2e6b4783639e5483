"""Rewards on the answer shapes found in ViRL39K/MMK12 and on the completions a policy actually produces."""

import threading

import pytest

from vppo_trl.rewards import (
    REWARD_FUNCTIONS,
    accuracy_reward,
    extract_boxed_answer,
    format_reward,
    get_reward_functions,
)


def accuracy(prediction: str, gold: str) -> float:
    return accuracy_reward([f"<think>reasoning</think> The answer is \\boxed{{{prediction}}}."], [gold])[0]


class TestExtractBoxedAnswer:
    @pytest.mark.parametrize(
        "text, expected",
        [
            ("so \\boxed{3}", "3"),
            ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
            ("\\boxed{\\sqrt{\\frac{a^{2}}{b}}} done", "\\sqrt{\\frac{a^{2}}{b}}"),
            ("first \\boxed{1}, then \\boxed{2}", "2"),
            ("escaped braces \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
            ("spaced \\boxed { 7 }", "7"),
            ("no answer here", None),
            ("", None),
            ("truncated \\boxed{1} then \\boxed{\\frac{1}{2}", None),
            ("\\boxed 5", None),
        ],
    )
    def test_extraction(self, text, expected):
        assert extract_boxed_answer(text) == expected

    def test_non_string_gives_none(self):
        assert extract_boxed_answer(None) is None


class TestAccuracyReward:
    @pytest.mark.parametrize(
        "prediction, gold",
        [
            ("3", "3"),
            ("-3", "-3"),
            ("0.5", "\\frac{1}{2}"),
            ("\\frac{1}{2}", "0.5"),
            ("\\dfrac{1}{2}", "1/2"),
            ("\\sqrt{12}", "2\\sqrt{3}"),
            ("\\frac{\\pi}{2}", "\\pi/2"),
            ("-0.5", "-\\frac{1}{2}"),
            ("1,000", "1000"),
            ("x=3", "3"),
        ],
    )
    def test_equal_values(self, prediction, gold):
        assert accuracy(prediction, gold) == 1.0

    @pytest.mark.parametrize(
        "prediction, gold",
        [("4", "3"), ("3", "-3"), ("\\frac{1}{3}", "0.5"), ("\\sqrt{3}", "\\sqrt{2}"), ("\\pi", "\\pi/2")],
    )
    def test_different_values(self, prediction, gold):
        assert accuracy(prediction, gold) == 0.0

    @pytest.mark.parametrize(
        "prediction", ["B", "(B)", "B.", "B:", "\\text{B}", "\\text{(B)}", "(\\mathrm{B})", " B "]
    )
    def test_multiple_choice_spellings(self, prediction):
        assert accuracy(prediction, "B") == 1.0

    @pytest.mark.parametrize("prediction", ["C", "(C)", "\\text{b}", "B and C", "2", ""])
    def test_multiple_choice_wrong(self, prediction):
        assert accuracy(prediction, "B") == 0.0

    @pytest.mark.parametrize(
        "prediction, gold",
        [
            ("12", "12 cm"),
            ("12 cm", "12"),
            ("12\\text{ cm}", "12 cm"),
            ("12\\,\\mathrm{cm}^2", "12"),
            ("12 cm^2", "12"),
            ("12", "12 cm^{2}"),
            ("3.5 kg", "3.5"),
            ("45", "45^\\circ"),
            ("45^{\\circ}", "45"),
            ("45°", "45^\\circ"),
            ("\\frac{1}{2}", "0.5 m"),
        ],
    )
    def test_units_and_degrees_are_ignored(self, prediction, gold):
        assert accuracy(prediction, gold) == 1.0

    def test_units_do_not_hide_a_wrong_number(self):
        assert accuracy("13 cm", "12 cm") == 0.0
        assert accuracy("30^\\circ", "45^\\circ") == 0.0

    def test_last_boxed_answer_wins(self):
        completions = ["I first thought \\boxed{4} but it is \\boxed{3}", "\\boxed{3} no wait \\boxed{4}"]
        assert accuracy_reward(completions, ["3", "3"]) == [1.0, 0.0]

    def test_nested_braces(self):
        assert accuracy("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}") == 1.0

    def test_no_boxed_answer_and_empty_completions(self):
        assert accuracy_reward(["The answer is 3.", "", "\\boxed{}", "\\boxed{3"], ["3"] * 4) == [0.0] * 4

    def test_conversational_completions(self):
        completions = [
            [{"role": "assistant", "content": "<think>...</think> \\boxed{\\frac{1}{2}}"}],
            [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{0.5}"}]}],
            [{"role": "assistant", "content": "\\boxed{7}"}],
        ]
        assert accuracy_reward(completions, ["0.5", "\\frac{1}{2}", "8"]) == [1.0, 1.0, 0.0]

    def test_garbage_never_raises(self):
        completions = [
            "\\boxed{\\frac{}{}}",
            "\\boxed{}}}{{{\\\\",
            "\\boxed{9^{9^{9^{9}}}}",
            "\\boxed{\\begin{matrix} 1 & \\end{pmatrix}}",
            "\\boxed{\x00\x01}",
            None,
            42,
            [{"role": "assistant"}],
            [],
        ]
        rewards = accuracy_reward(completions, ["3", "{", "", None, "\\boxed{3}", "3", "3", "3", "3"])
        assert rewards == [0.0] * len(completions)

    def test_boxed_gold_answer_is_unwrapped(self):
        assert accuracy("3", "\\boxed{3}") == 1.0

    def test_numeric_gold_answer(self):
        assert accuracy_reward(["\\boxed{2.5}"], [2.5]) == [1.0]

    def test_works_outside_the_main_thread(self):
        # math-verify's default signal-based timeouts raise outside the main thread.
        results = []
        thread = threading.Thread(target=lambda: results.append(accuracy_reward(["\\boxed{0.5}"], ["\\frac{1}{2}"])))
        thread.start()
        thread.join()
        assert results == [[1.0]]

    def test_ignores_other_dataset_columns(self):
        assert accuracy_reward(["\\boxed{1}"], answer=["1"], prompts=["p"], images=[[]], trainer_state=None) == [1.0]


class TestFormatReward:
    @pytest.mark.parametrize(
        "completion",
        [
            "<think>Count the sides.</think> The answer is \\boxed{6}.",
            "\n<think>\nmulti\nline\n</think>\n\\boxed{\\frac{1}{2}}",
            [{"role": "assistant", "content": "<think>x</think>\\boxed{B}"}],
        ],
    )
    def test_well_formed(self, completion):
        assert format_reward([completion]) == [1.0]

    @pytest.mark.parametrize(
        "completion",
        [
            "The answer is \\boxed{6}.",  # no think block
            "<think>reasoning</think> The answer is 6.",  # no boxed answer
            "<think>reasoning \\boxed{6}</think> so 6",  # boxed only inside the thinking
            "<think>a</think><think>b</think>\\boxed{6}",  # two think blocks
            "<think>a</think> \\boxed{6} </think>",  # stray closing tag
            "Let me see. <think>a</think>\\boxed{6}",  # text before the think block
            "</think> <think>a \\boxed{6}",  # tags in the wrong order
            "<think>a</think> \\boxed{ }",  # blank answer
            "<think>a</think> \\boxed{6",  # unclosed box
            "",
        ],
    )
    def test_malformed(self, completion):
        assert format_reward([completion]) == [0.0]


class TestRegistry:
    def test_names_resolve_in_order(self):
        assert get_reward_functions(["format", "accuracy"]) == [format_reward, accuracy_reward]
        assert get_reward_functions("accuracy") == [accuracy_reward]  # a single name, not its characters
        assert set(REWARD_FUNCTIONS) == {"accuracy", "format"}

    def test_trl_log_names(self):
        # GRPOTrainer logs rewards/<__name__>/mean.
        assert [func.__name__ for func in get_reward_functions(["accuracy", "format"])] == [
            "accuracy_reward",
            "format_reward",
        ]

    def test_unknown_name(self):
        with pytest.raises(ValueError, match=r"'accurcy'.*available: \['accuracy', 'format'\]"):
            get_reward_functions(["accuracy", "accurcy"])
