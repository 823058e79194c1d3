"""The layer contract of STYLE.md, checked on the source: numerics never import xarray/dask/pint,
xarray adapters never import torch; and `import xdownscale` does no work beyond registering accessors."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xdownscale"

FORBIDDEN = {
    "core": {"xarray", "dask", "pint", "cf_xarray", "xarray_regrid", "distributed"},
    "nets": {"xarray", "dask", "pint", "cf_xarray", "xarray_regrid", "distributed"},
    "xr": {"torch", "safetensors"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 0 and node.module:
            # relative imports into another layer, e.g. "from ..nets import unet" inside xr/
            found.add("xdownscale." + node.module.split(".")[0])
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer: str) -> None:
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files, f"no modules found in xdownscale/{layer}"
    bad = {}
    forbidden = FORBIDDEN[layer] | ({"xdownscale.nets", "xdownscale.models"} if layer == "xr" else set())
    for path in files:
        hit = _imports(path) & forbidden
        if hit:
            bad[path.name] = sorted(hit)
    assert not bad, f"xdownscale/{layer} imports what its layer forbids: {bad}"


def test_import_is_cheap_and_registers_accessor() -> None:
    code = (
        "import sys, xarray as xr, xdownscale\n"
        "assert hasattr(xr.DataArray([0.0]), 'downscale')\n"
        "heavy = [m for m in ('torch', 'xarray_regrid', 'safetensors', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import xdownscale imported heavy modules: {out.stdout.strip()}"


def test_public_names_resolve() -> None:
    import xdownscale

    for name in xdownscale.__all__:
        assert getattr(xdownscale, name) is not None, name


@pytest.mark.parametrize(
    ("method", "function", "differs"),
    [
        ("cm", "downscale", {"method", "steps"}),
        ("sde", "downscale", {"method", "steps"}),
        ("plan", "plan", {"steps"}),
        ("prepare", "prepare", set()),
    ],
)
def test_accessor_methods_spell_out_the_functions_keywords(method: str, function: str, differs: set) -> None:
    """help(da.downscale.cm) and IDE completion show every keyword, with the function's defaults (cm and
    sde fix the method and default their own steps)."""
    import inspect

    import xdownscale.api as api
    from xdownscale.accessors import DownscaleAccessor

    fn = dict(inspect.signature(getattr(api, function)).parameters)
    acc = dict(inspect.signature(getattr(DownscaleAccessor, method)).parameters)
    fn.pop("da"), acc.pop("self")
    assert not any(p.kind is p.VAR_KEYWORD for p in acc.values()), f"{method} takes **kwargs"
    assert set(fn) - differs == set(acc) - differs
    for name in set(fn) - differs:
        assert acc[name].default == fn[name].default, name


def test_dataset_accessor_spells_out_downscale_dataset_keywords() -> None:
    """ds.downscale.cm shows every keyword of xdownscale.downscale_dataset, with its defaults (steps: 1)."""
    import inspect

    from xdownscale.accessors import DatasetDownscaleAccessor
    from xdownscale.joint import downscale_dataset

    fn = dict(inspect.signature(downscale_dataset).parameters)
    acc = dict(inspect.signature(DatasetDownscaleAccessor.cm).parameters)
    fn.pop("ds"), acc.pop("self")
    assert set(fn) == set(acc)
    for name in set(fn) - {"steps"}:
        assert acc[name].default == fn[name].default, name
