"""Perfect-model validation of a downscaling model during training: the metric training stops on.

The training loss says how well the network fits the consistency condition, not whether downscaling
works. Here the validation fields themselves are coarse-grained (sea-aware block means of ``factor x
factor`` cells) and downscaled back the way a user's default ``.downscale.cm`` call would: brought to the
fine grid like an ESM field (nearest fill of coarse cells without land, bilinear interpolation, nearest
values beyond the outermost coarse cell centres, low-pass at the coarse grid's Nyquist wavenumber),
noised at the scale ``scale="auto"`` picks for them (their spectrum against the model's target
spectrum, :func:`xdownscale.xr.spectra.select_scale`), denoised in one network call per member, and with
the default ``preserve=True`` (precipitation: each coarse cell's mean restored; other variables: the
low-pass at the coarse grid's Nyquist wavenumber). The score is the ensemble CRPS against the true fine
fields in physical units (mm/day for precipitation), over the model's valid cells; the bilinear field's
mean absolute error is the bar to beat (a deterministic forecast's CRPS is its MAE).

The inputs are built once with the xarray adapters (no torch there); scoring runs on torch tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr

from ..core.spectra import log_spectral_distance

__all__ = ["JointPerfectModelValidation", "PerfectModelValidation"]


class PerfectModelValidation:
    """Coarse-grain held-out fields, downscale them back in one step, and score the ensemble.

    Parameters
    ----------
    fields
        Held-out fine fields in physical units, (time, lat, lon) with CF coordinates; NaN = masked.
    transform
        The model's fitted :class:`xdownscale.transforms.LogNormalize`.
    target_psd
        The model's target spectrum in the transformed space (from :func:`xdownscale.psd`).
    mask
        Bool (lat, lon): the model's valid cells.
    factor
        Coarse-graining factor in cells (4: 0.25 deg -> 1 deg).
    members
        Ensemble members per field.
    max_fields
        At most this many evenly spaced fields are used (validation cost).
    seed
        Seed of the (fixed) validation noise, so scores of different steps are comparable.
    auto_scale
        Noise at the scale ``scale="auto"`` picks for the coarse-grained fields (True) or at the coarse
        grid's Nyquist wavenumber (False).
    preserve
        Restore the coarse fields' large scales in the members before scoring, as the default
        ``preserve=True`` of ``.downscale`` does.
    """

    def __init__(
        self,
        fields: xr.DataArray,
        transform: Any,
        target_psd: xr.DataArray,
        mask: np.ndarray,
        *,
        factor: int = 4,
        members: int = 4,
        max_fields: int = 32,
        seed: int = 0,
        auto_scale: bool = True,
        preserve: bool = True,
    ) -> None:
        from ..core.spectra import fill_nearest
        from ..xr.regrid import regrid
        from ..xr.spectra import Scale, lowpass, masked_estimator, psd, select_scale, upscale

        time = fields.dims[0]
        n = fields.sizes[time]
        keep = np.unique(np.linspace(0, n - 1, min(n, max_fields)).round().astype(int))
        truth = fields.isel({time: keep}).astype(np.float64).load()
        coarse = upscale(truth, factor)
        self._coarse = coarse
        coarse = coarse.copy(data=fill_nearest(coarse.values))
        fine = regrid(coarse, truth, method="bilinear")
        fine = fine.copy(data=fill_nearest(fine.values))  # beyond the outermost coarse centres: nearest
        wavenumber = 0.5 / factor
        fine = lowpass(fine, wavenumber)
        if transform.log:
            fine = fine.clip(min=0.0)
        fine = fine.transpose(*truth.dims)
        self.factor = int(factor)
        self.members = int(members)
        self.seed = int(seed)
        self.transform = transform
        self.mask = np.asarray(mask, dtype=bool)
        self.truth = np.asarray(truth.values, dtype=np.float64)
        self.bilinear = np.asarray(fine.values, dtype=np.float64)
        self.wavenumber = wavenumber
        self.preserve = bool(preserve)
        self._fine = fine.where(self.mask)
        x = np.asarray(transform.forward(self.bilinear), dtype=np.float32)
        self._estimator = masked_estimator(target_psd)
        if auto_scale:  # as scale="auto" does: the inputs' spectrum in the transformed space
            spectrum = psd(fine.copy(data=np.where(self.mask, x, np.nan)), masked=self._estimator)
            scale = select_scale(target_psd, spectrum, input_wavenumber=wavenumber)
        else:
            scale = Scale.from_wavenumber(wavenumber, psd=target_psd)
        assert scale.sigma is not None  # both set it from the target spectrum
        self.sigma = float(scale.sigma)
        self.scale_wavenumber = scale.wavenumber
        self.inputs = np.where(np.isfinite(x) & self.mask, x, 0.0).astype(np.float32)
        valid = np.isfinite(self.truth) & self.mask & np.isfinite(self.bilinear)
        self.valid = valid
        self.bilinear_mae = float(np.abs(self.bilinear - self.truth)[valid].mean())
        self._truth_psd = self._power(self.truth[:, None])

    @torch.no_grad()
    def score(self, model: torch.nn.Module, *, batch_size: int = 32) -> dict[str, float]:
        """CRPS, MAE of the ensemble mean, spread/skill and mean bias of ``model`` (a consistency model
        called as ``model(x_t, sigma)``) on the coarse-grained fields, in physical units.

        Returns
        -------
        dict
            ``crps``, ``mae_mean`` (ensemble mean), ``spread_skill`` (mean ensemble std over the RMSE of
            the ensemble mean, with the finite-ensemble factor sqrt((M+1)/M)), ``mean_ratio`` (domain mean
            of the output over the truth's), ``spectral_distance`` (RMS over the resolved wavenumbers of
            the log ratio of the members' mean power spectrum to the truth's, in the transformed space,
            with the estimator of the model's target spectrum), ``psd_factor`` (the largest such ratio
            or its inverse) and ``bilinear_mae`` (the bar to beat).
        """
        samples = _ensemble(model, self.inputs[:, None], [self.sigma], self.members, self.seed, batch_size)
        return self.score_samples(samples[:, :, 0])

    @property
    def metric(self) -> str:
        """What :meth:`score` measures, for the model card."""
        where = (
            f"at scale='auto' (k {self.scale_wavenumber:.4g} cycles/cell, sigma {self.sigma:.4g})"
            if self.scale_wavenumber is not None and self.scale_wavenumber != self.wavenumber
            else f"at the coarse grid's scale (sigma {self.sigma:.4g})"
        )
        kept = ", preserve=True" if self.preserve else ", preserve=False"
        return (
            f"perfect model: validation fields coarse-grained {self.factor}x, downscaled back {where}"
            f"{kept}, {self.members} members, scored against the true fields"
        )

    def score_samples(self, samples: np.ndarray) -> dict[str, float]:
        """The scores of :meth:`score` for the members ``samples`` (fields, members, y, x), given in the
        transformed space."""
        phys = self.physical(samples)
        truth = self.truth[:, None]
        valid = np.broadcast_to(self.valid[:, None], phys.shape)
        skill = np.abs(phys - truth).mean(axis=1)
        sorted_ = np.sort(phys, axis=1)
        ranks = (2.0 * np.arange(1, self.members + 1) - self.members - 1.0)[None, :, None, None]
        spread_term = (sorted_ * ranks).sum(axis=1) * 2.0 / (self.members * self.members)
        crps = skill - 0.5 * spread_term
        v = self.valid
        mean = phys.mean(axis=1)
        err = mean - self.truth
        rmse = float(np.sqrt((err[v] ** 2).mean()))
        std = phys.std(axis=1, ddof=1) if self.members > 1 else np.zeros_like(mean)
        spread = float(np.sqrt((std[v] ** 2).mean())) * np.sqrt((self.members + 1) / self.members)
        truth_mean = float(self.truth[v].mean())
        distance, factor, _ = log_spectral_distance(self._power(phys), self._truth_psd)
        return {
            "crps": float(crps[v].mean()),
            "mae_mean": float(np.abs(err[v]).mean()),
            "spread_skill": spread / rmse if rmse > 0 else float("nan"),
            "mean_ratio": float(phys[valid].mean()) / truth_mean if truth_mean > 0 else float("nan"),
            "spectral_distance": distance,
            "psd_factor": factor,
            "bilinear_mae": self.bilinear_mae,
        }

    def _power(self, phys: np.ndarray) -> np.ndarray:
        """The mean power spectrum of the fields ``phys`` (fields, members, y, x; physical units) in the
        transformed space, over the model's cells."""
        from ..xr.spectra import psd

        field = self._members(np.asarray(self.transform.forward(phys), dtype=np.float64))
        return psd(field, masked=self._estimator).mean([field.dims[0], "member"]).values

    def _members(self, values: np.ndarray) -> xr.DataArray:
        """``values`` (fields, members, y, x) as a DataArray on the validation grid, NaN off the mask."""
        fine = self._fine
        time, ydim, xdim = fine.dims
        return xr.DataArray(
            np.where(self.mask, values, np.nan),
            dims=(time, "member", ydim, xdim),
            coords={name: fine[name] for name in fine.coords if set(fine[name].dims) <= set(fine.dims)},
        )

    def physical(self, samples: np.ndarray) -> np.ndarray:
        """Members ``samples`` (fields, members, y, x) of the transformed space in physical units, as the
        default downscaling call returns them: with ``preserve``, the coarse fields' large scales restored
        by :func:`xdownscale.preserve.preserve_large_scales` (precipitation: each coarse cell's mean
        over its valid fine cells, generated drizzle moved onto the cell's wet values; other variables:
        the low-pass at the coarse grid's Nyquist wavenumber); without, generated drizzle set to 0."""
        log = bool(getattr(self.transform, "log", False))
        phys = np.asarray(self.transform.inverse(samples, dry=not (self.preserve and log)), dtype=np.float64)
        if not self.preserve:
            return phys
        from ..preserve import preserve_large_scales

        fine = self._fine
        time, ydim, xdim = fine.dims
        out = self._members(phys)
        if log:
            wet_min = getattr(self.transform, "wet_min", None)
            coherent = bool(getattr(self.transform, "coherent", False))
            fixed = preserve_large_scales(
                out.clip(min=0.0), fine, rule="mean", coarse=self._coarse, wet_min=wet_min, coherent=coherent
            )
        else:
            fixed = preserve_large_scales(out, fine, rule="lowpass", wavenumber=self.wavenumber)
        return np.asarray(fixed.transpose(time, "member", ydim, xdim).values, dtype=np.float64)


