"""A fixed sample of a hypothesis strategy, the same on every run.

Guard tests ("the generator reaches the cases it claims") must not depend on luck:
`strategy.example()` draws from an unseeded source, so a rare case can be missing from one CI
run and present in the next. `fixed_sample` draws through `@given` with `derandomize=True`,
so the sample is a function of the strategy alone.

Hypothesis (6.131 and later) also mixes in constants it finds in the project's modules loaded
so far (`providers._get_local_constants`): the same derandomized draw then differs with the
modules earlier tests imported (a whole-suite run missed a case that a run of the module alone
had). The draw here sees no local constants, so the test order does not matter either.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, TypeVar
from unittest import mock

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

T = TypeVar("T")


def fixed_sample(strategy: st.SearchStrategy[T], n: int) -> list[T]:
    """Up to `n` examples of `strategy`, identical from run to run."""
    out: list[Any] = []

    @settings(derandomize=True, database=None, max_examples=n, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(x: T) -> None:
        out.append(x)

    with _no_local_constants():
        draw()
    return out


def _no_local_constants() -> Any:
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - a hypothesis without it mixes in none
        return nullcontext()
    if not hasattr(providers, "_get_local_constants"):  # pragma: no cover
        return nullcontext()
    empty = providers.Constants()
    return mock.patch.object(providers, "_get_local_constants", lambda: empty)
