"""The option checks every public call shares (``corral._checks``)."""

from __future__ import annotations

import pytest

from corral._checks import check_count, check_seconds


@pytest.mark.parametrize("value", [1, 2, 10**9])
def test_a_positive_int_is_a_count(value: int) -> None:
    """Positive ints pass the default rule."""
    check_count("n", value)


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, "1", None])
def test_anything_else_is_refused_by_name(value: object) -> None:
    """Zero, negatives, bools, floats, strings and None fail, naming the option and value."""
    with pytest.raises(ValueError, match=rf"^n must be a positive int, not {value!r}$"):
        check_count("n", value)


def test_a_minimum_and_none_are_said_in_the_message() -> None:
    """The minimum and whether None is allowed shape the words; None passes when optional."""
    check_count("retries", 0, minimum=0)
    check_count("size", None, optional=True)
    with pytest.raises(ValueError, match=r"retries must be an int of 0 or more, not True"):
        check_count("retries", True, minimum=0)
    with pytest.raises(ValueError, match=r"window must be an int of at least 2, not 1"):
        check_count("window", 1, minimum=2)
    with pytest.raises(ValueError, match=r"size must be a positive int or None, not 0"):
        check_count("size", 0, optional=True)


@pytest.mark.parametrize("value", [None, 0.001, 1, 30.5])
def test_none_or_positive_seconds_pass(value: float | None) -> None:
    """A time limit is None or a positive int or float."""
    check_seconds("time_limit", value)


@pytest.mark.parametrize("value", [0, -1.5, True, "1", float("nan")])
def test_other_times_are_refused(value: object) -> None:
    """Zero, negatives, bools, strings and NaN are no number of seconds."""
    with pytest.raises(ValueError, match="time_limit must be a positive number of seconds"):
        check_seconds("time_limit", value)
