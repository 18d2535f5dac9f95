"""The checks of callers' options: one rule per kind of value, worded once.

A count is an ``int`` and never a ``bool`` (``retries=True`` is a slip, not one retry); a
time is a positive number of seconds. Every public call checks its options with these
before it does anything, so a bad value is refused at the call that made it, in the same
words wherever it is given.
"""

from __future__ import annotations


def check_count(name: str, value: object, *, minimum: int = 1, optional: bool = False) -> None:
    """``ValueError`` unless value is an int of at least minimum (or None, if optional)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {0: "an int of 0 or more", 1: "a positive int"}.get(
            minimum, f"an int of at least {minimum}"
        )
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, not {value!r}")


def check_seconds(name: str, value: object) -> None:
    """``ValueError`` unless value is None or a positive number of seconds."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
    ):
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
