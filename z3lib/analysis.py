"""Analysis of maps and landscapes: FSC, filtering, the conformational landscape, maps along it.

FSC and resolution, filtering, the conformational landscape (PCA, UMAP, k-means), maps and
atomic models along the landscape, mean deformation maps.

Maps are ``[z, y, x]`` numpy arrays; frequencies are in cycles/Å. Point clouds are ``(N, 3)``
``(x, y, z)`` in px relative to the box centre ``N // 2``. Zernike3D coefficient vectors are
``(3K,)`` (or ``(n, 3K)``) ``[c_x(K), c_y(K), c_z(K)]`` in px of the box whose ``Rmax`` is given;
the field ``d(x) = Σ_k c_k Z_k(x / Rmax)`` pushes a reference point ``x`` to ``x + d(x)``
(docs/conventions.md).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from z3lib import zernike as zk
from z3lib.conventions import box_center, box_px_to_model, model_to_box_px


def _shell_index(shape: tuple[int, ...]) -> np.ndarray:
    """Integer radius (in Fourier pixels of the full grid) of every rfftn sample of ``shape``."""
    n = shape[-1]
    axes = [np.fft.fftfreq(s) * n for s in shape[:-1]] + [np.fft.rfftfreq(shape[-1]) * n]
    grids = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    out: np.ndarray = np.round(r).astype(np.int64)
    return out


def fourier_shell_correlation(a: npt.ArrayLike, b: npt.ArrayLike, pixel_size: float) -> pd.DataFrame:
    """FSC between two maps of the same cubic box, shell by shell up to Nyquist.

    Returns
    -------
    a table with ``shell`` (Fourier pixels), ``frequency`` (1/Å), ``resolution`` (Å) and
    ``fsc``, one row per shell from 1 to ``box // 2``.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or len(set(x.shape)) != 1:
        raise ValueError(f"FSC needs two maps of the same cubic box, got {x.shape} and {y.shape}")
    n = x.shape[-1]
    fa, fb = np.fft.rfftn(x), np.fft.rfftn(y)
    shells = _shell_index(x.shape).ravel()
    n_shells = n // 2
    cross = np.bincount(shells, weights=(fa * fb.conj()).real.ravel(), minlength=n_shells + 2)
    pa = np.bincount(shells, weights=(np.abs(fa) ** 2).ravel(), minlength=n_shells + 2)
    pb = np.bincount(shells, weights=(np.abs(fb) ** 2).ravel(), minlength=n_shells + 2)
    k = np.arange(1, n_shells + 1)
    fsc = cross[k] / np.sqrt(np.maximum(pa[k] * pb[k], 1e-30))
    freq = k / (n * pixel_size)
    return pd.DataFrame({"shell": k, "frequency": freq, "resolution": 1.0 / freq, "fsc": fsc})


def resolution_at(fsc: pd.DataFrame, threshold: float = 0.143) -> float:
    """Return the resolution (Å) where the FSC first falls below ``threshold``.

    Linear interpolation between shells; Nyquist if the FSC never falls below it.
    """
    f, c = fsc["frequency"].to_numpy(), fsc["fsc"].to_numpy()
    below = np.nonzero(c < threshold)[0]
    if len(below) == 0:
        return float(1.0 / f[-1])
    i = int(below[0])
    if i == 0:
        return float(1.0 / f[0])
    t = (c[i - 1] - threshold) / (c[i - 1] - c[i])
    return float(1.0 / (f[i - 1] + t * (f[i] - f[i - 1])))


def fsc_area(fsc: pd.DataFrame) -> float:
    """Mean FSC over the shells up to Nyquist (the area under the curve on a unit frequency axis)."""
    return float(fsc["fsc"].mean())


