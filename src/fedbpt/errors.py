"""Every exception type of the package, so callers catch them from one place.

``ConfigError`` is the user-facing one: one line that names the fix, caught before any process starts. It knows the
option it concerns (``option``), and its message refers to options by name (written with :func:`opt`), so each
front end names them its own way: ``str(exc)`` says ``num_rounds`` as a Python caller writes it, the command line
``exc.render(flag)`` says ``--num_rounds``. The others are raised inside a run and end up, as one line, in its
summary.
"""

from __future__ import annotations

from collections.abc import Callable

_MARK = "\x1f"  # ASCII unit separator: never typed by a user, so the option references stay apart from the text


def opt(name: str) -> str:
    """A reference to option ``name`` inside a ConfigError message (rendered by the front end)."""
    return f"{_MARK}{name}{_MARK}"


class ConfigError(ValueError):
    """A configuration or input problem, caught before any process starts; the message names the fix.

    ``option``: the option it concerns, if one does (e.g. ``"k_shot"``).
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        self.message, self.option = message, option
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = str) -> str:
        """The message with every option reference written as ``name(option)``."""
        parts = self.message.split(_MARK)
        if len(parts) % 2 == 0:  # an unpaired mark: not a reference
            return self.message.replace(_MARK, "")
        return "".join(name(p) if i % 2 else p for i, p in enumerate(parts))

    def within(self, prefix: str) -> ConfigError:
        """The same error (type, option) with ``prefix`` before its message."""
        return type(self)(prefix + self.message, self.option)


class CheckpointError(ConfigError):
    """A checkpoint that cannot continue this run; the message names the file and the fix."""


class PayloadError(ValueError):
    """A client payload that must not reach aggregation."""


class TooFewClients(RuntimeError):
    """Fewer usable updates than min_clients: the run stops (the summary says why)."""


class InjectedFault(RuntimeError):
    """Raised by the fault-injecting executor's 'raise' mode (research.fault)."""
