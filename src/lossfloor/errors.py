"""The exceptions a user sees: a bad input, reported as one line and exit code 2."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem with the user's input. The message says what is wrong and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, after the library has put its work in a resumable state; the message
    says what was kept."""


class ParameterError(UserError):
    """A bad value of a named parameter of the Python API: ``"<param> = <value>: <reason>"``.

    The library speaks of its own parameters; the CLI reports the error under the option that
    set the parameter (``ParameterError.for_option``). ``{option}`` in ``reason`` names the
    parameter (the option, in the CLI's message), e.g. "set {option} to discard it".
    """

    def __init__(self, param: str, value: Any, reason: str) -> None:
        self.param, self.value, self.reason = param, value, reason
        super().__init__(f"{param} = {value!r}: {reason.replace('{option}', param)}")

    def for_option(self, option: str) -> str:
        """The message as the CLI shows it: ``"<option> <value>: <reason>"`` (without the value
        for a flag or an option that was not given: value True or None)."""
        value = "" if self.value is None or self.value is True else f" {self.value}"
        reason = self.reason.replace("{option}", option)
        return " ".join(f"{option}{value}: {reason}".split())
