"""Command lines built from dataclasses (`HfArgumentParser`) whose mistakes end in one line naming the problem."""

import difflib
from typing import Any, NoReturn

from transformers import HfArgumentParser


def did_you_mean(name: str, valid_names) -> str:
    """` (did you mean 'x'?)` for the closest of `valid_names`, or nothing when none is close."""
    matches = difflib.get_close_matches(name, list(valid_names), n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


class CommandLineParser(HfArgumentParser):
    """
    HfArgumentParser whose errors are one line on stderr with exit status 2: an unknown flag names the closest valid
    one, and a dataclass's own check (`__post_init__`'s `ValueError`) is reported like a bad flag, not as a traceback.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")  # argparse would print the whole usage first

    def parse_known_args(self, args=None, namespace=None):
        namespace, unknown = super().parse_known_args(args, namespace)
        if unknown:  # HfArgumentParser would raise a ValueError listing them, without a suggestion
            name = unknown[0].split("=", 1)[0]
            flags = [option for action in self._actions for option in action.option_strings]
            hint = did_you_mean(name, flags) if name.startswith("-") else ""
            self.error(f"unknown argument {name!r}{hint}")
        return namespace, unknown

    def parse_dataclasses(self, argv: list[str] | None = None) -> tuple[Any, ...]:
        """`parse_args_into_dataclasses`, with the dataclasses' own checks reported as one-line errors."""
        try:
            return self.parse_args_into_dataclasses(argv)
        except ValueError as error:
            self.error(str(error))