def lowpass_filter(volume: npt.ArrayLike, pixel_size: float, resolution: float, *, width: float = 0.02) -> np.ndarray:
    """Low-pass a map at ``resolution`` Å with a raised-cosine edge ``width`` (1/Å) wide."""
    v = np.asarray(volume, dtype=np.float64)
    axes = [np.fft.fftfreq(s, d=pixel_size) for s in v.shape[:-1]] + [np.fft.rfftfreq(v.shape[-1], d=pixel_size)]
    grids = np.meshgrid(*axes, indexing="ij")
    s = np.sqrt(sum(g**2 for g in grids))
    cut = 1.0 / resolution
    ramp = np.clip((s - (cut - width / 2)) / width, 0.0, 1.0)
    filt = 0.5 * (1 + np.cos(np.pi * ramp))
    out: np.ndarray = np.fft.irfftn(np.fft.rfftn(v) * filt, s=v.shape, axes=tuple(range(v.ndim)))
    return out.astype(np.float32)


# ==============================================================================================
# The landscape: PCA, UMAP, k-means
# ==============================================================================================
@dataclass(frozen=True)
class PcaResult:
    """Principal components of a set of coefficient vectors.

    Attributes
    ----------
    scores
        ``(n, m)`` coordinates of each vector along each component (px, like the coefficients).
    components
        ``(m, D)`` unit-norm principal axes, by decreasing variance. The sign of each axis is fixed
        so that its largest-magnitude loading is positive (the first such entry on ties): the
        score then correlates positively with the coefficient that the axis weighs most, so the
        same data always give the same orientation.
    explained_variance
        ``(m,)`` variance of the scores (px², ``n − 1`` in the denominator).
    explained_variance_ratio
        ``(m,)`` fraction of the total variance (0 when the total is 0).
    mean
        ``(D,)`` mean vector.
    """

    scores: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    mean: np.ndarray

    @property
    def sigmas(self) -> np.ndarray:
        """``(m,)`` standard deviation of the scores along each component (px)."""
        out: np.ndarray = np.sqrt(self.explained_variance)
        return out


