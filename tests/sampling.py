"""A fixed sample of a hypothesis strategy, the same on every run.

Guard tests ("the generator reaches the cases it claims") must not depend on luck:
`strategy.example()` draws from an unseeded source, so a rare case can be missing from one CI
run and present in the next. `fixed_sample` draws through `@given` with `derandomize=True`,
so the sample is a function of the strategy alone.
"""

from __future__ import annotations

from typing import Any, TypeVar

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

    draw()
    return out
