"""Ground-truth datasets: maps from atomic models, a continuous motion, particles with CTF and noise.

Everything here is a pure function of its inputs and a seed. The images are rendered from the
atoms themselves (the exact projection of a sum of 3D Gaussians is a sum of 2D Gaussians with
the same σ), so the simulator does not share code with the projector it is used to test.
Positions are in pixels of the simulation box, relative to the centre ``N // 2``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
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
    """σ (Å) of the per-atom Gaussian for a target resolution (Å): ``0.225 · resolution``
    (ChimeraX ``molmap``'s rule)."""
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
    """A ``[z, y, x]`` map as a sum of isotropic 3D Gaussians, one per atom.

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


def build_motion(
    start: np.ndarray, end: np.ndarray, weights: np.ndarray, fit_mask: np.ndarray | None = None
) -> Motion:
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
            coords, weights, torch.tensor(rotations[lo:hi], dtype=torch.float32),
            torch.tensor(shifts[lo:hi], dtype=torch.float32), box, sigma_px,
        )
        params = CtfParams.create(du[lo:hi], dv[lo:hi], dang[lo:hi], voltage, cs, amplitude_contrast)
        clean[lo:hi] = apply_ctf(proj, pixel_size, params, pad=2).numpy()
    signal_var = float(clean.reshape(n, -1).var(axis=1).mean())
    noise_sigma = math.sqrt(signal_var / snr) if snr > 0 else 0.0
    images = clean + rng.normal(scale=noise_sigma, size=clean.shape).astype(np.float32)
    return SimulatedParticles(
        images=images, clean=clean, t=tt, rot=rot, tilt=tilt, psi=psi,
        shift_x=shifts[:, 0], shift_y=shifts[:, 1], defocus_u=du, defocus_v=dv,
        defocus_angle=dang, noise_sigma=noise_sigma,
    )


# ----------------------------------------------------------------------------------------------
# A complete ground-truth dataset on disk
# ----------------------------------------------------------------------------------------------
def make_mask(maps: list[np.ndarray], *, fraction: float = 0.05, dilate: int = 2) -> np.ndarray:
    """Mask covering every simulated state (see :func:`z3lib.geometry.threshold_mask`)."""
    from z3lib.geometry import threshold_mask

    return threshold_mask(maps, fraction=fraction, dilate=dilate)


def true_displacements(motion: Motion, t: npt.ArrayLike, reference_t: float) -> np.ndarray:
    """True atom displacements (Å) from the reference conformation to particles at ``t``.

    Returns ``(B, N, 3)`` (or ``(N, 3)`` for a scalar ``t``): ``(t − t_ref) · (end − start)``.
    """
    tt = np.asarray(t, dtype=np.float64) - float(reference_t)
    out: np.ndarray = tt[..., None, None] * (motion.end - motion.start)
    return out


def load_motion(path: str | Path) -> tuple[Motion, dict[str, float]]:
    """Read ``motion.npz`` written by :func:`simulate_dataset`: the motion and its scalars
    (``pixel_size``, ``box``, ``reference_t``, ``sigma`` in px)."""
    from z3lib.io import read_npz

    data = read_npz(path)
    motion = Motion(start=data["start"], end=data["end"], weights=data["weights"])
    scalars = {k: float(data[k]) for k in ("pixel_size", "box", "reference_t", "sigma")}
    return motion, scalars


def simulate_dataset(
    out_dir: str | Path,
    *,
    start_model: str | Path,
    end_model: str | Path,
    n_particles: int,
    box: int,
    pixel_size: float,
    resolution: float,
    snr: float,
    seed: int,
    reference_t: float = 0.5,
    shift_sigma: float = 1.0,
    defocus_min: float = 10000.0,
    defocus_max: float = 25000.0,
    t_range: tuple[float, float] = (0.0, 1.0),
    t_values: npt.ArrayLike | None = None,
    consensus: bool = True,
    log: logging.Logger | None = None,
) -> dict[str, Path]:
    """Simulate a flexible dataset with ground truth and write it as a RELION 3.1 project.

    The two models (same atoms, same order) are superposed on their Cα atoms and interpolated
    linearly; each particle takes ``t ~ U(t_range)``, or one of ``t_values`` at random (discrete
    states, e.g. ``(0, 1)`` for a two-state dataset). Files written in ``out_dir`` (atomically):

    ``particles.star`` + ``particles.mrcs``
        RELION 3.1 optics + particles with poses, shifts (Å), CTF and ``rlnRandomSubset``.
    ``ground_truth.tsv``
        per particle: ``t``, Euler angles, shifts (px), defocus.
    ``motion.npz``
        ``start``, ``end`` (Å, superposed and centred), ``weights``, ``pixel_size``, ``box``,
        ``reference_t``, ``sigma`` (px): the true displacement of every atom of every particle is
        ``(t − reference_t)(end − start)`` (see :func:`true_displacements`).
    ``reference.mrc``, ``mask.mrc``
        the consensus map reconstructed from the noisy particles with their poses and CTFs, and
        the mask derived from that map alone (:func:`z3lib.consensus.consensus_reference`): what
        a consensus refinement would hand over, so no ground truth reaches the pipeline's inputs.
        With ``consensus=False`` they are the true map at ``reference_t`` and a mask covering
        every state instead (for unit tests that need an exact reference).
    ``truth_reference.mrc``, ``state_start.mrc``, ``state_end.mrc``
        the true maps at ``reference_t``, 0 and 1 (ground truth: for evaluation only).
    ``reference_model.pdb``
        the atomic model at ``reference_t`` in the maps' frame (MRC origin at voxel 0: centred
        coordinates + ``(box // 2) · pixel_size``).

    Returns
    -------
    name → path of every file written.
    """
    import time

    from z3lib.io import (
        open_stack_writer,
        read_model,
        write_map,
        write_model_pdb,
        write_npz,
        write_star,
        write_table,
    )

    logger = log or logging.getLogger(__name__)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    start, end = read_model(start_model), read_model(end_model)
    if len(start) != len(end) or np.any(start.atom_names != end.atom_names):
        raise ValueError(
            f"{start_model} and {end_model} must hold the same atoms in the same order "
            f"({len(start)} vs {len(end)} atoms)"
        )
    weights = atom_weights(start.elements)
    ca = (start.atom_names == "CA") & (start.elements == "C")
    motion = build_motion(start.coords, end.coords, weights, ca if ca.any() else None)
    rng = np.random.default_rng(seed)
    if t_values is None:
        t = rng.uniform(t_range[0], t_range[1], size=n_particles)
    else:
        t = rng.choice(np.asarray(t_values, dtype=np.float64), size=n_particles)
    sim = simulate_particles(
        motion, n=n_particles, box=box, pixel_size=pixel_size, resolution=resolution, snr=snr,
        seed=seed + 1, t=t, shift_sigma=shift_sigma, defocus_range=(defocus_min, defocus_max),
    )
    logger.info("simulated %d particles of %d px in %.1f s (noise sigma %.3g)", n_particles, box,
                time.perf_counter() - t0, sim.noise_sigma)
    sigma_px = gaussian_sigma(resolution) / pixel_size
    paths = {name: out / fname for name, fname in (
        ("particles", "particles.star"), ("stack", "particles.mrcs"), ("ground_truth", "ground_truth.tsv"),
        ("motion", "motion.npz"), ("reference", "reference.mrc"), ("mask", "mask.mrc"),
        ("truth_reference", "truth_reference.mrc"), ("state_start", "state_start.mrc"),
        ("state_end", "state_end.mrc"),
        ("reference_model", "reference_model.pdb"),
    )}
    with open_stack_writer(paths["stack"], n_particles, box, pixel_size) as data:
        data[:] = sim.images
    maps = {}
    for name, tt in (("truth_reference", reference_t), ("state_start", 0.0), ("state_end", 1.0)):
        maps[name] = density_from_atoms(motion.at(tt) / pixel_size, weights, box, sigma_px)
        write_map(paths[name], maps[name], pixel_size)
    subset = rng.permutation(np.arange(n_particles) % 2) + 1
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [pixel_size],
        "rlnImageSize": [box], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
    })
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{paths['stack'].name}" for i in range(n_particles)],
        "rlnAngleRot": sim.rot, "rlnAngleTilt": sim.tilt, "rlnAnglePsi": sim.psi,
        "rlnOriginXAngst": sim.shift_x * pixel_size, "rlnOriginYAngst": sim.shift_y * pixel_size,
        "rlnDefocusU": sim.defocus_u, "rlnDefocusV": sim.defocus_v, "rlnDefocusAngle": sim.defocus_angle,
        "rlnPhaseShift": np.zeros(n_particles), "rlnCtfBfactor": np.zeros(n_particles),
        "rlnCtfScalefactor": np.ones(n_particles), "rlnOpticsGroup": np.ones(n_particles, dtype=int),
        "rlnRandomSubset": subset, "rlnClassNumber": np.ones(n_particles, dtype=int),
    })
    write_star(paths["particles"], {"optics": optics, "particles": particles})
    if consensus:
        from z3lib.consensus import consensus_reference

        consensus_reference(paths["particles"], paths["reference"], paths["mask"], seed=seed, log=logger)
    else:
        write_map(paths["reference"], maps["truth_reference"], pixel_size)
        write_map(paths["mask"], make_mask(list(maps.values())), pixel_size)
    write_table(paths["ground_truth"], pd.DataFrame({
        "particle": np.arange(n_particles), "t": sim.t, "rot": sim.rot, "tilt": sim.tilt, "psi": sim.psi,
        "shift_x_px": sim.shift_x, "shift_y_px": sim.shift_y, "defocus_u": sim.defocus_u,
        "defocus_v": sim.defocus_v, "defocus_angle": sim.defocus_angle,
    }))
    write_npz(paths["motion"], start=motion.start, end=motion.end, weights=motion.weights,
              pixel_size=float(pixel_size), box=float(box), reference_t=float(reference_t),
              sigma=float(sigma_px), snr=float(snr), resolution=float(resolution))
    # the atomic model of the reference conformation, in the maps' frame (MRC origin at voxel 0,
    # as ChimeraX and Coot place it): centred coordinates + the box centre in Å
    centre = box_center(box) * pixel_size
    write_model_pdb(paths["reference_model"], start, motion.at(reference_t) + centre)
    logger.info("wrote %s in %.1f s", ", ".join(p.name for p in paths.values()), time.perf_counter() - t0)
    return paths
