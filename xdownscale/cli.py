"""The ``xdownscale`` command line: a thin layer over the Python API.

Each command parses its options, calls one public function and prints where its result went. Heavy
modules (torch, the models) are imported inside the commands, so ``xdownscale --help`` is instant.

Examples
--------
::

    xdownscale train cm eobs_*.nc --variable rr --out runs/cm-rr --steps 20000 --batch-size 32
    xdownscale train cm eobs_*.nc --variable rr --out runs/cm-rr --steps 20000 --batch-size 32 --resume
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import click

from .errors import XDownscaleError

__all__ = ["main"]


def _channels(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in value.replace(" ", "").split(",") if c)
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers such as 16,32,32; got {value!r}"
        ) from None
    if not channels or min(channels) < 1:
        raise click.BadParameter(f"expected positive integers such as 16,32,32; got {value!r}")
    return channels


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xarray-downscale", prog_name="xdownscale")
def main() -> None:
    """Zero-shot downscaling of Earth-system-model output with consistency models."""


@main.group()
def train() -> None:
    """Train a model: cm / sde (downscaling) or slams / sda (data assimilation)."""


def _generative_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--variable",
                "-v",
                multiple=True,
                help="Variable to train on (e.g. pr); needed if the files hold several. Repeat it "
                "(--variable tas --variable pr) to train a joint model of several variables on the grid of "
                "the first.",
            ),
            click.option(
                "--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory."
            ),
            click.option("--name", default=None, help="Model name (default KIND-VARIABLE-NYxNX)."),
            click.option("--steps", default=20000, show_default=True, type=click.IntRange(min=1)),
            click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1)),
            click.option(
                "--channels",
                default="16,32,32",
                show_default=True,
                callback=_channels,
                help="UNet channels per resolution level.",
            ),
            click.option(
                "--static-inputs",
                is_flag=True,
                help="Give the network the training period's per-cell mean, standard deviation and mask "
                "as fixed inputs (it then runs on its own grid only).",
            ),
            click.option("--lr", default=2e-4, show_default=True, type=float, help="RAdam learning rate."),
            click.option(
                "--lr-schedule",
                default="constant",
                show_default=True,
                type=click.Choice(["constant", "cosine"]),
                help="cosine: decay to a tenth of --lr over --steps.",
            ),
            click.option("--seed", default=0, show_default=True, type=int),
            click.option(
                "--loss",
                default=None,
                type=click.Choice(["ect", "ict", "ct", "dsm"]),
                help="Loss (default: ect for cm, dsm for sde).",
            ),
            click.option("--ema-decay", default=0.999, show_default=True, type=float),
            click.option(
                "--val-time", default=None, help="Validation period START/END, e.g. 1996-12/1997-02."
            ),
            click.option(
                "--val-fraction",
                default=0.1,
                show_default=True,
                type=float,
                help="Last fraction of time steps held out when --val-time is not given.",
            ),
            click.option("--checkpoint-every", default=1000, show_default=True, type=click.IntRange(min=1)),
            click.option("--log-every", default=50, show_default=True, type=click.IntRange(min=1)),
            click.option(
                "--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."
            ),
            click.option(
                "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)."
            ),
            click.option(
                "--units", default=None, help="Override the units attribute of the data, e.g. mm/day."
            ),
            click.option(
                "--eps",
                default=1.0,
                show_default=True,
                type=float,
                help="Offset of the log transform for precipitation, in mm/day.",
            ),
            click.option(
                "--crps-tolerance",
                default=0.0,
                show_default=True,
                type=click.FloatRange(0.0, 1.0, max_open=True),
                help="cm: ship the validated step with the most realistic spectrum among those whose "
                "CRPS is within this fraction of the lowest (0: the lowest CRPS).",
            ),
            click.option(
                "--precision",
                default="auto",
                show_default=True,
                type=click.Choice(["auto", "fp32", "bf16"]),
                help="auto: bfloat16 autocast on CUDA and on CPUs with native bf16, float32 elsewhere.",
            ),
            click.option(
                "--compile",
                default=None,
                type=click.Choice(["auto", "always", "never"]),
                help="torch.compile of the network (default: XDOWNSCALE_COMPILE, else auto: on CUDA for "
                "runs of 2000 steps or more; compiling takes about a minute).",
            ),
            click.option(
                "--licence", default=None, help="Licence / terms of use of the training data, for the card."
            ),
            click.option(
                "--fp16", is_flag=True, help="Store the shipped weights as float16 (half the file size)."
            ),
            click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
        ]
    ):
        func = option(func)
    return func


def _train_generative(kind: str, data: tuple[str, ...], options: dict[str, Any]) -> None:
    from .models.train import train as train_model

    fp16 = options.pop("fp16")
    quiet = options.pop("quiet")
    variables = list(options.pop("variable"))
    options["variable"] = variables[0] if len(variables) == 1 else (variables or None)
    if fp16:
        import torch

        options["dtype"] = torch.float16
    try:
        path = train_model(kind, list(data), progress=not quiet, **options)
    except XDownscaleError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"Model written to {path} (card: {path.with_suffix('.json')})")


@train.command(name="cm")
@click.argument("data", nargs=-1, required=True)
@_generative_options
def train_cm(data: tuple[str, ...], **options: Any) -> None:
    """Train a consistency model on the fine-grid fields in DATA (netCDF files, globs or zarr stores)."""
    _train_generative("cm", data, options)


@train.command(name="sde")
@click.argument("data", nargs=-1, required=True)
@_generative_options
def train_sde(data: tuple[str, ...], **options: Any) -> None:
    """Train the VE-SDE score model (the SDE-bridge baseline) on the fine-grid fields in DATA."""
    _train_generative("sde", data, options)


def _assimilation_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--state",
                "state",
                required=True,
                multiple=True,
                help="State (analysis/reanalysis) files, netCDF or zarr; repeat for several.",
            ),
            click.option("--variable", "-v", default=None, help="Variable of the state (needed if several)."),
            click.option(
                "--stations",
                default=None,
                type=click.Path(exists=True),
                help="Station observations (time, station) with lat/lon coordinates.",
            ),
            click.option(
                "--satellite",
                default=None,
                type=click.Path(exists=True),
                help="A gridded observation modality on its own (coarser) grid.",
            ),
            click.option(
                "--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory."
            ),
            click.option("--name", default=None, help="Model name."),
            click.option(
                "--steps",
                default=5000,
                show_default=True,
                type=click.IntRange(min=1),
                help="Score-model training steps.",
            ),
            click.option(
                "--ae-steps",
                default=2000,
                show_default=True,
                type=click.IntRange(min=1),
                help="Autoencoder training steps (slams).",
            ),
            click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1)),
            click.option(
                "--window",
                default=5,
                show_default=True,
                type=click.IntRange(min=1),
                help="States per window (Markov blanket K).",
            ),
            click.option(
                "--factor",
                default=2,
                show_default=True,
                type=click.IntRange(min=1),
                help="Spatial downsampling of the latent (slams).",
            ),
            click.option("--latent-channels", default=4, show_default=True, type=click.IntRange(min=1)),
            click.option(
                "--channels",
                default=None,
                callback=lambda c, p, v: None if v is None else _channels(c, p, v),
                help="Score UNet channels per level.",
            ),
            click.option(
                "--hidden",
                default=32,
                show_default=True,
                type=click.IntRange(min=1),
                help="Autoencoder width.",
            ),
            click.option("--num-res-blocks", default=2, show_default=True, type=click.IntRange(min=1)),
            click.option("--lr", default=2e-4, show_default=True, type=float),
            click.option("--seed", default=0, show_default=True, type=int),
            click.option("--checkpoint-every", default=1000, show_default=True, type=click.IntRange(min=1)),
            click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available)."),
            click.option("--no-resume", is_flag=True, help="Refuse to continue an existing run in --out."),
            click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
        ]
    ):
        func = option(func)
    return func


def _train_assimilation(kind: str, options: dict[str, Any]) -> None:
    import xarray as xr

    from .models.assimilation import train_assimilation

    quiet = options.pop("quiet")
    resume = not options.pop("no_resume")
    state = list(options.pop("state"))
    for key in ("stations", "satellite"):
        if options[key] is not None:
            ds = xr.open_dataset(options[key])
            names = list(ds.data_vars)
            if len(names) != 1:
                raise click.ClickException(f"--{key} {options[key]}: expected one variable, found {names}.")
            options[key] = ds[names[0]]
    config = {k: v for k, v in options.items() if v is not None}
    try:
        path = train_assimilation(
            kind, state=state if len(state) > 1 else state[0], resume=resume, progress=not quiet, **config
        )
    except XDownscaleError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"Model written to {path}")


@train.command(name="slams")
@_assimilation_options
def train_slams(**options: Any) -> None:
    """Train a SLAMS model: an autoencoder, then a latent score model on windows of states."""
    _train_assimilation("slams", options)


@train.command(name="sda")
@_assimilation_options
def train_sda(**options: Any) -> None:
    """Train an SDA model: a score model on windows of states in pixel space (the SLAMS baseline)."""
    _train_assimilation("sda", options)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--variable",
    "-v",
    required=True,
    multiple=True,
    help="Variable to downscale (e.g. pr). Repeat it (-v pr -v tas) to downscale several variables "
    "together with a joint model.",
)
@click.option("--model", "-m", required=True, help="Model name (see 'xdownscale models') or path.")
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=True),
    help="Output: OUT.zarr (written block by block, resumable) or OUT.nc (small jobs).",
)
@click.option("--method", default="cm", show_default=True, type=click.Choice(["cm", "sde"]))
@click.option(
    "--scale",
    default="auto",
    show_default=True,
    help="'auto', a length such as '150 km', or a wavenumber in cycles per grid cell.",
)
@click.option("--members", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--steps",
    default=None,
    type=click.IntRange(min=1),
    help="Network calls per field (default: 1 for cm, 500 for sde).",
)
@click.option(
    "--qdm-hist",
    default=None,
    help="Bias-correct with QDM fitted on this period of the input, START/END (e.g. 1983/2002).",
)
@click.option(
    "--regrid", default="bilinear", show_default=True, type=click.Choice(["bilinear", "conservative"])
)
@click.option("--units", default=None, help="Override the units attribute of the input, e.g. 'kg m-2 s-1'.")
@click.option(
    "--block",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Time steps computed and written together.",
)
@click.option(
    "--scheduler", default=None, help="Address of a dask.distributed scheduler, e.g. tcp://host:8786."
)
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Fields per network call.")
@click.option("--resume", is_flag=True, help="Continue a job whose output exists, skipping finished blocks.")
@click.option(
    "--allow-partial",
    is_flag=True,
    help="Accept an input that covers the model's domain only partly (a note gives the uncovered "
    "fraction; those cells are NaN).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def downscale(
    inputs: tuple[str, ...],
    variable: tuple[str, ...],
    model: str,
    out: str,
    qdm_hist: str | None,
    block: int,
    quiet: bool,
    allow_partial: bool,
    **options: Any,
) -> None:
    """Downscale VARIABLE from the coarse INPUTS (netCDF files or a zarr store) with a model (several
    variables, --variable repeated, together with a joint model).

    The input is read with each field in one chunk and --block time steps per chunk (no need to chunk
    it yourself). At the end the model, the scale that was used (the one 'auto' picked) and the bias
    correction are printed once. A .zarr store is marked complete only after its last block; a killed
    job is finished by the same command with --resume.
    """
    from .batch import downscale_to_store, open_input, open_inputs, parse_period
    from .xr.domain import allow_partial_coverage

    with _notes() as notes, allow_partial_coverage(allow_partial):
        try:
            if len(variable) == 1:
                da: Any = open_input(inputs, variable[0], chunks=block)
            else:
                da = open_inputs(inputs, variable, chunks=block)
            path = downscale_to_store(
                da,
                out,
                model=model,
                qdm_hist=parse_period(qdm_hist),
                block=block,
                progress=not quiet,
                **options,
            )
        except XDownscaleError as err:
            message = str(err)
            if "allow_partial_coverage" in message:
                message += " On the command line: --allow-partial."
            raise click.ClickException(message) from err
    for name in variable:
        click.echo(_job_summary(path, name, qdm_hist))
    for note in notes:
        click.echo(f"note     {note}")


@contextlib.contextmanager
def _notes() -> Iterator[list[str]]:
    """Collect the library's own warnings (XDownscaleWarning) as notes to print once after the run, each
    message once; other warnings pass through unchanged."""
    from .errors import XDownscaleWarning

    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", XDownscaleWarning)
            yield notes
    finally:
        # re-emit the others only after the recording context is closed: inside it, each re-emitted
        # warning would be recorded again and the loop would never end
        for w in caught:
            if not issubclass(w.category, XDownscaleWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif str(w.message) not in notes:
                notes.append(str(w.message))


def _job_summary(path: Any, variable: str, qdm_hist: str | None) -> str:
    """Model, resolved scale, QDM and output of a finished job, read back from the output's attributes."""
    import xarray as xr

    ds = xr.open_zarr(path) if str(path).endswith(".zarr") else xr.open_dataset(path)
    with ds:
        attrs = dict(ds[variable].attrs) if variable in ds else {}
        done = ds.attrs.get("xdownscale_status", "complete")
    model = attrs.get("downscale_model", "?")
    version = attrs.get("downscale_model_version", "?")
    sha = str(attrs.get("downscale_model_sha256", ""))[:12]
    qdm = (
        f"fitted on {qdm_hist} of the input against the model's training quantiles"
        if qdm_hist
        else "off (pass --qdm-hist START/END to bias-correct)"
    )
    return "\n".join(
        [
            f"model    {model} v{version} (sha256 {sha}...)",
            f"scale    {attrs.get('downscale_scale', '?')}",
            f"QDM      {qdm}",
            f"written  '{variable}' to {path} ({done})",
        ]
    )


