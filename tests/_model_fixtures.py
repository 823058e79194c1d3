"""Tiny trained models shared by the pipeline, CLI and batch tests (trained once per session, seconds)."""

from __future__ import annotations

import pytest
import xarray as xr


@pytest.fixture(scope="session")
def fine_data() -> xr.DataArray:
    """Synthetic daily precipitation (mm/day) on a 16x24 regional 0.25 deg grid with a sea mask."""
    from xdownscale.datasets import synthetic_precipitation

    da = synthetic_precipitation(ny=16, nx=24, ntime=48, seed=0, mask=True)
    da.name = "pr"
    return da


def _train(kind: str, data: xr.DataArray, out: object, steps: int) -> object:
    import xdownscale

    path = xdownscale.train(
        kind=kind,
        data=data,
        variable="pr",
        out=out,
        name=f"tiny-{kind}",
        steps=steps,
        batch_size=8,
        channels=(8, 16),
        seed=0,
        checkpoint_every=None,
        progress=False,
        val_fraction=0.1,
    )
    return xdownscale.load_model(path)


@pytest.fixture(scope="session")
def cm_model(fine_data, tmp_path_factory):  # type: ignore[no-untyped-def]
    return _train("cm", fine_data, tmp_path_factory.mktemp("cm-model"), steps=30)


@pytest.fixture(scope="session")
def sde_model(fine_data, tmp_path_factory):  # type: ignore[no-untyped-def]
    return _train("sde", fine_data, tmp_path_factory.mktemp("sde-model"), steps=20)
