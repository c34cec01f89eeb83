"""An atomic model as the decoder's point cloud (config ``zernike.points: atoms``).

The atoms of a model fitted into the consensus map become the points the decoder moves and
projects: heavy atoms only, each an isotropic Gaussian of one shared width σ with its own
amplitude, both fitted to the consensus map by least squares (:func:`fit_atom_amplitudes`). The
same Zernike3D field then deforms the model exactly, atom by atom.

The model's covalent geometry gives the pairs whose distances the optional training regulariser
keeps (:func:`model_pairs`: bonds found by distance, and Cα–Cα of consecutive residues), and
:func:`geometry_stats` measures a deformed model: bond-length and Cα–Cα RMS deviations from the
model and clashes.

Frames: the model is in the map frame (Å, voxel ``[0, 0, 0]`` of the original map at the origin,
as RELION and cryoSPARC write maps; :func:`z3lib.conventions.model_to_box_px`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.spatial import cKDTree

from z3lib.analysis import splat_trilinear
from z3lib.conventions import box_center, model_to_box_px
from z3lib.io import AtomicModel, PathLike, read_model

FloatArray = npt.NDArray[np.float64]
IndexPairs = npt.NDArray[np.int64]

#: Longest heavy-atom covalent bond (Å) recognised by distance (S–S is 2.05 Å).
BOND_MAX_A = 2.1
#: Longest Cα–Cα distance (Å) of consecutive residues counted as a peptide link (trans: 3.8 Å).
CA_MAX_A = 4.3
#: A clash: two atoms more than two bonds apart closer than this (Å).
CLASH_A = 2.2
#: Atom pairs more than two bonds apart within this distance (Å) in the model are the contacts
#: the clash regulariser watches.
CONTACT_A = 4.0
#: The widths σ (px of the processing box) tried for the atoms' Gaussians.
SIGMAS_PX = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def heavy_atoms(elements: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """``(N,)`` True for every atom that is not hydrogen (or deuterium)."""
    symbols = np.char.upper(np.char.strip(np.asarray(elements, dtype=str)))
    return ~np.isin(symbols, ["H", "D"])


def model_to_points(
    coords: npt.ArrayLike, original_pixel_size: float, original_box: int, pixel_size: float
) -> FloatArray:
    """Atom positions (Å, map frame) → ``(N, 3)`` px of the processing box from its centre.

    :func:`z3lib.conventions.model_to_box_px` on the original box, rescaled to the processing
    box's pixels.
    """
    return model_to_box_px(coords, original_pixel_size, original_box) * (original_pixel_size / pixel_size)


# ----------------------------------------------------------------------------------------------
# Covalent geometry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelPairs:
    """Atom pairs of a model (rows of its heavy-atom list).

    Attributes
    ----------
    bonds
        ``(M, 2)`` covalent bonds (heavy atoms closer than :data:`BOND_MAX_A`).
    ca
        ``(P, 2)`` Cα atoms of consecutive residues of one chain (closer than :data:`CA_MAX_A`).
    near
        ``(Q, 2)`` pairs one or two bonds apart (never counted as clashes).
    contacts
        ``(R, 2)`` pairs more than two bonds apart within :data:`CONTACT_A` of each other: those a
        deformation could push into a clash.
    """

    bonds: IndexPairs
    ca: IndexPairs
    near: IndexPairs
    contacts: IndexPairs

    @property
    def kept(self) -> IndexPairs:
        """The pairs whose distances the geometry regulariser keeps: bonds and Cα–Cα."""
        return np.concatenate([self.bonds, self.ca]).astype(np.int64)


def model_pairs(
    coords: npt.ArrayLike, atom_names: npt.ArrayLike, chain_ids: npt.ArrayLike, residue_numbers: npt.ArrayLike
) -> ModelPairs:
    """Find the bonds, Cα–Cα links and near pairs of a model's atoms (heavy atoms only, Å).

    Parameters
    ----------
    coords
        ``(N, 3)`` positions (Å).
    atom_names, chain_ids, residue_numbers
        ``(N,)`` per atom (``"CA"`` names the Cα).
    """
    xyz = np.asarray(coords, dtype=np.float64)
    tree = cKDTree(xyz)
    bonds = np.asarray(sorted(tree.query_pairs(BOND_MAX_A)), dtype=np.int64).reshape(-1, 2)
    names = np.char.strip(np.asarray(atom_names, dtype=str))
    chains = np.asarray(chain_ids, dtype=str)
    numbers = np.asarray(residue_numbers, dtype=np.int64)
    ca_rows = np.flatnonzero(names == "CA")
    links = []
    for a, b in zip(ca_rows[:-1], ca_rows[1:], strict=True):
        same_chain = chains[a] == chains[b] and numbers[b] - numbers[a] == 1
        if same_chain and np.linalg.norm(xyz[a] - xyz[b]) < CA_MAX_A:
            links.append((a, b))
    ca = np.asarray(links, dtype=np.int64).reshape(-1, 2)
    neighbours: list[set[int]] = [set() for _ in range(len(xyz))]
    for a, b in bonds.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)
    near = {(int(a), int(b)) for a, b in bonds.tolist()}  # one bond apart
    for a, b in bonds.tolist():  # two bonds apart: a's other neighbours with b, b's with a
        near |= {(min(b, c), max(b, c)) for c in neighbours[a] if c != b}
        near |= {(min(a, c), max(a, c)) for c in neighbours[b] if c != a}
    close = {(int(a), int(b)) for a, b in np.sort(tree.query_pairs(CONTACT_A, output_type="ndarray"), axis=1).tolist()}
    return ModelPairs(
        bonds=bonds,
        ca=ca,
        near=np.asarray(sorted(near), dtype=np.int64).reshape(-1, 2),
        contacts=np.asarray(sorted(close - near), dtype=np.int64).reshape(-1, 2),
    )


def geometry_stats(reference: npt.ArrayLike, moved: npt.ArrayLike, pairs: ModelPairs) -> dict[str, float]:
    """Measure how a deformation kept a model's covalent geometry.

    Parameters
    ----------
    reference, moved
        ``(N, 3)`` heavy-atom positions (Å) before and after the deformation.
    pairs
        The reference's :func:`model_pairs`.

    Returns
    -------
    ``bond_rmsd_A`` and ``ca_rmsd_A``: RMS change of the bond and Cα–Cα lengths (Å);
    ``clashes``: pairs more than two bonds apart closer than :data:`CLASH_A` (``clashes_reference``:
    the same count in the reference).
    """
    ref, new = np.asarray(reference, dtype=np.float64), np.asarray(moved, dtype=np.float64)

    def rmsd(p: IndexPairs) -> float:
        if not len(p):
            return float("nan")
        d0 = np.linalg.norm(ref[p[:, 0]] - ref[p[:, 1]], axis=1)
        d1 = np.linalg.norm(new[p[:, 0]] - new[p[:, 1]], axis=1)
        return float(np.sqrt(np.mean((d1 - d0) ** 2)))

    return {
        "bond_rmsd_A": rmsd(pairs.bonds),
        "ca_rmsd_A": rmsd(pairs.ca),
        "clashes": float(_clashes(new, pairs.near)),
        "clashes_reference": float(_clashes(ref, pairs.near)),
    }


def _clashes(xyz: FloatArray, near: IndexPairs) -> int:
    close = cKDTree(xyz).query_pairs(CLASH_A, output_type="ndarray")
    if not len(close):
        return 0
    excluded = {tuple(p) for p in near.tolist()}
    return sum(1 for a, b in np.sort(close, axis=1).tolist() if (a, b) not in excluded)


# ----------------------------------------------------------------------------------------------
# Amplitudes fitted to the map
# ----------------------------------------------------------------------------------------------
def _gather(grid: FloatArray, points: FloatArray) -> FloatArray:
    """Trilinear interpolation of a ``[z, y, x]`` grid at points (``(x, y, z)`` px from its centre).

    The adjoint of :func:`z3lib.analysis.splat_trilinear`: the same weights, and corners outside
    the grid dropped the same way.
    """
    dims = np.asarray(grid.shape, dtype=np.int64)
    zyx = np.asarray(points, dtype=np.float64)[:, ::-1] + np.array([box_center(int(n)) for n in dims])
    base = np.floor(zyx).astype(np.int64)
    frac = zyx - base
    out = np.zeros(len(zyx))
    for corner in range(8):
        offs = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        idx = base + offs
        w = np.prod(np.where(offs[None, :] == 1, frac, 1.0 - frac), axis=1)
        inside = np.all((idx >= 0) & (idx < dims), axis=1)
        out[inside] += w[inside] * grid[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
    return out


def gaussian_filter_3d(grid: FloatArray, sigma_px: float) -> FloatArray:
    """Convolve a ``[z, y, x]`` grid with an isotropic Gaussian of σ px (periodic, by FFT)."""
    n = grid.shape[0]
    k = np.fft.fftfreq(n)
    kr = np.fft.rfftfreq(n)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2
    out: FloatArray = np.fft.irfftn(
        np.fft.rfftn(grid) * np.exp(-2.0 * np.pi**2 * sigma_px**2 * k2), s=grid.shape, axes=(0, 1, 2)
    )
    return out


@dataclass(frozen=True)
class AtomFit:
    """Atoms as Gaussians fitted to a map.

    Attributes
    ----------
    amplitudes
        ``(N,)`` per atom (the map's units).
    sigma_px
        The shared Gaussian width (px of the map's grid).
    correlation
        Correlation of the fitted atoms' map with the map over the mask.
    """

    amplitudes: FloatArray
    sigma_px: float
    correlation: float


def fit_atom_amplitudes(
    volume: npt.ArrayLike,
    points: npt.ArrayLike,
    weights: npt.ArrayLike,
    *,
    mask: npt.ArrayLike | None = None,
    ridge: float = 0.05,
    iterations: int = 100,
) -> AtomFit:
    """Fit one Gaussian width and per-atom amplitudes to a map by least squares.

    The model map is ``g_σ * Σ_i a_i T(x − p_i)`` (``T`` trilinear, ``g_σ`` an isotropic Gaussian),
    compared with ``volume`` over ``mask``. σ is the one of :data:`SIGMAS_PX` that fits best with
    amplitudes proportional to ``weights`` (``a = s·w``); then the amplitudes, non-negative, from
    bounded least squares with a ridge ``ridge·|a − s·w|²`` that pulls each atom towards its
    element's share (accelerated projected gradient, FISTA).

    Parameters
    ----------
    volume
        ``(box, box, box)`` map ``[z, y, x]``.
    points
        ``(N, 3)`` atom positions, px from the map's centre.
    weights
        ``(N,)`` scattering weights (e.g. atomic numbers).
    mask
        ``(box, box, box)``: where the map is compared (default everywhere).
    ridge
        Weight of ``|δ|²`` relative to the squared response of one atom.
    iterations
        Iterations of the bounded solver.
    """
    vol = np.asarray(volume, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    box = vol.shape[0]
    m = np.ones_like(vol) if mask is None else (np.asarray(mask) > 0).astype(np.float64)
    target = vol * m

    def forward(a: FloatArray, sigma: float) -> FloatArray:
        return gaussian_filter_3d(splat_trilinear(pts, a, (box,) * 3), sigma) * m

    best: tuple[float, float, float] | None = None
    for sigma in SIGMAS_PX:
        u = forward(w, sigma)
        uu = float((u * u).sum())
        scale = float((u * target).sum()) / max(uu, 1e-30)
        residual = float(((target - scale * u) ** 2).sum())
        if best is None or residual < best[0]:
            best = (residual, sigma, scale)
    assert best is not None
    _, sigma, scale = best
    base = scale * w
    one_atom = gaussian_filter_3d(
        splat_trilinear(np.zeros((1, 3)), np.ones(1), (box,) * 3), sigma
    )  # an atom's response
    lam = ridge * float((one_atom**2).sum())

    def gradient(a: FloatArray) -> FloatArray:  # of ½|A a − b|² + ½ λ |a − s w|²
        return _gather(gaussian_filter_3d(forward(a, sigma) - target, sigma), pts) + lam * (a - base)

    # the step: 1 / the largest eigenvalue of AᵀA + λ (power iterations)
    v = np.random.default_rng(0).random(len(pts))
    top = 1.0
    for _ in range(15):
        u = _gather(gaussian_filter_3d(forward(v, sigma), sigma), pts) + lam * v
        norm_u, norm_v = float(np.linalg.norm(u)), float(np.linalg.norm(v))
        top = norm_u / max(norm_v, 1e-300)
        v = u / max(norm_u, 1e-300)
    step = 1.0 / (1.05 * top)
    amplitudes, previous, y, t = base.copy(), base.copy(), base.copy(), 1.0
    for _ in range(iterations):  # FISTA: accelerated projected gradient on a ≥ 0
        amplitudes = np.maximum(y - step * gradient(y), 0.0)
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        y = amplitudes + ((t - 1.0) / t_next) * (amplitudes - previous)
        previous, t = amplitudes, t_next
    fitted = forward(amplitudes, sigma)
    inside = m > 0
    correlation = float(np.corrcoef(fitted[inside], vol[inside])[0, 1])
    return AtomFit(amplitudes=amplitudes, sigma_px=float(sigma), correlation=correlation)


def model_geometry_table(reference: AtomicModel, models: Mapping[str, PathLike]) -> pd.DataFrame:
    """Tabulate :func:`geometry_stats` of deformed copies of ``reference`` (PDB files, same atoms).

    Parameters
    ----------
    reference
        The model as given.
    models
        Name → file of each deformed copy (the report's cluster and motion models).

    Returns
    -------
    One row per model: ``model``, ``bond_rmsd_A``, ``ca_rmsd_A``, ``clashes``,
    ``clashes_reference`` (heavy atoms; see :func:`geometry_stats`).
    """
    heavy = heavy_atoms(reference.elements)
    ref = reference.coords[heavy]
    pairs = model_pairs(ref, reference.atom_names[heavy], reference.chain_ids[heavy], reference.residue_numbers[heavy])
    rows = []
    for name, path in models.items():
        moved = read_model(path).coords
        if len(moved) != len(reference.coords):
            raise ValueError(f"{path} has {len(moved)} atoms, the reference model {len(reference.coords)}")
        rows.append({"model": name, **geometry_stats(ref, moved[heavy], pairs)})
    return pd.DataFrame(rows, columns=["model", "bond_rmsd_A", "ca_rmsd_A", "clashes", "clashes_reference"])