@main.command()
@click.option(
    "--input",
    "input_path",
    default=None,
    type=click.Path(),
    help="Your own coarse file (netCDF or zarr); default: the sample shipped with the package.",
)
@click.option("--variable", "-v", default=None, help="Variable in --input (needed if it holds several).")
@click.option("--model", "-m", default=None, help="Model name or path (default: the shipped CM).")
@click.option(
    "--out",
    "-o",
    default="xdownscale-demo/",
    show_default=True,
    help="An existing directory (or a path ending in /, created): writes xdownscale-demo.nc and "
    "xdownscale-demo.png inside it. Anything else is a prefix: writes OUT.nc and OUT.png.",
)
@click.option("--members", default=4, show_default=True, type=click.IntRange(min=2))
@click.option(
    "--days",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Number of days to downscale, from the start of the input.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--scale",
    default="auto",
    show_default=True,
    help="'auto', '150 km', or a wavenumber. On the shipped sample 'auto' is the sample's own resolution.",
)
def demo(input_path: str | None, variable: str | None, model: str | None, **options: Any) -> None:
    """Downscale a coarse sample into an ensemble; write a netCDF and a PNG and print a summary."""
    from .demo import DEFAULT_MODEL, run_demo

    try:
        result = run_demo(input_path, variable, model=model or DEFAULT_MODEL, log=click.echo, **options)
    except XDownscaleError as err:
        raise click.ClickException(str(err)) from err
    click.echo(result.summary)


@main.command(name="models")
def list_shipped_models() -> None:
    """List the models found in the weights directories."""
    from .models import list_models

    rows = list_models()
    if not rows:
        click.echo(
            "No models found. Set XDOWNSCALE_WEIGHTS to a directory holding NAME.safetensors + NAME.json."
        )
        return
    for row in rows:
        shape = "x".join(str(n) for n in row["grid"])
        click.echo(f"{row['name']:36s} {row['kind']:6s} {row['variable']:8s} {shape:8s} {row['path']}")


if __name__ == "__main__":  # pragma: no cover
    main()