def _ensemble(
    model: torch.nn.Module, inputs: np.ndarray, sigmas: list[float], members: int, seed: int, batch_size: int
) -> np.ndarray:
    """``members`` one-step samples of ``model`` from ``inputs`` (fields, channels, y, x), each channel
    noised to its own level, with fixed noise; returns (fields, members, channels, y, x)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = inputs.shape
    samples = np.empty((n, members, c, h, w), dtype=np.float64)
    x_all = torch.from_numpy(inputs)
    levels = torch.tensor(sigmas, dtype=torch.float32, device=device)
    for m in range(members):
        z_all = torch.randn(x_all.shape, generator=gen)
        for i in range(0, n, batch_size):
            x = x_all[i : i + batch_size].to(device)
            z = z_all[i : i + batch_size].to(device)
            sigma: Any = float(sigmas[0]) if c == 1 else levels[None, :].expand(x.shape[0], c)
            out = model(x + levels[None, :, None, None] * z, sigma)
            samples[i : i + batch_size, m] = out.float().cpu().numpy()
    model.train(was_training)
    return samples


class JointPerfectModelValidation:
    """:class:`PerfectModelValidation` of a joint model: each variable coarse-grained and noised at its own
    coarse scale, all denoised together; the score to stop on is the mean over variables of each one's
    CRPS relative to its bilinear field's MAE (below 1: better than bilinear).

    Parameters
    ----------
    parts
        One :class:`PerfectModelValidation` per variable, in the network's channel order, built on the
        same validation days.
    names
        The variables' names.
    """

    def __init__(self, parts: list[PerfectModelValidation], names: list[str]) -> None:
        self.parts, self.names = parts, list(names)
        self.factor, self.members, self.seed = parts[0].factor, parts[0].members, parts[0].seed
        self.bilinear_mae = 1.0  # the relative CRPS of the bilinear fields
        self._preserved = ", preserve=True" if parts[0].preserve else ", preserve=False"

    @property
    def metric(self) -> str:
        sigmas = ", ".join(f"{n} {p.sigma:.4g}" for n, p in zip(self.names, self.parts, strict=True))
        return (
            f"perfect model: validation fields of every variable coarse-grained {self.factor}x, downscaled "
            f"back together, each at its own scale (sigma {sigmas}){self._preserved}, {self.members} "
            "members; crps is "
            "the mean over variables of CRPS / bilinear MAE (1 = bilinear), per_variable in their units"
        )

    @torch.no_grad()
    def score(self, model: torch.nn.Module, *, batch_size: int = 32) -> dict[str, float]:
        """Relative ``crps`` and ``mae_mean``, mean ``spread_skill``, ``mean_ratio`` and
        ``spectral_distance`` over variables, the largest ``psd_factor``, and each variable's scores as
        ``crps_NAME``, ``bilinear_mae_NAME``, ``spread_skill_NAME``, ``spectral_distance_NAME``."""
        inputs = np.stack([p.inputs for p in self.parts], axis=1)
        samples = _ensemble(model, inputs, [p.sigma for p in self.parts], self.members, self.seed, batch_size)
        per = [p.score_samples(samples[:, :, c]) for c, p in enumerate(self.parts)]
        out = {
            "crps": float(np.mean([s["crps"] / s["bilinear_mae"] for s in per])),
            "mae_mean": float(np.mean([s["mae_mean"] / s["bilinear_mae"] for s in per])),
            "spread_skill": float(np.mean([s["spread_skill"] for s in per])),
            "mean_ratio": float(np.mean([s["mean_ratio"] for s in per])),
            "spectral_distance": float(np.mean([s["spectral_distance"] for s in per])),
            "psd_factor": float(np.max([s["psd_factor"] for s in per])),
            "bilinear_mae": 1.0,
        }
        keys = ("crps", "bilinear_mae", "spread_skill", "spectral_distance")
        for name, s in zip(self.names, per, strict=True):
            out |= {f"{key}_{name}": s[key] for key in keys}
        return out

    def per_variable(self, record: dict[str, Any]) -> dict[str, dict[str, float]]:
        """A history record's scores of each variable (for the card)."""
        return {
            n: {key: record[f"val_{key}_{n}"] for key in ("crps", "spread_skill")}
            | {"bilinear_mae": p.bilinear_mae}
            for n, p in zip(self.names, self.parts, strict=True)
        }
