"""Rule-based rewards for VPPO: binary accuracy of the final `\\boxed{}` answer, plus an optional format check.

All functions follow TRL's reward-function signature (`completions` plus dataset columns as keyword arguments) and
return one float per completion. TRL logs each one as `rewards/<function name>/mean`.
"""

import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from math_verify import parse, verify

# Seconds math-verify may spend parsing or comparing one answer. Its timeout relies on `signal.alarm`, which only
# works in the main thread, so it is turned off elsewhere (same policy as `trl.rewards.accuracy_reward`).
MATH_VERIFY_TIMEOUT_SECONDS = 5

_BOXED_PREFIX = re.compile(r"\\boxed\s*\{")

# Multiple-choice spellings: "B", "(B)", "B.", "B:", "\text{B}", "(\text{B})", "\mathbf{B}"...
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_CHOICE_LETTER = re.compile(r"^\(?([A-Z])\)?[.:]?$")

# A trailing degree sign, or a metric unit (optionally in \text{}/\mathrm{}, optionally squared or cubed) right after
# a number. math-verify drops most units itself but misses e.g. "12 cm^2", so both sides are stripped before parsing.
_TRAILING_UNIT = re.compile(
    r"(?:"
    r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree)"
    r"|(?<=\d)(?:\s|\\[,;:! ]|~)*(?:\\(?:text|mathrm|mbox)\s*\{\s*)?"
    r"(?:mm|cm|dm|km|m|mg|kg|g|mL|ml|L|min|s|h)\s*\}?(?:\s*\^\s*\{?\s*[23]\s*\}?|[²³])?"
    r")\s*$"
)

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"

logger = logging.getLogger(__name__)


def extract_boxed_answer(text: str) -> str | None:
    r"""
    Return the content of the last `\boxed{...}` in `text`, or `None` if there is none.

    Braces are matched so nested LaTeX (`\boxed{\frac{1}{2}}`) is kept whole; escaped braces (`\{`, `\}`) do not count.
    If the last `\boxed{` is never closed (e.g. a truncated completion), the result is `None` rather than an earlier
    answer the model may have moved away from.
    """
    if not isinstance(text, str):
        return None
    starts = [match.end() for match in _BOXED_PREFIX.finditer(text)]
    if not starts:
        return None
    depth, position = 1, starts[-1]
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2  # skip the escaped character, e.g. "\{" or "\\"
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[starts[-1] : position].strip()
        position += 1
    return None


def _completion_text(completion: Any) -> str:
    """Text of a completion given as a string or as TRL conversational messages (the last message holds the answer)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # structured content blocks
            return "".join(block.get("text") or "" for block in content if isinstance(block, dict))
    return ""


def _choice_letter(answer: str) -> str | None:
    """The option letter if `answer` is a multiple-choice answer such as "B", "(B)", "B." or "\\text{B}"."""
    unwrapped = _TEXT_WRAPPER.sub(r"\1", answer)
    match = _CHOICE_LETTER.match(re.sub(r"\s+", "", unwrapped))
    return match.group(1) if match else None


def _strip_trailing_unit(answer: str) -> str:
    """Drop a trailing degree sign or metric unit; keep the answer unchanged if nothing would be left."""
    stripped = _TRAILING_UNIT.sub("", answer).strip()
    return stripped or answer.strip()


def _is_equivalent(predicted: str, gold: str) -> bool:
    """Whether a boxed prediction matches the gold answer (letter comparison for multiple choice, else math-verify)."""
    if not predicted or not gold:
        return False
    gold_letter = _choice_letter(gold)
    if gold_letter is not None:
        return _choice_letter(predicted) == gold_letter
    predicted, gold = _strip_trailing_unit(predicted), _strip_trailing_unit(gold)
    if predicted == gold:
        return True
    in_main_thread = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_SECONDS if in_main_thread else None
    # "$...$" lets math-verify read bare answers ("3", "\frac{1}{2}", "0.5", "45°") as LaTeX.
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    predicted_parsed = parse(f"${predicted}$", parsing_timeout=timeout)
    if not gold_parsed or not predicted_parsed:
        return False
    return verify(gold_parsed, predicted_parsed, timeout_seconds=timeout)


def accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    r"""
    1.0 when the last `\boxed{}` of a completion equals the ground-truth `answer`, else 0.0 (VPPO's only reward).

    Equality is mathematical, judged by math-verify (`0.5` = `\frac{1}{2}`, `2\sqrt{3}` = `\sqrt{12}`). If the gold
    answer is a single option letter, the prediction must name the same letter ("B", "(B)", "B.", `\text{B}`). A
    trailing degree sign or metric unit (mm, cm, dm, km, m, mg, g, kg, mL, L, s, min, h, optionally squared/cubed)
    is removed from both sides first, so "12 cm" = "12" and `45^\circ` = "45". A completion without a boxed answer,
    or any input math-verify cannot handle (including a timeout), scores 0.0: this function never raises.

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions as plain strings or as conversational messages (`[{"role": "assistant", "content": ...}]`).
        answer (`list[str]`):
            Ground-truth answers, the dataset's `answer` column.
        **kwargs:
            Other dataset columns and trainer arguments, ignored.
    """
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        predicted = extract_boxed_answer(_completion_text(completion))
        try:
            gold_text = str(gold)
            gold_text = extract_boxed_answer(gold_text) or gold_text
            correct = predicted is not None and _is_equivalent(predicted, gold_text.strip())
        except Exception:  # a reward must not stop training; math-verify/sympy can fail on arbitrary text
            logger.debug("accuracy_reward failed on %r vs %r", predicted, gold, exc_info=True)
            correct = False
        rewards.append(1.0 if correct else 0.0)
    return rewards


def format_reward(completions: list, **kwargs) -> list[float]:
    r"""
    1.0 when a completion follows the prompt's format `<think> reasoning </think> ... \boxed{answer}`, else 0.0.

    Precisely: apart from leading whitespace the completion starts with `<think>`, contains exactly one `<think>` and
    exactly one `</think>`, and the text after `</think>` contains a complete `\boxed{...}` whose content is not blank.

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions as plain strings or as conversational messages (`[{"role": "assistant", "content": ...}]`).
        **kwargs:
            Dataset columns and trainer arguments, ignored.
    """
    rewards = []
    for completion in completions:
        text = _completion_text(completion).lstrip()
        well_formed = text.startswith(_THINK_OPEN) and text.count(_THINK_OPEN) == 1 and text.count(_THINK_CLOSE) == 1
        if well_formed:
            boxed = extract_boxed_answer(text.split(_THINK_CLOSE, 1)[1])
            well_formed = bool(boxed)
        rewards.append(1.0 if well_formed else 0.0)
    return rewards


REWARD_FUNCTIONS: dict[str, Callable[..., list[float]]] = {"accuracy": accuracy_reward, "format": format_reward}


def get_reward_functions(names: Sequence[str]) -> list[Callable[..., list[float]]]:
    """Resolve reward names (e.g. from a config or the command line) to functions, failing early on a typo."""
    if isinstance(names, str):
        names = [names]
    unknown = [name for name in names if name not in REWARD_FUNCTIONS]
    if unknown:
        raise ValueError(f"Unknown reward function(s) {unknown}; available: {sorted(REWARD_FUNCTIONS)}.")
    return [REWARD_FUNCTIONS[name] for name in names]
