"""Rule-based rewards for VPPO: binary accuracy of the final `\\boxed{}` answer, plus an optional format check.

All functions follow TRL's reward-function signature (`completions` plus dataset columns as keyword arguments) and
return one float per completion. TRL logs each one as `rewards/<function name>/mean`. They never raise on a malformed
completion: it scores 0, and the share of such completions is logged through TRL's `log_metric` (see
[`accuracy_reward`] and [`format_reward`]).
"""

import importlib
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import sympy
from math_verify import parse, verify
from math_verify.errors import TimeoutException

# Seconds math-verify may spend parsing or comparing one answer. Its timeout relies on `signal.alarm`, which only
# works in the main thread, so it is turned off elsewhere (same policy as `trl.rewards.accuracy_reward`).
MATH_VERIFY_TIMEOUT_SECONDS = 5

# Answers whose exact value may have more decimal digits than this are not compared: sympy evaluates integer powers
# and factorials exactly, which takes hours (or memory without end) for e.g. `9^{9^{9^{9}}}`, and math-verify's
# timeout cannot stop it outside the main thread. `10^{100000}` (100,001 digits) is compared in about 0.1 s.
MAX_ANSWER_DIGITS = 100_000

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


def _completion_text(completion: Any) -> str | None:
    """
    Text of a completion given as a string or as TRL conversational messages (the last message holds the answer);
    `None` when it holds no text (`None`, a number, no messages, a message without content...).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # structured content blocks
            texts = [block.get("text") for block in content if isinstance(block, dict)]
            texts = [text for text in texts if isinstance(text, str)]
            return "".join(texts) if texts else None
    return None


def _log_shares(
    log_metric: Callable[[str, float], None] | None, function: str, counts: dict[str, int], n: int
) -> None:
    """Log each count as a share of the `n` completions, as `rewards/<function>/<name>` (TRL's `log_metric`)."""
    if log_metric is not None and n:
        for name, count in counts.items():
            log_metric(f"rewards/{function}/{name}", count / n)


def _choice_letter(answer: str) -> str | None:
    """The option letter if `answer` is a multiple-choice answer such as "B", "(B)", "B." or "\\text{B}"."""
    unwrapped = _TEXT_WRAPPER.sub(r"\1", answer)
    match = _CHOICE_LETTER.match(re.sub(r"\s+", "", unwrapped))
    return match.group(1) if match else None


def _strip_trailing_unit(answer: str) -> str:
    """Drop a trailing degree sign or metric unit; keep the answer unchanged if nothing would be left."""
    stripped = _TRAILING_UNIT.sub("", answer).strip()
    return stripped or answer.strip()


def _power_of_ten(exponent: float) -> float:
    return 10.0**exponent if exponent < 300 else math.inf


def _log10_size(expression: sympy.Basic) -> float:
    """Rough upper bound on the decimal digits of the numbers that evaluating `expression` exactly creates."""
    if expression.is_Number:
        if not expression.is_finite:  # oo, zoo, nan: nothing to evaluate
            return 0.0
        if expression.is_Float:
            magnitude = abs(float(expression))
            return math.log10(magnitude) if 0 < magnitude < math.inf else (0.0 if magnitude == 0 else math.inf)
        return max(math.log10(abs(int(part)) or 1) for part in expression.as_numer_denom())
    sizes = [_log10_size(argument) for argument in expression.args if isinstance(argument, sympy.Basic)]
    largest = max(sizes, default=0.0)
    if isinstance(expression, sympy.Pow):  # base^exponent: exponent x digits of the base
        return max(largest, _power_of_ten(sizes[1]) * max(sizes[0], 1.0))
    if isinstance(expression, sympy.factorial):  # n! has about n log10(n) digits
        return max(largest, _power_of_ten(sizes[0]) * max(sizes[0], 1.0))
    if isinstance(expression, sympy.Mul):
        return sum(sizes)
    return largest


def _gradable(parsed: list) -> bool:
    """Whether math-verify read an expression (not just the raw string) of a size it can compare."""
    expressions = [item for item in parsed if isinstance(item, (sympy.Basic, sympy.MatrixBase))]
    return bool(expressions) and all(
        not isinstance(item, sympy.Basic) or _log10_size(item) <= MAX_ANSWER_DIGITS for item in expressions
    )


def _grade(predicted: str, gold: str) -> bool | None:
    """
    Whether a boxed prediction matches the gold answer (letter comparison for multiple choice, else math-verify);
    `None` when math-verify cannot grade them (unparseable, an error, a timeout, or a number too large to compare).
    """
    gold_letter = _choice_letter(gold)
    if gold_letter is not None:
        return _choice_letter(predicted) == gold_letter
    predicted, gold = _strip_trailing_unit(predicted), _strip_trailing_unit(gold)
    if predicted == gold:
        return True
    in_main_thread = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_SECONDS if in_main_thread else None
    try:
        # "$...$" lets math-verify read bare answers ("3", "\frac{1}{2}", "0.5", "45°") as LaTeX.
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout, raise_on_error=True)
        predicted_parsed = parse(f"${predicted}$", parsing_timeout=timeout, raise_on_error=True)
        if not (_gradable(gold_parsed) and _gradable(predicted_parsed)):
            return None
        return verify(gold_parsed, predicted_parsed, timeout_seconds=timeout, raise_on_error=True)
    except (Exception, TimeoutException):  # math-verify/sympy fail on arbitrary text; a timeout is a BaseException
        logger.debug("math-verify cannot grade %r against %r", predicted, gold, exc_info=True)
        return None


