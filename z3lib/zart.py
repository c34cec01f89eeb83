"""ZART: algebraic reconstruction in the reference frame that follows each particle's deformation.

One algorithm, two back ends. The host logic (this module's :func:`reconstruct_zart`) is shared;
the kernels — deformed projection (push by the particle's Zernike3D field, rotate, shift,
bilinear splat) and back-projection at the *same* deformed positions — exist for numpy (CPU) and
for cupy (GPU: custom CUDA kernels, the volume, the point cloud and the basis resident on the
device; per batch only the images and their parameters go up, nothing per image comes back).

Update (block-iterative SART; a batch of one image is Kaczmarz):

    P_i = CTF_i ∗ G_σ ∗ Σ_j a_ij V_j                     forward, a_ij = bilinear weight of voxel j
    R_i = Wiener_i(I_i − P_i)                             residual, CTF-corrected: CTF·R / (CTF² + ε)
    V_j ← V_j + λ · Σ_i Σ_u a_iju (G_σ ∗ R_i)_u / W_iu  /  Σ_i Σ_u a_iju
    W_iu = Σ_j a_iju                                      ray weights (SART row sums)

with an optional Gaussian footprint σ per iteration (multi-resolution: coarse to fine) and an
optional positivity constraint. The unknowns are the values of the voxels inside the mask.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib.conventions import box_center
from z3lib.ctf import ctf_grid
from z3lib.devices import choose_zart_backend, cupy_device_name
from z3lib.io.coefficients import FieldRows
from z3lib.settings import from_section

# ----------------------------------------------------------------------------------------------
# Back ends
# ----------------------------------------------------------------------------------------------


class NumpyBackend:
    """CPU kernels with numpy (bincount scatter, fancy-index gather).

    One ZART block evaluates the same deformed positions four times (projection, ray weights,
    back-projection, hit counts): the bilinear indices and weights of the last geometry are kept
    (one entry, keyed on the very arrays passed, which are held so their ids stay unique; arrays
    changed in place between calls would need a new backend).
    """

    name = "numpy"
    xp: Any = np

    def __init__(self) -> None:
        self._cached: tuple[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] | None = None

    def asarray(self, a: Any, dtype: Any = np.float32) -> Any:
        """Return ``a`` as a numpy array of ``dtype``."""
        return np.asarray(a, dtype=dtype)

    def to_host(self, a: Any) -> np.ndarray:
        """Return ``a`` as a numpy array (it is one already)."""
        return np.asarray(a)

    @staticmethod
    def fields(basis: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
        """``(N, K)`` basis, ``(B, 3, K)`` coefficients → ``(B, N, 3)`` float32 displacements."""
        out: np.ndarray = np.matmul(basis[None], coefficients.transpose(0, 2, 1)).astype(np.float32)
        return out

    def _weights(
        self, points: np.ndarray, fields: np.ndarray | None, rot: np.ndarray, shifts: np.ndarray, box: int
    ) -> tuple[np.ndarray, np.ndarray]:
        key = (points, fields, rot, shifts, box)
        if self._cached is not None and all(a is b for a, b in zip(self._cached[0], key, strict=True)):
            return self._cached[1]
        b = rot.shape[0]
        pts = points[None] if fields is None else points[None] + fields  # (B|1, N, 3)
        uv = np.matmul(pts, rot[:, :2, :].transpose(0, 2, 1))  # (B, N, 2), BLAS
        c = float(box_center(box))
        u = uv[..., 0] - shifts[:, None, 0] + c
        v = uv[..., 1] - shifts[:, None, 1] + c
        u0, v0 = np.floor(u), np.floor(v)
        inside = (u0 >= -1) & (u0 <= box - 1) & (v0 >= -1) & (v0 <= box - 1)
        u0 = np.where(inside, u0, 0.0)
        v0 = np.where(inside, v0, 0.0)
        fu = np.where(inside, u - u0, 0.0)
        fv = np.where(inside, v - v0, 0.0)
        g = inside.astype(u.dtype)
        w = box + 2
        itype: type[np.signedinteger[Any]] = np.int32 if b * w * w < 2**31 else np.int64
        rows: np.ndarray = v0.astype(itype) + 1
        cols: np.ndarray = u0.astype(itype) + 1
        base = rows * w + cols + (np.arange(b, dtype=itype) * w * w)[:, None]
        index = base[..., None] + np.array([0, 1, w, w + 1], dtype=itype)
        weight = np.stack([(g - fu) * (1 - fv), fu * (1 - fv), (g - fu) * fv, fu * fv], axis=-1)
        self._cached = (key, (index, weight))
        return index, weight

    def project(
        self,
        values: np.ndarray,
        points: np.ndarray,
        fields: np.ndarray | None,
        rot: np.ndarray,
        shifts: np.ndarray,
        box: int,
    ) -> np.ndarray:
        """``(N,)`` voxel values → ``(B, box, box)`` deformed projections (bilinear splat)."""
        b, w = rot.shape[0], box + 2
        index, weight = self._weights(points, fields, rot, shifts, box)
        flat = np.bincount(index.ravel(), weights=(weight * values[None, :, None]).ravel(), minlength=b * w * w)
        return flat.reshape(b, w, w)[:, 1:-1, 1:-1].astype(np.float32)

    def backproject(
        self, images: np.ndarray, points: np.ndarray, fields: np.ndarray | None, rot: np.ndarray, shifts: np.ndarray
    ) -> np.ndarray:
        """``(B, box, box)`` → ``(N,)``: sum over the batch of bilinear reads at the same positions."""
        box = images.shape[-1]
        index, weight = self._weights(points, fields, rot, shifts, box)
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1))).ravel()
        out: np.ndarray = (padded[index] * weight).sum(-1).sum(0)
        return out.astype(np.float32)


_CUDA_SOURCE = r"""
extern "C" {
__device__ inline bool position(const float* points, const float* fields, const float* rot, const float* shifts,
                                int n, int b, int j, int box, int has_field, float* fu, float* fv, int* base) {
    float x = points[3 * j], y = points[3 * j + 1], z = points[3 * j + 2];
    if (has_field) {
        const float* d = fields + 3 * ((size_t)b * n + j);
        x += d[0]; y += d[1]; z += d[2];
    }
    const float* r = rot + 9 * b;
    float c = (float)(box / 2);
    float u = r[0] * x + r[1] * y + r[2] * z - shifts[2 * b] + c;
    float v = r[3] * x + r[4] * y + r[5] * z - shifts[2 * b + 1] + c;
    float u0 = floorf(u), v0 = floorf(v);
    if (!(u0 >= -1.0f && u0 <= box - 1.0f && v0 >= -1.0f && v0 <= box - 1.0f)) return false;
    *fu = u - u0; *fv = v - v0;
    int w = box + 2;
    *base = b * w * w + ((int)v0 + 1) * w + ((int)u0 + 1);
    return true;
}

__global__ void zart_project(const float* points, const float* fields, const float* rot, const float* shifts,
                             const float* values, float* out, int n, int batch, int box, int has_field) {
    long long tid = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (tid >= (long long)n * batch) return;
    int b = tid / n, j = tid % n;
    float fu, fv; int base;
    if (!position(points, fields, rot, shifts, n, b, j, box, has_field, &fu, &fv, &base)) return;
    int w = box + 2;
    float val = values[j];
    atomicAdd(out + base, val * (1.0f - fu) * (1.0f - fv));
    atomicAdd(out + base + 1, val * fu * (1.0f - fv));
    atomicAdd(out + base + w, val * (1.0f - fu) * fv);
    atomicAdd(out + base + w + 1, val * fu * fv);
}

__global__ void zart_backproject(const float* points, const float* fields, const float* rot, const float* shifts,
                                 const float* images, float* out, int n, int batch, int box, int has_field) {
    int j = blockDim.x * blockIdx.x + threadIdx.x;
    if (j >= n) return;
    int w = box + 2;
    float acc = 0.0f;
    for (int b = 0; b < batch; ++b) {
        float fu, fv; int base;
        if (!position(points, fields, rot, shifts, n, b, j, box, has_field, &fu, &fv, &base)) continue;
        acc += images[base] * (1.0f - fu) * (1.0f - fv) + images[base + 1] * fu * (1.0f - fv)
             + images[base + w] * (1.0f - fu) * fv + images[base + w + 1] * fu * fv;
    }
    out[j] = acc;
}
}
"""


class CupyBackend:
    """GPU kernels: custom CUDA kernels through cupy (atomicAdd splat, gather without atomics)."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self.xp: Any = cupy
        module = cupy.RawModule(code=_CUDA_SOURCE)
        self._project = module.get_function("zart_project")
        self._backproject = module.get_function("zart_backproject")

    def asarray(self, a: Any, dtype: Any = np.float32) -> Any:
        """Return ``a`` as a contiguous cupy array of ``dtype`` on the device."""
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def fields(self, basis: Any, coefficients: Any) -> Any:
        """``(N, K)`` basis, ``(B, 3, K)`` coefficients → contiguous ``(B, N, 3)`` float32 on the device."""
        return self.xp.ascontiguousarray(self.xp.einsum("nk,bak->bna", basis, coefficients).astype(self.xp.float32))

    def to_host(self, a: Any) -> np.ndarray:
        """Copy ``a`` from the device to a numpy array."""
        out: np.ndarray = self.xp.asnumpy(a)
        return out

    def project(self, values: Any, points: Any, fields: Any, rot: Any, shifts: Any, box: int) -> Any:
        """Project ``(N,)`` voxel values to ``(B, box, box)`` deformed projections (bilinear splat, CUDA kernel)."""
        xp = self.xp
        b, n, w = int(rot.shape[0]), int(points.shape[0]), box + 2
        out = xp.zeros((b, w, w), dtype=xp.float32)
        f = fields if fields is not None else xp.zeros(1, dtype=xp.float32)
        threads = 256
        blocks = (n * b + threads - 1) // threads
        self._project(
            (blocks,),
            (threads,),
            (
                points,
                f,
                self.asarray(rot),
                self.asarray(shifts),
                values,
                out,
                np.int32(n),
                np.int32(b),
                np.int32(box),
                np.int32(fields is not None),
            ),
        )
        return out[:, 1:-1, 1:-1]

    def backproject(self, images: Any, points: Any, fields: Any, rot: Any, shifts: Any) -> Any:
        """Backproject ``(B, box, box)`` images to ``(N,)``: the batch's bilinear reads summed (CUDA kernel)."""
        xp = self.xp
        b, n, box = int(rot.shape[0]), int(points.shape[0]), int(images.shape[-1])
        padded = xp.ascontiguousarray(xp.pad(images.astype(xp.float32), ((0, 0), (1, 1), (1, 1))))
        out = xp.zeros(n, dtype=xp.float32)
        f = fields if fields is not None else xp.zeros(1, dtype=xp.float32)
        threads = 256
        self._backproject(
            ((n + threads - 1) // threads,),
            (threads,),
            (
                points,
                f,
                self.asarray(rot),
                self.asarray(shifts),
                padded,
                out,
                np.int32(n),
                np.int32(b),
                np.int32(box),
                np.int32(fields is not None),
            ),
        )
        return out


def get_backend(name: str = "auto", log: logging.Logger | None = None) -> NumpyBackend | CupyBackend:
    """Return the ZART back end for ``name``: ``"auto"``, ``"numpy"`` or ``"cupy"``.

    ``"auto"`` is cupy when a GPU is usable, else numpy (:func:`z3lib.devices.choose_zart_backend`).
    """
    logger = log or logging.getLogger(__name__)
    if choose_zart_backend(name) == "cupy":
        backend: NumpyBackend | CupyBackend = CupyBackend()
        logger.info("ZART back end: cupy on %s", cupy_device_name())
        return backend
    logger.info("ZART back end: numpy (CPU)%s", "" if name == "numpy" else " — no usable CUDA GPU")
    return NumpyBackend()


# ----------------------------------------------------------------------------------------------
# Shared host logic
# ----------------------------------------------------------------------------------------------
@dataclass
class ZartConfig:
    """Settings of ZART; the defaults are the pipeline's.

    They are ``zart`` of the config schema; a test keeps them equal.
    """

    iterations: int = 4
    batch_size: int = 64  # images per block update (1 = Kaczmarz)
    relaxation: float = 0.5  # λ
    sigmas: tuple[float, ...] = (1.0, 0.0)  # Gaussian footprint (px) per iteration; the last repeats
    positivity: bool = False
    wiener_epsilon: float = 0.1  # ε = this × mean CTF² of the batch
    ctf_pad: int = 2
    seed: int = 0
    # the corrected map uses s · (c − c₀), c₀ the half set's frame (centre_fields): "medoid", the
    # mean field of the particles nearest the landscape's geometric median (a conformation the
    # particles take), or "mean" (the average field, off a curved landscape); fields shrunk by
    # s ∈ [0, 1]; "auto" picks s among z3lib.field_scale.FIELD_SCALES by held-out image prediction
    frame: Literal["medoid", "mean"] = "medoid"
    field_scale: float | Literal["auto"] = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, zart: Mapping[str, Any], seed: int = 0) -> ZartConfig:
        """Build from the pipeline config's ``zart`` section and its ``seed``.

        The section's ``backend`` is the caller's to pick (:func:`get_backend`).
        """
        values = dict(zart)
        if "sigmas" in values:
            values["sigmas"] = tuple(float(v) for v in values["sigmas"])
        return from_section(cls, values, ignore={"backend"}, seed=seed)

    def sigma_at(self, iteration: int) -> float:
        """Return the Gaussian footprint σ (px) of iteration ``iteration`` (the last one repeats; 0 without any)."""
        if not self.sigmas:
            return 0.0
        return float(self.sigmas[min(iteration, len(self.sigmas) - 1)])