def compute_pca(coefficients: npt.ArrayLike, n_components: int | None = None) -> PcaResult:
    """PCA of coefficient vectors (by SVD of the centred data).

    Parameters
    ----------
    coefficients
        ``(n, D)`` vectors, e.g. ``(n, 3K)`` Zernike3D coefficients in px; ``n ≥ 2``.
    n_components
        Components kept, at most ``min(n, D)`` (default: all of them).

    Returns
    -------
    :class:`PcaResult` (float64), with deterministic component signs.
    """
    x = np.asarray(coefficients, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs an (n, D) array with n >= 2 vectors, got shape {x.shape}")
    n, d = x.shape
    m = min(n, d) if n_components is None else int(n_components)
    if not 1 <= m <= min(n, d):
        raise ValueError(f"n_components must be in 1…{min(n, d)}, got {n_components}")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = vt[:m].copy()
    lead = np.argmax(np.abs(components), axis=1)
    signs = np.where(components[np.arange(m), lead] < 0, -1.0, 1.0)
    components *= signs[:, None]
    variance = s**2 / (n - 1)
    total = float(variance.sum())
    ratio = variance[:m] / total if total > 0 else np.zeros(m)
    return PcaResult(
        scores=(x - mean) @ components.T,
        components=components,
        explained_variance=variance[:m].copy(),
        explained_variance_ratio=ratio,
        mean=mean,
    )


#: Fewest particles for which :func:`compute_umap` runs (UMAP's default neighbourhood is 15).
UMAP_MIN_PARTICLES = 15


def compute_umap(
    features: npt.ArrayLike,
    *,
    n_components: int = 2,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
    log: logging.Logger | None = None,
) -> np.ndarray | None:
    """UMAP embedding of feature vectors (the ``umap-learn`` package), or None when it cannot run.

    Parameters
    ----------
    features
        ``(n, D)`` vectors (e.g. coefficients in px).
    n_components
        Embedding dimension.
    n_neighbors
        Neighbourhood size, capped at ``n − 1``.
    min_dist
        UMAP's minimum distance between embedded points.
    seed
        Random state: the same input and seed give the same embedding (UMAP then runs on one
        thread).
    log
        Where the reason for a skipped embedding is logged.

    Returns
    -------
    ``(n, n_components)`` float64 embedding, or None (logged as a warning) when there are fewer
    than :data:`UMAP_MIN_PARTICLES` vectors or ``umap-learn`` is not installed.
    """
    logger = log or logging.getLogger(__name__)
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"UMAP needs an (n, D) array, got shape {x.shape}")
    if x.shape[0] < UMAP_MIN_PARTICLES:
        logger.warning(
            "UMAP skipped: %d particles, it needs at least %d (the landscape is shown by PCA only)",
            x.shape[0],
            UMAP_MIN_PARTICLES,
        )
        return None
    try:
        import umap
    except ImportError as exc:
        logger.warning(
            "UMAP skipped: the umap-learn package is not importable (%s); install it "
            "with `pip install umap-learn` (the landscape is shown by PCA only)",
            exc,
        )
        return None
    reducer = umap.UMAP(
        n_components=n_components, n_neighbors=min(n_neighbors, x.shape[0] - 1), min_dist=min_dist, random_state=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by setting random_state", numba notes
        embedding = reducer.fit_transform(x)
    return np.asarray(embedding, dtype=np.float64)


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.asarray(centres)


def cluster_kmeans(
    features: npt.ArrayLike,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 300,
    order_by: npt.ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k-means clustering (Lloyd's algorithm, k-means++ starts, best of ``n_init`` by inertia).

    Parameters
    ----------
    features
        ``(n, D)`` vectors.
    k
        Number of clusters, ``1 ≤ k ≤ n``. No cluster is left empty (an emptied cluster is
        re-seeded at the point farthest from its centre).
    seed
        Seed of the starts: the same input and seed give the same labels.
    n_init
        Number of k-means++ starts; the one of lowest inertia is kept.
    max_iter
        Most Lloyd iterations per start.
    order_by
        Optional ``(n,)`` values (e.g. PC1 scores): clusters are numbered by increasing mean of
        these values. Default: by decreasing size (ties by first member).

    Returns
    -------
    ``labels`` ``(n,)`` int64 in ``0…k−1`` and ``centres`` ``(k, D)`` float64.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"k-means needs an (n, D) array, got shape {x.shape}")
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n, got k={k} for n={n} vectors")
    rng = np.random.default_rng([seed, 11])
    sq = (x * x).sum(1)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(max(1, n_init)):
        centres = _kmeans_plus_plus(x, k, rng)
        labels = np.full(n, -1)
        for _ in range(max_iter):
            # squared distances (n, k) without an (n, k, D) temporary
            d2 = np.maximum(sq[:, None] - 2.0 * x @ centres.T + (centres**2).sum(1)[None, :], 0.0)
            new = np.argmin(d2, axis=1)
            for j in range(k):  # re-seed empty clusters at the worst-fitted point
                if not (new == j).any():
                    far = int(np.argmax(d2[np.arange(n), new]))
                    new[far] = j
                    d2[far] = 0.0
            if np.array_equal(new, labels):
                break
            labels = new
            centres = np.stack([x[labels == j].mean(0) for j in range(k)])
        inertia = float(((x - centres[labels]) ** 2).sum())
        if best is None or inertia < best[0] - 1e-12 * max(1.0, abs(inertia)):
            best = (inertia, labels.copy(), centres.copy())
    assert best is not None
    _, labels, centres = best
    if order_by is not None:
        key = np.asarray(order_by, dtype=np.float64)
        order = np.argsort([key[labels == j].mean() for j in range(k)], kind="stable")
    else:
        sizes = np.bincount(labels, minlength=k)
        first = np.array([np.argmax(labels == j) for j in range(k)])
        order = np.lexsort((first, -sizes))
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[labels].astype(np.int64), centres[order]


def cluster_means(coefficients: npt.ArrayLike, labels: npt.ArrayLike, k: int) -> np.ndarray:
    """Return the mean coefficient vector of each cluster.

    ``(n, D)`` coefficients and labels ``(n,)`` → ``(k, D)`` (zeros for an empty cluster).
    """
    c = np.asarray(coefficients, dtype=np.float64)
    lab = np.asarray(labels)
    out = np.zeros((k, c.shape[1]))
    for j in range(k):
        if (lab == j).any():
            out[j] = c[lab == j].mean(0)
    return out


def component_path(
    pca: PcaResult, component: int, steps: int = 5, extent: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficient vectors along one principal axis, from ``−extent σ`` to ``+extent σ``.

    Parameters
    ----------
    pca
        From :func:`compute_pca`.
    component
        0-based axis index (0 = PC1).
    steps
        Number of points (≥ 2), equally spaced; the mean is included when ``steps`` is odd.
    extent
        Half-length of the path in units of σ (the axis' standard deviation).

    Returns
    -------
    ``coefficients`` ``(steps, D)`` = mean + s·σ·axis, and ``s`` ``(steps,)`` in units of σ
    (increasing: the series runs in the direction of the oriented axis).
    """
    if steps < 2:
        raise ValueError(f"a path along a component needs at least 2 steps, got {steps}")
    s = np.linspace(-extent, extent, steps)
    sigma = float(pca.sigmas[component])
    coeffs = pca.mean[None, :] + (s * sigma)[:, None] * pca.components[component][None, :]
    return coeffs, s


# ==============================================================================================
# Maps and models deformed by a field
# ==============================================================================================
def _mask_voxels(mask: npt.ArrayLike, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Return the voxel indices and centred positions of a mask.

    ``(N, 3)`` integer ``(z, y, x)`` indices and ``(N, 3)`` centred ``(x, y, z)`` px positions of a
    mask given as a ``[z, y, x]`` array (voxels > 0.5) or as ``(N, 3)`` integer point positions.
    """
    m = np.asarray(mask)
    centre = np.array([box_center(n) for n in shape])
    if m.ndim == 3:
        if m.shape != shape:
            raise ValueError(f"mask shape {m.shape} differs from the volume shape {shape}")
        idx = np.argwhere(m > 0.5)
    elif m.ndim == 2 and m.shape[1] == 3:
        idx = np.round(m[:, ::-1]).astype(np.int64) + centre
        if np.any(idx < 0) or np.any(idx >= np.array(shape)):
            raise ValueError("mask points fall outside the volume")
    else:
        raise ValueError(f"mask must be a [z, y, x] array or (N, 3) points, got shape {m.shape}")
    points = (idx - centre)[:, ::-1].astype(np.float64)
    return idx.astype(np.int64), points


def splat_trilinear(positions: npt.ArrayLike, values: npt.ArrayLike, shape: tuple[int, int, int]) -> np.ndarray:
    """Add values at continuous positions into a ``[z, y, x]`` grid with trilinear weights.

    Parameters
    ----------
    positions
        ``(N, 3)`` ``(x, y, z)`` px relative to the centre ``N // 2`` of each axis.
    values
        ``(N,)``.
    shape
        Output shape.

    Returns
    -------
    float64 volume. The 8 weights of a point sum to 1, so the total is conserved for every point
    whose 8 neighbours lie inside the box (parts falling outside are dropped); a point at an
    integer position lands on its voxel alone.
    """
    p = np.asarray(positions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    dims = np.asarray(shape, dtype=np.int64)
    centre = np.array([box_center(n) for n in shape], dtype=np.float64)
    zyx = p[:, ::-1] + centre
    base = np.floor(zyx).astype(np.int64)
    frac = zyx - base
    flat_size = int(np.prod(dims))
    out = np.zeros(flat_size)
    for corner in range(8):
        offs = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        idx = base + offs
        w = np.prod(np.where(offs[None, :] == 1, frac, 1.0 - frac), axis=1)
        inside = np.all((idx >= 0) & (idx < dims), axis=1) & (w > 0)
        flat = np.ravel_multi_index(tuple(idx[inside].T), tuple(int(d) for d in dims))
        out += np.bincount(flat, weights=(v * w)[inside], minlength=flat_size)
    return out.reshape(shape)


def _check_box(spec: zk.ZernikeSpec, box: int) -> None:
    """Raise ``ValueError`` unless ``spec`` is on a box of ``box`` px (the map's)."""
    if spec.box != box:
        raise ValueError(
            f"the Zernike3D basis is on a {spec.box} px box but the map is {box} px: "
            f"use spec.rescaled({box}) and convert the coefficients"
        )


def deform_maps(
    volume: npt.ArrayLike,
    coefficients: npt.ArrayLike,
    mask: npt.ArrayLike,
    spec: zk.ZernikeSpec,
) -> np.ndarray:
    """Deform a map by several fields (push mapping), evaluating the basis once.

    Every voxel inside the mask carries its value to ``x + d(x)`` by trilinear splatting (mass
    conserving); voxels outside the mask keep their value.

    Parameters
    ----------
    volume
        ``[z, y, x]`` map (cubic box).
    coefficients
        ``(m, 3K)`` fields in px of ``spec.box`` (convert original-box coefficients with
        :meth:`z3lib.zernike.ZernikeSpec.convert` first).
    mask
        ``[z, y, x]`` mask of the voxels to move (values > 0.5), or ``(N, 3)`` integer
        ``(x, y, z)`` voxel positions relative to the centre.
    spec
        Zernike3D basis of the coefficients, on this map's box (``Rmax = box / 2``).

    Returns
    -------
    ``(m, z, y, x)`` float32 maps.
    """
    vol = np.asarray(volume, dtype=np.float64)
    if vol.ndim != 3:
        raise ValueError(f"expected a [z, y, x] volume, got shape {vol.shape}")
    c = np.atleast_2d(np.asarray(coefficients, dtype=np.float64))
    _check_box(spec, vol.shape[-1])
    idx, points = _mask_voxels(mask, vol.shape)
    z = spec.evaluate(points)
    values = vol[idx[:, 0], idx[:, 1], idx[:, 2]]
    still = vol.copy()
    still[idx[:, 0], idx[:, 1], idx[:, 2]] = 0.0
    out = np.empty((len(c),) + vol.shape, dtype=np.float32)
    for i, ci in enumerate(c):
        moved = points + zk.deformation_field(z, ci)
        out[i] = still + splat_trilinear(moved, values, (vol.shape[0], vol.shape[1], vol.shape[2]))
    return out


def deform_map(
    volume: npt.ArrayLike,
    coefficients: npt.ArrayLike,
    mask: npt.ArrayLike,
    spec: zk.ZernikeSpec,
) -> np.ndarray:
    """Deform a map by one field (push mapping): see :func:`deform_maps`.

    Parameters
    ----------
    volume
        ``[z, y, x]`` map (cubic box).
    coefficients
        ``(3K,)`` field in px of the map's box.
    mask
        ``[z, y, x]`` mask of the voxels to move (values > 0.5), or ``(N, 3)`` integer
        ``(x, y, z)`` voxel positions relative to the centre.
    spec
        Zernike3D basis of the coefficients, on this map's box.

    Returns
    -------
    ``[z, y, x]`` float32 map.
    """
    c = np.asarray(coefficients, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"deform_map takes one (3K,) coefficient vector, got shape {c.shape}")
    out: np.ndarray = deform_maps(volume, c[None], mask, spec)[0]
    return out


def deform_model(
    coords: npt.ArrayLike,
    coefficients: npt.ArrayLike,
    spec: zk.ZernikeSpec,
    pixel_size: float,
    *,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Move atoms by a Zernike3D field (push mapping).

    Parameters
    ----------
    coords
        ``(N, 3)`` atom positions ``(x, y, z)`` in Å in the map frame: ``origin`` is the position
        of voxel ``[0, 0, 0]`` (0 for RELION and cryoSPARC maps; px as
        :func:`z3lib.conventions.model_to_box_px`).
    coefficients
        ``(3K,)`` field, or ``(m, 3K)`` fields, in px of ``spec.box`` (the refine stage's
        coefficients with the original box and pixel size).
    spec
        Zernike3D basis of the coefficients (its box: the map's, px).
    pixel_size
        Pixel size (Å) of the coefficients' box.
    origin
        ``(x, y, z)`` position (Å) of voxel ``[0, 0, 0]`` of the map frame of ``coords``.

    Returns
    -------
    ``(N, 3)`` (or ``(m, N, 3)``) deformed positions in Å, same frame. Atoms outside the unit
    ball (radius ``box / 2`` around the centre) do not move.
    """
    xyz = np.asarray(coords, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"coords must be (N, 3) positions in Å, got shape {xyz.shape}")
    px = model_to_box_px(xyz, pixel_size, spec.box, origin)
    moved = px + zk.deformation_field(spec.evaluate(px), np.asarray(coefficients, dtype=np.float64))
    return box_px_to_model(moved, pixel_size, spec.box, origin)


def mean_deformation_map(
    coefficients: npt.ArrayLike,
    mask: npt.ArrayLike,
    spec: zk.ZernikeSpec,
    *,
    pixel_size: float = 1.0,
    batch: int = 256,
) -> np.ndarray:
    """Mean deformation magnitude over particles at every mask voxel.

    Parameters
    ----------
    coefficients
        ``(n, 3K)`` fields in px of the mask's box.
    mask
        ``[z, y, x]`` mask (voxels > 0.5 are evaluated).
    spec
        Zernike3D basis of the coefficients, on the mask's box.
    pixel_size
        Å per px: the output is ``mean_i |d_i(x)| · pixel_size`` (Å with the map's pixel size;
        the default 1 gives px).
    batch
        Particles per block (bounds memory to ``batch × N × 3`` floats).

    Returns
    -------
    ``[z, y, x]`` float32 map, 0 outside the mask.
    """
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"mask must be a [z, y, x] array, got shape {m.shape}")
    c = np.atleast_2d(np.asarray(coefficients, dtype=np.float64))
    _check_box(spec, m.shape[-1])
    idx, points = _mask_voxels(m, m.shape)
    z = spec.evaluate(points)
    total = np.zeros(len(points))
    for lo in range(0, len(c), batch):
        d = zk.deformation_field(z, c[lo : lo + batch])  # (b, N, 3)
        total += np.sqrt((d * d).sum(-1)).sum(0)
    out = np.zeros(m.shape, dtype=np.float32)
    out[idx[:, 0], idx[:, 1], idx[:, 2]] = total / max(len(c), 1) * pixel_size
    return out


def deformation_rms(
    coefficients: npt.ArrayLike,
    points: npt.ArrayLike,
    spec: zk.ZernikeSpec,
    *,
    batch: int = 256,
) -> np.ndarray:
    """RMS of ``|d|`` over a point cloud per particle (Xmipp's ``sphDeformation``).

    Parameters
    ----------
    coefficients
        ``(n, 3K)`` in px of the points' box.
    points
        ``(N, 3)`` ``(x, y, z)`` px relative to the centre (e.g. the mask's point cloud).
    spec
        Zernike3D basis of the coefficients, on the points' box.
    batch
        Particles per block (bounds memory to ``batch × N × 3`` floats).

    Returns
    -------
    ``(n,)`` float64, px.
    """
    c = np.atleast_2d(np.asarray(coefficients, dtype=np.float64))
    z = spec.evaluate(np.asarray(points, dtype=np.float64))
    parts = [np.asarray(zk.deformation_rms(z, c[lo : lo + batch])) for lo in range(0, len(c), batch)]
    return np.concatenate(parts) if parts else np.zeros(0)


def fsc_summary(fsc: pd.DataFrame, column: str) -> dict[str, float]:
    """Return the resolutions (Å) at FSC 0.143 and 0.5 of one curve of a ``fsc.tsv`` table.

    The table has columns ``frequency`` and ``column``; the result is
    ``{"fsc_0.143": …, "fsc_0.5": …}``.
    """
    curve = pd.DataFrame({"frequency": fsc["frequency"], "fsc": fsc[column]})
    return {"fsc_0.143": resolution_at(curve, 0.143), "fsc_0.5": resolution_at(curve, 0.5)}