def accuracy_reward(
    completions: list, answer: list[str], log_metric: Callable[[str, float], None] | None = None, **kwargs
) -> list[float]:
    r"""
    1.0 when the last `\boxed{}` of a completion equals the ground-truth `answer`, else 0.0 (VPPO's only reward).

    Equality is mathematical, judged by math-verify (`0.5` = `\frac{1}{2}`, `2\sqrt{3}` = `\sqrt{12}`). If the gold
    answer is a single option letter, the prediction must name the same letter ("B", "(B)", "B.", `\text{B}`). A
    trailing degree sign or metric unit (mm, cm, dm, km, m, mg, g, kg, mL, L, s, min, h, optionally squared/cubed)
    is removed from both sides first, so "12 cm" = "12" and `45^\circ` = "45".

    It never raises: a completion without text or without a boxed answer, or one that math-verify cannot grade
    (unparseable LaTeX, an error, a timeout, a number of more than `MAX_ANSWER_DIGITS` digits), scores 0.0. With
    TRL's `log_metric`, the shares of such completions are logged as `rewards/accuracy_reward/not_text`,
    `.../no_boxed_answer` and `.../unparseable`.

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions as plain strings or as conversational messages (`[{"role": "assistant", "content": ...}]`).
        answer (`list[str]`):
            Ground-truth answers, the dataset's `answer` column.
        log_metric (`Callable[[str, float], None]`, *optional*):
            Passed by TRL's GRPOTrainer: logs a scalar next to the training metrics.
        **kwargs:
            Other dataset columns and trainer arguments, ignored.
    """
    rewards = []
    counts = {"not_text": 0, "no_boxed_answer": 0, "unparseable": 0}
    for completion, gold in zip(completions, answer, strict=True):
        text = _completion_text(completion)
        predicted = extract_boxed_answer(text) if text is not None else None
        correct = False
        if text is None:
            counts["not_text"] += 1
        elif not predicted:
            counts["no_boxed_answer"] += 1
        else:
            gold_text = str(gold) if gold is not None else ""
            gold_text = (extract_boxed_answer(gold_text) or gold_text).strip()
            graded = _grade(predicted, gold_text) if gold_text else None
            counts["unparseable"] += graded is None
            correct = bool(graded)
        rewards.append(1.0 if correct else 0.0)
    _log_shares(log_metric, "accuracy_reward", counts, len(rewards))
    return rewards


def format_reward(completions: list, log_metric: Callable[[str, float], None] | None = None, **kwargs) -> list[float]:
    r"""
    1.0 when a completion follows the prompt's format `<think> reasoning </think> ... \boxed{answer}`, else 0.0.

    Precisely: apart from leading whitespace the completion starts with `<think>`, contains exactly one `<think>` and
    exactly one `</think>`, and the text after `</think>` contains a complete `\boxed{...}` whose content is not blank.
    A completion without text (`None`, a number...) scores 0.0; with TRL's `log_metric`, their share is logged as
    `rewards/format_reward/not_text`.

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions as plain strings or as conversational messages (`[{"role": "assistant", "content": ...}]`).
        log_metric (`Callable[[str, float], None]`, *optional*):
            Passed by TRL's GRPOTrainer: logs a scalar next to the training metrics.
        **kwargs:
            Dataset columns and trainer arguments, ignored.
    """
    rewards = []
    not_text = 0
    for completion in completions:
        text = _completion_text(completion)
        if text is None:
            not_text += 1
            text = ""
        text = text.lstrip()
        well_formed = text.startswith(_THINK_OPEN) and text.count(_THINK_OPEN) == 1 and text.count(_THINK_CLOSE) == 1
        if well_formed:
            boxed = extract_boxed_answer(text.split(_THINK_CLOSE, 1)[1])
            well_formed = bool(boxed)
        rewards.append(1.0 if well_formed else 0.0)
    _log_shares(log_metric, "format_reward", {"not_text": not_text}, len(rewards))
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


def resolve_reward_functions(names: list[str]) -> list[Callable[..., list[float]]]:
    """Reward functions from registry names or dotted import paths (resolved from the current folder, as in TRL)."""
    functions = []
    for name in names:
        if "." not in name:
            functions.extend(get_reward_functions([name]))
            continue
        module_name, _, attribute = name.rpartition(".")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            functions.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Cannot load reward function {name!r}: {error}") from error
    return functions