def _filter(backend: Any, images: Any, transfer: Any, pad: int) -> Any:
    """Multiply the spectra of ``(B, N, N)`` images, zero-padded to ``pad·N``, by ``transfer``."""
    xp = backend.xp
    n = images.shape[-1]
    size = pad * n
    start = (size - n) // 2
    padded = xp.zeros(images.shape[:-2] + (size, size), dtype=images.dtype)
    padded[..., start : start + n, start : start + n] = images
    out = xp.fft.irfft2(xp.fft.rfft2(padded) * transfer, s=(size, size))
    return out[..., start : start + n, start : start + n].astype(xp.float32)


def _gaussian(xp: Any, size: int, sigma: float) -> Any:
    fy = xp.fft.fftfreq(size)[:, None]
    fx = xp.fft.rfftfreq(size)[None, :]
    return xp.exp(-2.0 * math.pi**2 * sigma**2 * (fx**2 + fy**2))


def _table_columns(table: Any) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Return the particles' angles, shifts, CTF columns and phase-flip flags from the particle table.

    Angles ``(n, 3)`` deg, shifts ``(n, 2)`` px, CTF columns ``(n,)`` each and phase-flip flags
    ``(n,)``.
    """
    angles = np.asarray(table[["rot", "tilt", "psi"]], dtype=np.float64)
    shifts = np.asarray(table[["shift_x", "shift_y"]], dtype=np.float64)
    ctf_cols = {
        c: np.asarray(table[c], dtype=np.float64)
        for c in (
            "defocus_u",
            "defocus_v",
            "defocus_angle",
            "voltage",
            "cs",
            "amplitude_contrast",
            "phase_shift",
            "bfactor",
            "ctf_scale",
        )
        if c in table
    }
    # phase-flipped images (rlnCtfDataArePhaseFlipped) were multiplied by sign(CTF): their model is |CTF|
    flipped = (
        np.asarray(table["phase_flipped"], dtype=bool) if "phase_flipped" in table else np.zeros(len(angles), bool)
    )
    return angles, shifts, ctf_cols, flipped


def _zart_step(
    backend: Any,
    values: Any,
    pts: Any,
    basis: Any,
    coefficients: np.ndarray | None,
    imgs: Any,
    rot: Any,
    shifts: Any,
    ctf_params: dict[str, np.ndarray],
    flipped: np.ndarray,
    blur: Any,
    box: int,
    pixel_size: float,
    config: ZartConfig,
) -> Any:
    """Return the voxel values after one ZART update from a batch of B images.

    ``values`` ``(N,)`` and ``pts`` ``(N, 3)`` (px) on the back end; ``basis`` ``(N, K)`` on it and
    ``coefficients`` ``(B, 3, K)`` px (host), or None for zero fields; ``imgs`` ``(B, box, box)``,
    ``rot`` ``(B, 3, 3)`` and ``shifts`` ``(B, 2)`` px on the back end; ``ctf_params`` the CTF
    columns of the batch and ``flipped`` ``(B,)`` its phase-flipped rows (modelled with
    ``|CTF|``); ``blur`` the iteration's Gaussian transfer or None.
    """
    xp = backend.xp
    fields = None if coefficients is None else backend.fields(basis, backend.asarray(coefficients))
    size = config.ctf_pad * box
    ctf = ctf_grid(xp, size, pixel_size, ctf_params, dtype=xp.float32)
    if flipped.any():
        ctf = xp.where(backend.asarray(flipped, dtype=bool)[:, None, None], xp.abs(ctf), ctf)
    transfer = ctf if blur is None else ctf * blur
    proj = backend.project(values, pts, fields, rot, shifts, box)
    residual = imgs - _filter(backend, proj, transfer, config.ctf_pad)
    eps = config.wiener_epsilon * float(xp.mean(ctf * ctf))
    wiener = ctf / (ctf * ctf + eps)
    corrected = _filter(backend, residual, wiener if blur is None else wiener * blur, config.ctf_pad)
    ray = backend.project(xp.ones_like(values), pts, fields, rot, shifts, box)
    if blur is not None:
        ray = _filter(backend, ray, blur, config.ctf_pad)
    update = backend.backproject(corrected / xp.maximum(ray, 1.0), pts, fields, rot, shifts)
    hits = backend.backproject(xp.ones_like(imgs), pts, fields, rot, shifts)
    values = values + config.relaxation * update / xp.maximum(hits, 1e-3)
    return xp.maximum(values, 0.0) if config.positivity else values


def reconstruct_zart(
    backend: Any,
    points: np.ndarray,
    basis: np.ndarray | None,
    coefficients: np.ndarray | FieldRows | None,
    images: Any,
    table: Any,
    index: np.ndarray,
    box: int,
    pixel_size: float,
    config: ZartConfig,
    *,
    log: logging.Logger | None = None,
    label: str = "",
) -> tuple[np.ndarray, dict[str, float]]:
    """Reconstruct the values of the mask voxels from particles ``index``.

    Parameters
    ----------
    backend
        :class:`NumpyBackend` or :class:`CupyBackend`.
    points
        ``(N, 3)`` mask voxel positions (px of the processing box, relative to the centre).
    basis, coefficients
        ``(N, K)`` basis values at the points and ``(n_particles, 3K)`` coefficients (px of the
        processing box); None for the uncorrected (zero-field) reconstruction.
    images
        indexable ``(n, box, box)`` stack (e.g. a lazy :class:`z3lib.io.ImageStack`): batches are
        streamed, never the whole stack.
    table
        canonical particle table (poses in deg and px, CTF; ``phase_flipped`` rows are modelled
        with ``|CTF|``) for every particle.
    index
        rows to use (e.g. one half set).
    box, pixel_size, config
        Processing box (px), its pixel size (Å) and the ZART settings.
    log, label
        Logger for progress (default this module's) and a suffix naming the run in its lines.

    Returns
    -------
    ``(N,)`` float32 voxel values and timing statistics (``images_per_s``, ``seconds``).
    """
    from z3lib.conventions import euler_to_matrix

    logger = log or logging.getLogger(__name__)
    xp = backend.xp
    pts = backend.asarray(points)
    z_dev = backend.asarray(basis) if (basis is not None and coefficients is not None) else None
    k = basis.shape[1] if basis is not None else 0
    values = xp.zeros(len(points), dtype=xp.float32)
    rng = np.random.default_rng(config.seed)
    angles, shifts_all, ctf_cols, flipped = _table_columns(table)
    size = config.ctf_pad * box
    t0 = time.perf_counter()
    n_done = 0
    total = config.iterations * len(index)
    last = t0
    for it in range(config.iterations):
        sigma = config.sigma_at(it)
        blur = _gaussian(xp, size, sigma) if sigma > 0 else None
        order = index[rng.permutation(len(index))]
        for lo in range(0, len(order), config.batch_size):
            sel = np.sort(order[lo : lo + config.batch_size])
            imgs = backend.asarray(images[sel])
            rot = euler_to_matrix(angles[sel, 0], angles[sel, 1], angles[sel, 2]).astype(np.float32)
            rot_d, sh_d = backend.asarray(rot), backend.asarray(shifts_all[sel])
            c = None if z_dev is None or coefficients is None else coefficients[sel].reshape(len(sel), 3, k)
            ctf_sel = {name: col[sel] for name, col in ctf_cols.items()}
            values = _zart_step(
                backend, values, pts, z_dev, c, imgs, rot_d, sh_d, ctf_sel, flipped[sel], blur, box, pixel_size, config
            )
            n_done += len(sel)
            now = time.perf_counter()
            if now - last > 10 or n_done == total:
                rate = n_done / (now - t0)
                eta = (total - n_done) / max(rate, 1e-9)
                progress = (label, it + 1, config.iterations, n_done, total, rate, eta)
                logger.info("ZART%s iteration %d/%d: %d/%d image updates (%.0f images/s, ETA %.0f s)", *progress)
                last = now
    if backend.name == "cupy":
        xp.cuda.Stream.null.synchronize()
    elapsed = time.perf_counter() - t0
    return backend.to_host(values), {"seconds": elapsed, "images_per_s": n_done / max(elapsed, 1e-9)}


def _tent_offsets(step: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the integer offsets and weights of the 3D tent of half-width ``step`` px.

    Offsets ``(M, 3)`` (z, y, x) and weights ``(M,)``, ``Π_a (1 − |o_a| / step)``: its weights sum
    to ``step³`` and its translates by ``step`` sum to 1 everywhere (trilinear interpolation on a
    grid of spacing ``step``).
    """
    o = np.arange(-(step - 1), step)
    w1 = 1.0 - np.abs(o) / step
    oz, oy, ox = np.meshgrid(o, o, o, indexing="ij")
    wz, wy, wx = np.meshgrid(w1, w1, w1, indexing="ij")
    return np.stack([oz, oy, ox], -1).reshape(-1, 3), (wz * wy * wx).reshape(-1)


def values_to_volume(values: npt.ArrayLike, points: npt.ArrayLike, box: int, *, step: int = 1) -> np.ndarray:
    """Point values ``(N,)`` at integer point positions → ``(box, box, box)`` ``[z, y, x]`` map.

    ``step = 1``: each value lands in its own voxel (0 elsewhere). ``step > 1``: the points lie on
    a sub-grid of spacing ``step`` px (``preprocess.points_step``) and each carries the mass of
    ``step³`` voxels (see :func:`z3lib.geometry.points_from_volume`); its value is spread over the
    full grid with the tent of half-width ``step`` divided by ``step³``, i.e. the map is the
    trilinear interpolation of the per-voxel densities between the points (mass preserving; it
    tapers to 0 over ``step − 1`` voxels beyond the outermost points). Voxels outside the box
    are dropped.
    """
    if step < 1:
        raise ValueError(f"the point step must be a positive integer, got {step}")
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    idx = np.round(np.asarray(points)[:, ::-1] + box_center(box)).astype(np.int64)
    vol = np.zeros(box**3, dtype=np.float64)
    offsets, weights = _tent_offsets(step)
    for off, w in zip(offsets, weights / float(step) ** 3, strict=True):
        at = idx + off
        inside = np.all((at >= 0) & (at < box), axis=1)
        flat = np.ravel_multi_index(tuple(at[inside].T), (box, box, box))
        vol += np.bincount(flat, weights=w * vals[inside], minlength=box**3)
    return vol.reshape(box, box, box).astype(np.float32)


def soft_support(points: npt.ArrayLike, box: int, *, step: int = 1, erode: int = 2, sigma: float = 1.5) -> np.ndarray:
    """Make a smooth ``[z, y, x]`` mask, 1 deep inside the reconstructed support and ~0 at its border.

    The support is eroded by ``erode`` voxels, then Gaussian-blurred, for honest half-map FSCs: the
    support's sharp edge is common to both halves and would otherwise inflate the FSC.

    The support is the set of voxels where :func:`values_to_volume` of unit densities (value
    ``step³`` per point) exceeds 1/2: the points' own voxels for ``step = 1``; for a sub-grid of
    spacing ``step``, the voxels more than half-way from its outermost points to the next
    sub-grid position outside.
    """
    from scipy.ndimage import binary_erosion, gaussian_filter

    n = len(np.asarray(points))
    support = values_to_volume(np.full(n, float(step) ** 3), points, box, step=step) > 0.5
    inner = binary_erosion(support, iterations=erode) if erode else support
    out: np.ndarray = gaussian_filter(inner.astype(np.float64), sigma).astype(np.float32)
    return out


def half_sets(subsets: npt.ArrayLike, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the rows of the two gold-standard halves.

    ``rlnRandomSubset`` 1/2 when every particle has one, else a seeded random split.
    """
    s = np.asarray(subsets)
    if len(s) and np.all(np.isin(s, (1, 2))) and (s == 1).any() and (s == 2).any():
        return np.nonzero(s == 1)[0], np.nonzero(s == 2)[0]
    order = np.random.default_rng([seed, 7]).permutation(len(s))
    half = len(s) // 2
    return np.sort(order[:half]), np.sort(order[half:])


def masked_fsc(a: np.ndarray, b: np.ndarray, mask: np.ndarray, pixel_size: float, *, step: int = 1) -> pd.DataFrame:
    """Compute the FSC of two ``(N, N, N)`` maps inside ``mask``.

    ``fourier_shell_correlation`` of :mod:`z3lib.analysis`, set to 0 beyond the Nyquist
    ``2 · step · pixel size`` Å of a sub-grid point cloud of spacing ``step`` (there both maps hold
    only the same interpolation round-off).
    """
    from z3lib.analysis import fourier_shell_correlation

    fsc = fourier_shell_correlation(a * mask, b * mask, pixel_size)
    if step > 1:
        fsc.loc[fsc["frequency"] > 1.0 / (2.0 * step * pixel_size) + 1e-12, "fsc"] = 0.0
    return fsc


def heldout_correlation(
    backend: Any,
    values: np.ndarray,
    points: np.ndarray,
    basis: np.ndarray | None,
    coefficients: np.ndarray | FieldRows | None,
    images: Any,
    table: Any,
    index: np.ndarray,
    box: int,
    pixel_size: float,
    config: ZartConfig,
) -> float:
    """Measure how well a map predicts images it was not built from.

    The mean over particles ``index`` of the correlation (both mean-subtracted) between each image
    and the CTF-filtered projection of the map's ``values`` deformed by that particle's own field.

    Parameters
    ----------
    backend
        :class:`NumpyBackend` or :class:`CupyBackend`.
    values
        ``(N,)`` voxel values of a map reconstructed from other particles (the other half set).
    points, basis, coefficients
        as for :func:`reconstruct_zart` (``(N, 3)`` px, ``(N, K)``, ``(n_particles, 3K)`` px;
        None: no deformation).
    images, table, index
        the stack, the canonical particle table and the held-out rows.
    box, pixel_size
        Processing box (px) and its pixel size (Å).
    config
        ZART settings (batch size, CTF padding).

    Returns
    -------
    the mean correlation, in [-1, 1]; the noise in the images bounds it (at SNR 0.1 a perfect
    model reaches about 0.3), so only differences between models on the same images count.
    """
    from z3lib.conventions import euler_to_matrix

    xp = backend.xp
    pts = backend.asarray(points)
    vals = backend.asarray(values)
    z_dev = backend.asarray(basis) if (basis is not None and coefficients is not None) else None
    angles, shifts_all, ctf_cols, flipped = _table_columns(table)
    size = config.ctf_pad * box
    total, count = 0.0, 0
    for lo in range(0, len(index), config.batch_size):
        sel = np.sort(np.asarray(index)[lo : lo + config.batch_size])
        rot = backend.asarray(euler_to_matrix(angles[sel, 0], angles[sel, 1], angles[sel, 2]).astype(np.float32))
        fields = None
        if z_dev is not None and coefficients is not None:
            c = backend.asarray(coefficients[sel].reshape(len(sel), 3, -1))
            fields = backend.fields(z_dev, c)
        ctf = ctf_grid(xp, size, pixel_size, {name: col[sel] for name, col in ctf_cols.items()}, dtype=xp.float32)
        if flipped[sel].any():
            ctf = xp.where(backend.asarray(flipped[sel], dtype=bool)[:, None, None], xp.abs(ctf), ctf)
        pred = _filter(
            backend, backend.project(vals, pts, fields, rot, backend.asarray(shifts_all[sel]), box), ctf, config.ctf_pad
        )
        imgs = backend.asarray(images[sel])
        pred = pred - pred.mean(axis=(1, 2), keepdims=True)
        imgs = imgs - imgs.mean(axis=(1, 2), keepdims=True)
        num = (pred * imgs).sum(axis=(1, 2))
        den = xp.sqrt((pred * pred).sum(axis=(1, 2)) * (imgs * imgs).sum(axis=(1, 2)))
        total += float((num / xp.maximum(den, 1e-30)).sum())
        count += len(sel)
    return total / max(count, 1)
