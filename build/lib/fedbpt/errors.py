"""Every exception type of the package, so callers catch them from one place.

``ConfigError`` is the user-facing one: its message is one line that names the fix (the command line prints it as
``error: ...`` and exits 2). The others are raised inside a run and end up, as one line, in its summary.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration or input problem, caught before any process starts; the message names the fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot continue this run; the message names the file and the fix."""


class PayloadError(ValueError):
    """A client payload that must not reach aggregation."""


class TooFewClients(RuntimeError):
    """Fewer usable updates than min_clients: the run stops (the summary says why)."""


class InjectedFault(RuntimeError):
    """Raised by the fault-injecting executor's 'raise' mode (research.fault)."""
