"""Shared tools of the bad-input tests: strategies of bad values and the check that an error is
clear (it names the argument, the bad value and what is allowed).

A test of a new public function's arguments reads::

    @settings(max_examples=30, deadline=None)
    @given(value=bad_positive())
    def test_fn_rejects_a_bad_scale(value):
        with clear_error("scale", value):
            bn.module.fn(params, scale=value)
"""

from __future__ import annotations

import contextlib
import math
import re

import numpy as np
import pytest
from hypothesis import strategies as st

ALLOWED = re.compile(r"allowed|must be|must have|expected|at least|at most|one of", re.I)


def shown(value) -> list[str]:
    """The ways a message may show ``value``."""
    forms = {repr(value), str(value)}
    if isinstance(value, float):
        if math.isnan(value):
            forms |= {"nan", "NaN"}
        elif math.isinf(value):
            forms |= {"inf", "-inf", "Infinity"}
        else:
            with np.errstate(over="ignore"):
                forms |= {f"{value:g}", repr(float(np.float32(value)))}
    if isinstance(value, np.ndarray):
        forms |= {f"shape {value.shape}", str(value.shape)}
    return [f for f in forms if f]


@contextlib.contextmanager
def clear_error(argument: str, value, kinds=(ValueError, TypeError)):
    """Expects an exception of ``kinds`` whose message names ``argument``, shows ``value`` and
    says what is allowed."""
    with pytest.raises(kinds) as info:
        yield info
    message = str(info.value)
    assert argument in message, f"{argument!r} not named in: {message}"
    assert any(form in message for form in shown(value)), f"{value!r} not shown in: {message}"
    assert ALLOWED.search(message), f"nothing said of what is allowed in: {message}"


def not_finite() -> st.SearchStrategy:
    return st.sampled_from([math.nan, math.inf, -math.inf])


def not_a_number() -> st.SearchStrategy:
    return st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.just([1.0, 2.0]))


def bad_positive() -> st.SearchStrategy:
    """Values a finite number > 0 must not take."""
    return st.one_of(
        not_finite(),
        st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
        st.integers(max_value=0),
    )


def bad_probability() -> st.SearchStrategy:
    """Values a probability in (0, 1] must not take."""
    return st.one_of(
        not_finite(),
        st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
        st.floats(min_value=1.0, exclude_min=True, allow_nan=False, allow_infinity=False),
    )


def bad_count(minimum: int = 1) -> st.SearchStrategy:
    """Values an int >= ``minimum`` must not take."""
    return st.one_of(
        st.integers(max_value=minimum - 1),
        st.floats(allow_nan=True, allow_infinity=True).filter(
            lambda v: v != int(v) if math.isfinite(v) else True
        ),
        st.booleans(),
    )


def bad_key() -> st.SearchStrategy:
    """Things that are not a PRNG key."""
    return st.one_of(st.none(), st.integers(0, 2**31), st.just(np.zeros(3, np.float32)))
