"""Dask schedulers for laziness checks (as cf-xarray's ``raise_if_dask_computes``), shared by the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dask


class CountingScheduler:
    """A synchronous dask scheduler that counts its computations in ``calls`` and fails once there are
    more than ``max_computes`` of them (never, with None)."""

    def __init__(self, max_computes: int | None = None) -> None:
        self.calls = 0
        self.max_computes = max_computes

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.max_computes is not None and self.calls > self.max_computes:
            raise AssertionError(f"dask computed {self.calls} time(s), at most {self.max_computes} allowed")
        return dask.get(dsk, keys, **kwargs)


def no_compute(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """A dask scheduler that fails: proves that nothing was computed."""
    raise AssertionError("dask computed before .compute()")


@contextlib.contextmanager
def raise_if_dask_computes() -> Iterator[None]:
    """Fail when anything inside the block makes dask compute."""
    with dask.config.set(scheduler=no_compute):
        yield
