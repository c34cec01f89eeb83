"""Ground-truth datasets: maps from atomic models, a continuous motion, particles with CTF and noise.

Everything here is a pure function of its inputs and a seed. The images are rendered from the
atoms themselves (the exact projection of a sum of 3D Gaussians is a sum of 2D Gaussians with
the same σ), so the simulator does not share code with the projector it is used to test.
Positions are in pixels of the simulation box, relative to the centre ``N // 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from z3lib.conventions import box_center, matrix_to_euler
from z3lib.ctf import CtfParams, apply_ctf
from z3lib.geometry import random_rotations

#: Electron-scattering weights per element (≈ atomic number; hydrogens are skipped by default).
ELEMENT_WEIGHTS = {"H": 1.0, "C": 6.0, "N": 7.0, "O": 8.0, "P": 15.0, "S": 16.0}


def atom_weights(elements: list[str] | npt.ArrayLike, *, include_hydrogen: bool = False) -> np.ndarray:
    """Scattering weight of each atom (``(N,)``, ≈ atomic number; 0 for H unless asked)."""
    out = []
    for e in np.asarray(elements).tolist():
        e = str(e).strip().capitalize()
        if e == "H" and not include_hydrogen:
            out.append(0.0)
        else:
            out.append(ELEMENT_WEIGHTS.get(e, 6.0))
    return np.asarray(out, dtype=np.float64)


def gaussian_sigma(resolution: float) -> float:
    """Return σ (Å) of the per-atom Gaussian for a target resolution (Å).

    ``0.225 · resolution`` (ChimeraX ``molmap``'s rule).
    """
    return 0.225 * float(resolution)


def superpose(mobile: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Optimal rigid superposition (Kabsch) of ``mobile`` onto ``target``.

    Parameters
    ----------
    mobile, target
        ``(N, 3)`` matched coordinates.
    weights
        optional ``(N,)`` weights of the fit (e.g. 1 on Cα, 0 elsewhere).

    Returns
    -------
    ``(N, 3)`` ``mobile`` rotated and translated onto ``target``.
    """
    w = np.ones(len(mobile)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    cm, ct = (w[:, None] * mobile).sum(0), (w[:, None] * target).sum(0)
    h = ((mobile - cm) * w[:, None]).T @ (target - ct)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return (mobile - cm) @ r.T + ct  # type: ignore[no-any-return]


def density_from_atoms(
    coords: npt.ArrayLike,
    weights: npt.ArrayLike,
    box: int,
    sigma: float,
) -> np.ndarray:
    """Make a ``[z, y, x]`` map as a sum of isotropic 3D Gaussians, one per atom.

    Parameters
    ----------
    coords
        ``(N, 3)`` atom positions ``(x, y, z)`` in px relative to the box centre.
    weights
        ``(N,)`` atom weights.
    box
        side of the cubic map.
    sigma
        Gaussian σ in px.

    Returns
    -------
    ``(box, box, box)`` float32 map; each atom integrates to its weight (up to the grid's
    sampling), so maps at different conformations carry the same mass.
    """
    xyz = np.asarray(coords, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    keep = w > 0
    xyz, w = xyz[keep], w[keep]
    c = box_center(box)
    axis = np.arange(box) - c
    norm = 1.0 / (math.sqrt(2 * math.pi) * sigma)
    # separable: the map is Σ_a w_a g(z - z_a) g(y - y_a) g(x - x_a)
    gx = norm * np.exp(-0.5 * ((axis[None, :] - xyz[:, :1]) / sigma) ** 2)  # (N, box)
    gy = norm * np.exp(-0.5 * ((axis[None, :] - xyz[:, 1:2]) / sigma) ** 2)
    gz = norm * np.exp(-0.5 * ((axis[None, :] - xyz[:, 2:3]) / sigma) ** 2)
    # as matrix products over z-slabs: vol[z, y, :] = Σ_a (w_a gz[a, z] gy[a, y]) gx[a, :]
    vol = np.empty((box, box, box), dtype=np.float32)
    slab = max(1, (8 << 20) // max(1, len(w) * box))  # ≤ 8M doubles of left-hand side per product
    for z0 in range(0, box, slab):
        zs = slice(z0, min(box, z0 + slab))
        lhs = (w[:, None, None] * gz[:, zs, None] * gy[:, None, :]).reshape(len(w), -1)
        vol[zs] = (lhs.T @ gx).reshape(-1, box, box)
    return vol


def project_atoms(
    coords: torch.Tensor,
    weights: torch.Tensor,
    rotations: torch.Tensor,
    shifts: torch.Tensor,
    box: int,
    sigma: float,
) -> torch.Tensor:
    """Exact projections of Gaussian-atom maps, one conformation per particle.

    Parameters
    ----------
    coords
        ``(B, N, 3)`` atom positions (px, relative to the centre), one set per particle.
    weights
        ``(N,)`` atom weights.
    rotations
        ``(B, 3, 3)`` RELION ``A`` matrices.
    shifts
        ``(B, 2)`` origin shifts (px); an atom lands at ``(A p)_xy − s + N // 2``.
    box
        Side (px) of the images.
    sigma
        Gaussian σ (px).

    Returns
    -------
    ``(B, box, box)`` images ``[row = y, column = x]``.
    """
    xy = torch.einsum("bij,bnj->bni", rotations[:, :2, :], coords) - shifts[:, None, :]
    axis = torch.arange(box, dtype=coords.dtype, device=coords.device) - box_center(box)
    norm = 1.0 / (math.sqrt(2 * math.pi) * sigma)
    gu = norm * torch.exp(-0.5 * ((axis[None, None, :] - xy[..., :1]) / sigma) ** 2)  # (B, N, box)
    gv = norm * torch.exp(-0.5 * ((axis[None, None, :] - xy[..., 1:2]) / sigma) ** 2)
    return torch.einsum("bnr,n,bnc->brc", gv, weights.to(coords.dtype), gu)


@dataclass
class Motion:
    """A continuous motion between two states: ``x(t) = start + t · (end − start)``.

    ``start`` and ``end`` are ``(N, 3)`` superposed atom positions in Å, centred so that the
    mass-weighted centre of ``x(0.5)`` is the origin.
    """

    start: np.ndarray
    end: np.ndarray
    weights: np.ndarray

    def at(self, t: npt.ArrayLike) -> np.ndarray:
        """Atom positions (Å) at motion coordinates ``t``: ``(N, 3)`` for a scalar, else ``(B, N, 3)``."""
        tt = np.asarray(t, dtype=np.float64)
        out: np.ndarray = self.start + tt[..., None, None] * (self.end - self.start)
        return out


def build_motion(start: np.ndarray, end: np.ndarray, weights: np.ndarray, fit_mask: np.ndarray | None = None) -> Motion:
    """Superpose ``end`` on ``start`` (on ``fit_mask`` atoms, e.g. Cα) and centre the midpoint."""
    end_fit = superpose(end, start, None if fit_mask is None else fit_mask.astype(float))
    mid = 0.5 * (start + end_fit)
    w = weights / weights.sum()
    centre = (w[:, None] * mid).sum(0)
    return Motion(start=start - centre, end=end_fit - centre, weights=weights)


@dataclass
class SimulatedParticles:
    """Output of :func:`simulate_particles` (px of the simulation box)."""

    images: np.ndarray  # (n, box, box) float32 noisy images
    clean: np.ndarray  # (n, box, box) float32 CTF-applied, noise-free images
    t: np.ndarray  # (n,) motion coordinate
    rot: np.ndarray  # (n,) degrees
    tilt: np.ndarray
    psi: np.ndarray
    shift_x: np.ndarray  # (n,) px
    shift_y: np.ndarray
    defocus_u: np.ndarray  # (n,) Å
    defocus_v: np.ndarray
    defocus_angle: np.ndarray  # degrees
    noise_sigma: float


def simulate_particles(
    motion: Motion,
    *,
    n: int,
    box: int,
    pixel_size: float,
    resolution: float,
    snr: float,
    seed: int,
    t: npt.ArrayLike | None = None,
    shift_sigma: float = 1.0,
    defocus_range: tuple[float, float] = (10000.0, 25000.0),
    astigmatism: float = 400.0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    batch: int = 256,
) -> SimulatedParticles:
    """Simulate particle images along a motion.

    Each particle gets ``t ~ U(0, 1)`` (unless ``t`` is given), a uniformly random orientation,
    Gaussian shifts (σ ``shift_sigma`` px), defocus U ~ U(range), V = U − |N(0, astigmatism)|,
    a random astigmatism angle, the CTF (padded ×2), and white Gaussian noise whose variance is
    the mean clean-image variance divided by ``snr``.

    Returns
    -------
    :class:`SimulatedParticles` with float32 ``(n, box, box)`` stacks.
    """
    rng = np.random.default_rng(seed)
    tt = rng.uniform(0.0, 1.0, size=n) if t is None else np.broadcast_to(np.asarray(t, float), (n,)).copy()
    rotations = random_rotations(n, rng)
    rot, tilt, psi = matrix_to_euler(rotations)
    shifts = rng.normal(scale=shift_sigma, size=(n, 2))
    du = rng.uniform(*defocus_range, size=n)
    dv = du - np.abs(rng.normal(scale=astigmatism, size=n))
    dang = rng.uniform(-180.0, 180.0, size=n)
    sigma_px = gaussian_sigma(resolution) / pixel_size
    weights = torch.tensor(motion.weights, dtype=torch.float32)
    keep = weights > 0
    start = torch.tensor(motion.start / pixel_size, dtype=torch.float32)[keep]
    delta = torch.tensor((motion.end - motion.start) / pixel_size, dtype=torch.float32)[keep]
    weights = weights[keep]
    clean = np.empty((n, box, box), dtype=np.float32)
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        tb = torch.tensor(tt[lo:hi], dtype=torch.float32)
        coords = start[None] + tb[:, None, None] * delta[None]
        proj = project_atoms(
            coords,
            weights,
            torch.tensor(rotations[lo:hi], dtype=torch.float32),
            torch.tensor(shifts[lo:hi], dtype=torch.float32),
            box,
            sigma_px,
        )
        params = CtfParams.create(du[lo:hi], dv[lo:hi], dang[lo:hi], voltage, cs, amplitude_contrast)
        clean[lo:hi] = apply_ctf(proj, pixel_size, params, pad=2).numpy()
    signal_var = float(clean.reshape(n, -1).var(axis=1).mean())
    noise_sigma = math.sqrt(signal_var / snr) if snr > 0 else 0.0
    images = clean + rng.normal(scale=noise_sigma, size=clean.shape).astype(np.float32)
    return SimulatedParticles(
        images=images,
        clean=clean,
        t=tt,
        rot=rot,
        tilt=tilt,
        psi=psi,
        shift_x=shifts[:, 0],
        shift_y=shifts[:, 1],
        defocus_u=du,
        defocus_v=dv,
        defocus_angle=dang,
        noise_sigma=noise_sigma,
    )


# ----------------------------------------------------------------------------------------------
# A complete ground-truth dataset on disk
# ----------------------------------------------------------------------------------------------
def make_mask(maps: list[np.ndarray], *, fraction: float = 0.05, dilate: int = 2) -> np.ndarray:
    """Mask covering every simulated state (see :func:`z3lib.geometry.threshold_mask`)."""
    from z3lib.geometry import threshold_mask

    return threshold_mask(maps, fraction=fraction, dilate=dilate)


def true_displacements(motion: Motion, t: npt.ArrayLike, reference_t: float) -> np.ndarray:
    """Return the true atom displacements (Å) from the reference conformation to particles at ``t``.

    Returns ``(B, N, 3)`` (or ``(N, 3)`` for a scalar ``t``): ``(t − t_ref) · (end − start)``.
    """
    tt = np.asarray(t, dtype=np.float64) - float(reference_t)
    out: np.ndarray = tt[..., None, None] * (motion.end - motion.start)
    return out


def load_motion(path: str | Path) -> tuple[Motion, dict[str, float]]:
    """Read ``motion.npz`` written by :func:`z3lib.stages.simulate.simulate_dataset`.

    Returns the motion and its scalars (``pixel_size``, ``box``, ``reference_t``, ``sigma`` in px).
    """
    from z3lib.io import read_npz

    data = read_npz(path)
    motion = Motion(start=data["start"], end=data["end"], weights=data["weights"])
    scalars = {k: float(data[k]) for k in ("pixel_size", "box", "reference_t", "sigma")}
    return motion, scalars
