"""Ground-truth datasets of the honest yardstick: non-linear AdK motions, rendered and imaged by
code not written here.

Atoms → maps: gemmi's electron-scattering density calculator (``gemmi.DensityCalculatorE``) with
an isotropic blur B = 8π²σ², σ = 0.225 · 5 Å (a ~5 Å map). Maps → images: ASPIRE's
``Simulation`` (its NUFFT projector, its ``CTFFilter`` and its shifts), with ASPIRE's own
``Multiply(-1)`` appended so images follow RELION's sign (CTF(0) = +Q0). The second source,
``z3``, images the same atoms with ``z3lib.simulate.project_atoms`` and ``z3lib.ctf.apply_ctf``.

Motions (none is a straight line in the coefficients):

``hinge``
    the LID (residues 122–159) rotated rigidly about its hinge axis, angle ~ U(±θ) on 49 states;
    coordinate = angle (degrees); reference state = 0°.
``two_motions``
    the LID and the NMP domain (30–59) each rotated about its own hinge axis, independently, on a
    9×9 grid of angles in ±θ; coordinates = (LID angle, NMP angle); reference state = (0°, 0°).
``path``
    closed → intermediate (LID open, NMP closed) → open: first the LID, then the NMP moves by the
    rigid-body transform (screw interpolation) that takes its closed pose to its open pose (open
    model superposed on the CORE); 49 states equally spaced in arc length s ∈ [0, 1] (arc length
    = cumulative RMS heavy-atom displacement); reference state = s = 0.5.

A hinge axis comes from the geometry: it passes through the centroid of the Cα atoms within two
residues of the domain's two junctions with the core, along their principal axis (the line
joining the two junctions). Every particle is assigned one state at random; the noise is white
Gaussian, generated once per dataset with a fixed seed, with σ² = (mean clean-image energy inside
the inscribed disc) / SNR (ASPIRE's ``WhiteNoiseAdder.from_snr`` definition); the oracle's images
(every particle in the reference state: same poses, shifts, CTFs) get exactly the same noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "resources" / "demo"
LID = (122, 159)
NMP = (30, 59)
RESOLUTION = 5.0  # Å, the maps' nominal resolution (σ = 0.225 · resolution, ChimeraX molmap's rule)


@dataclass(frozen=True)
class SimParams:
    """Every parameter of one simulated dataset (the cache key hashes all of them)."""

    scenario: str  # hinge | path | two_motions
    source: str = "aspire"  # aspire | z3
    n: int = 5000
    box: int = 64
    pixel_size: float = 2.2  # Å
    snr: float = 0.1
    theta: float = 25.0  # degrees, hinge half-range
    states_1d: int = 49
    grid_2d: int = 9
    shift_sigma: float = 2.0  # px
    defocus_range: tuple[float, float] = (10000.0, 25000.0)  # Å
    astigmatism: float = 400.0  # Å
    micrographs: int = 250  # distinct CTFs (particles of one micrograph share one)
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """Hash of the parameters and of this module's source (a code change recomputes)."""
        text = json.dumps(asdict(self), sort_keys=True) + Path(__file__).read_text()
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Atoms and motions
# ----------------------------------------------------------------------------------------------
@dataclass
class Atoms:
    """Heavy atoms of the AdK models (same atoms, same order in both)."""

    closed: np.ndarray  # (N, 3) Å
    open: np.ndarray  # (N, 3) Å, superposed on the closed model's CORE Cα
    elements: list[str]
    residues: np.ndarray  # (N,) residue numbers
    is_ca: np.ndarray  # (N,) bool


def _element_of(name: str) -> str:
    """Protein atom name → element (first letter: CA → C, OT1 → O, SD → S, HT1 → H)."""
    return next(c for c in name if c.isalpha())


def _read_heavy(path: Path) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    import gemmi

    st = gemmi.read_structure(str(path))
    xyz, elements, residues, names = [], [], [], []
    for chain in st[0]:
        for res in chain:
            for atom in res:
                el = _element_of(atom.name)
                if el == "H":
                    continue
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                elements.append(el)
                residues.append(res.seqid.num)
                names.append(atom.name)
    return np.asarray(xyz, dtype=np.float64), elements, np.asarray(residues), names


def kabsch(mobile: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R and translation t minimising |R·mobile + t − target|² (rows are points)."""
    cm, ct = mobile.mean(0), target.mean(0)
    u, _, vt = np.linalg.svd((mobile - cm).T @ (target - ct))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, ct - r @ cm


def load_atoms() -> Atoms:
    """The demo's closed and open AdK (heavy atoms), the open one superposed on the CORE Cα."""
    closed, elements, residues, names = _read_heavy(DEMO / "adk_closed.pdb")
    opened, _, res_o, names_o = _read_heavy(DEMO / "adk_open.pdb")
    if names != names_o or not np.array_equal(residues, res_o):
        raise ValueError("adk_closed.pdb and adk_open.pdb must hold the same atoms in the same order")
    is_ca = np.asarray([n == "CA" for n in names])
    core = is_ca & ~in_range(residues, LID) & ~in_range(residues, NMP)
    r, t = kabsch(opened[core], closed[core])
    return Atoms(closed=closed, open=opened @ r.T + t, elements=elements, residues=residues, is_ca=is_ca)


def in_range(residues: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    return (residues >= span[0]) & (residues <= span[1])


def hinge_axis(atoms: Atoms, span: tuple[int, int], coords: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Point (Å) and unit direction of a domain's hinge axis: centroid and principal axis of the
    Cα atoms within two residues of the domain's two junctions with the core."""
    x = atoms.closed if coords is None else coords
    near = np.zeros(len(x), bool)
    for end in span:
        near |= np.abs(atoms.residues - end) <= 2
    pts = x[near & atoms.is_ca]
    centre = pts.mean(0)
    direction = np.linalg.svd(pts - centre, full_matrices=False)[2][0]
    return centre, direction / np.linalg.norm(direction)


def axis_rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """3×3 rotation by ``angle_deg`` about unit ``axis`` (Rodrigues)."""
    a = math.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def rotate_domain(
    coords: np.ndarray, select: np.ndarray, point: np.ndarray, axis: np.ndarray, angle_deg: float
) -> np.ndarray:
    out = coords.copy()
    r = axis_rotation(axis, angle_deg)
    out[select] = (coords[select] - point) @ r.T + point
    return out


def _rotvec(r: np.ndarray) -> np.ndarray:
    """Rotation matrix → rotation vector (axis · angle in radians)."""
    angle = math.acos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))
    if angle < 1e-12:
        return np.zeros(3)
    w = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * math.sin(angle))
    return w * angle


def _screw(start: np.ndarray, end: np.ndarray, alpha: float) -> np.ndarray:
    """Rigid interpolation at fraction ``alpha`` of the transform taking ``start`` onto the rigid
    fit of ``end``: rotation about the domain centroid by alpha·angle, centroid moved linearly."""
    r, _ = kabsch(start, end)
    rv = _rotvec(r)
    angle = float(np.linalg.norm(rv))
    c0, c1 = start.mean(0), end.mean(0)
    rot = axis_rotation(rv / angle, math.degrees(alpha * angle)) if angle > 0 else np.eye(3)
    return (start - c0) @ rot.T + c0 + alpha * (c1 - c0)


def path_coords(atoms: Atoms, alpha: float) -> np.ndarray:
    """Atoms at path parameter alpha ∈ [0, 2]: [0, 1] moves the LID, [1, 2] the NMP."""
    lid, nmp = in_range(atoms.residues, LID), in_range(atoms.residues, NMP)
    x = atoms.closed.copy()
    x[lid] = _screw(atoms.closed[lid], atoms.open[lid], min(alpha, 1.0))
    x[nmp] = _screw(atoms.closed[nmp], atoms.open[nmp], max(alpha - 1.0, 0.0))
    return x


@dataclass
class States:
    """The discrete states of a motion."""

    coords: np.ndarray  # (K, N, 3) Å, centred on the reference state's centroid
    coordinate: np.ndarray  # (K, D) the true motion coordinate(s) of each state
    names: list[str]  # D coordinate names
    reference: int  # index of the reference state


def build_states(params: SimParams, atoms: Atoms) -> States:
    lid, nmp = in_range(atoms.residues, LID), in_range(atoms.residues, NMP)
    if params.scenario == "hinge":
        angles = np.linspace(-params.theta, params.theta, params.states_1d)
        p, a = hinge_axis(atoms, LID)
        coords = np.stack([rotate_domain(atoms.closed, lid, p, a, g) for g in angles])
        coordinate, names = angles[:, None], ["lid_angle_deg"]
        ref = int(np.argmin(np.abs(angles)))
    elif params.scenario == "two_motions":
        g = np.linspace(-params.theta, params.theta, params.grid_2d)
        pl, al = hinge_axis(atoms, LID)
        pn, an = hinge_axis(atoms, NMP)
        grid = np.array([(u, v) for u in g for v in g])
        coords = np.stack([rotate_domain(rotate_domain(atoms.closed, lid, pl, al, u), nmp, pn, an, v) for u, v in grid])
        coordinate, names = grid, ["lid_angle_deg", "nmp_angle_deg"]
        ref = int(np.argmin(np.abs(grid).sum(1)))
    elif params.scenario == "path":
        fine = np.linspace(0.0, 2.0, 801)
        dense = np.stack([path_coords(atoms, a) for a in fine])
        step = np.sqrt(((dense[1:] - dense[:-1]) ** 2).sum(-1).mean(-1))
        arc = np.concatenate([[0.0], np.cumsum(step)])
        s = np.linspace(0.0, 1.0, params.states_1d)
        alpha = np.interp(s * arc[-1], arc, fine)
        coords = np.stack([path_coords(atoms, a) for a in alpha])
        coordinate, names = s[:, None], ["arc_length"]
        ref = int(np.argmin(np.abs(s - 0.5)))
    else:
        raise ValueError(f"unknown scenario {params.scenario!r}")
    coords = coords - coords[ref].mean(0)
    return States(coords=coords, coordinate=coordinate, names=names, reference=ref)


# ----------------------------------------------------------------------------------------------
# Maps (gemmi) and images (ASPIRE or z3)
# ----------------------------------------------------------------------------------------------
def blur_b(resolution: float = RESOLUTION) -> float:
    """Isotropic B (Å²) of a Gaussian with σ = 0.225 · resolution: B = 8π²σ²."""
    return 8 * math.pi**2 * (0.225 * resolution) ** 2


def render_maps(coords: np.ndarray, elements: list[str], box: int, pixel_size: float) -> np.ndarray:
    """Noise-free ``(K, box, box, box)`` float32 ``[z, y, x]`` maps of ``coords`` ``(K, N, 3)`` (Å,
    relative to the box centre, voxel ``box // 2``) with gemmi's electron density calculator."""
    import gemmi

    side = box * pixel_size
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(side, side, side, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    for i, el in enumerate(elements):
        res = gemmi.Residue()
        res.name, res.seqid = "UNK", gemmi.SeqId(i + 1, " ")
        atom = gemmi.Atom()
        atom.name, atom.element, atom.occ, atom.b_iso = el, gemmi.Element(el), 1.0, 0.0
        res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    model = st[0]
    atom_list = [a for ch in model for r in ch for a in r]
    dc = gemmi.DensityCalculatorE()
    dc.d_min = 2 * pixel_size
    dc.blur = blur_b()
    dc.grid.set_unit_cell(st.cell)
    dc.grid.set_size(box, box, box)
    out = np.empty((len(coords), box, box, box), dtype=np.float32)
    centre = (box // 2) * pixel_size
    for k, xyz in enumerate(coords):
        for atom, p in zip(atom_list, xyz + centre, strict=True):
            atom.pos = gemmi.Position(*p)
        dc.grid.fill(0.0)
        dc.add_model_density_to_grid(model)
        out[k] = np.array(dc.grid, copy=True).transpose(2, 1, 0)  # gemmi [x, y, z] → [z, y, x]
    return out


@dataclass
class Acquisition:
    """Per-particle imaging parameters, drawn once per dataset (RELION conventions)."""

    state: np.ndarray  # (n,) 0-based state index
    subset: np.ndarray  # (n,) rlnRandomSubset 1/2
    offsets: np.ndarray  # (n, 2) px, ASPIRE's offsets (written to the STAR by ASPIRE's metadata)
    micrograph: np.ndarray  # (n,) index into the CTF tables
    defocus_u: np.ndarray  # (micrographs,) Å
    defocus_v: np.ndarray
    defocus_angle: np.ndarray  # (micrographs,) radians (ASPIRE's unit)


def draw_acquisition(params: SimParams, n_states: int) -> Acquisition:
    rng = np.random.default_rng([params.seed, 11])
    m = params.micrographs
    du = rng.uniform(*params.defocus_range, size=m)
    dv = du - np.abs(rng.normal(scale=params.astigmatism, size=m))
    return Acquisition(
        state=rng.integers(0, n_states, size=params.n),
        subset=rng.permutation(np.arange(params.n) % 2) + 1,
        offsets=rng.normal(scale=params.shift_sigma, size=(params.n, 2)),
        micrograph=rng.integers(0, m, size=params.n),
        defocus_u=du,
        defocus_v=dv,
        defocus_angle=rng.uniform(0.0, math.pi, size=m),
    )


def aspire_images(
    params: SimParams, maps: np.ndarray, states: np.ndarray, acq: Acquisition, scratch: Path
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Clean CTF-modulated ASPIRE images ``(n, box, box)`` of ``maps[states]`` and the RELION
    metadata ASPIRE assigns (angles in degrees, origins in Å, CTF; defocus angle in degrees)."""
    scratch.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(scratch)  # importing aspire writes logs/ into the working directory
    try:
        from aspire.image.xform import Multiply
        from aspire.operators import CTFFilter
        from aspire.source import Simulation
        from aspire.volume import Volume

        filters = [
            CTFFilter(
                voltage=params.voltage,
                defocus_u=float(u),
                defocus_v=float(v),
                defocus_ang=float(a),
                Cs=params.cs,
                alpha=params.amplitude_contrast,
            )
            for u, v, a in zip(acq.defocus_u, acq.defocus_v, acq.defocus_angle, strict=True)
        ]
        sim = Simulation(
            n=params.n,
            vols=Volume(maps, pixel_size=params.pixel_size),
            states=np.asarray(states) + 1,  # ASPIRE's states are 1-based
            unique_filters=filters,
            filter_indices=acq.micrograph,
            offsets=acq.offsets.astype(np.float32),
            amplitudes=np.ones(params.n, dtype=np.float32),
            seed=params.seed,
            dtype=np.float32,
        )
        sim.generation_pipeline.add_xform(Multiply(-1))  # ASPIRE's CTF is −RELION's
        images = np.concatenate([sim.images[lo : lo + 1000].asnumpy() for lo in range(0, params.n, 1000)]).astype(
            np.float32
        )
        meta = sim.get_metadata(as_dict=True)
    finally:
        os.chdir(here)
    keep = (
        "_rlnAngleRot",
        "_rlnAngleTilt",
        "_rlnAnglePsi",
        "_rlnOriginXAngst",
        "_rlnOriginYAngst",
        "_rlnDefocusU",
        "_rlnDefocusV",
        "_rlnDefocusAngle",
        "_rlnVoltage",
        "_rlnSphericalAberration",
        "_rlnAmplitudeContrast",
    )
    out = {k: np.asarray(meta[k], dtype=np.float64) for k in keep}
    out["_rlnDefocusAngle"] = np.rad2deg(out["_rlnDefocusAngle"])  # ASPIRE writes radians
    return images, out


def z3_images(
    params: SimParams, coords: np.ndarray, elements: list[str], states: np.ndarray, meta: dict[str, np.ndarray]
) -> np.ndarray:
    """Clean images by z3's own renderer (Gaussian atoms, exact projection, z3's CTF) of the atoms
    ``coords[states]`` with the poses, shifts and CTFs in ``meta`` (RELION conventions)."""
    import torch

    from z3lib.conventions import euler_to_matrix
    from z3lib.ctf import CtfParams, apply_ctf
    from z3lib.simulate import atom_weights, gaussian_sigma, project_atoms

    apix = params.pixel_size
    w = torch.tensor(atom_weights(elements), dtype=torch.float32)
    rot = euler_to_matrix(meta["_rlnAngleRot"], meta["_rlnAngleTilt"], meta["_rlnAnglePsi"])
    shifts = np.stack([meta["_rlnOriginXAngst"], meta["_rlnOriginYAngst"]], 1) / apix
    sigma = gaussian_sigma(RESOLUTION) / apix
    out = np.empty((params.n, params.box, params.box), dtype=np.float32)
    for lo in range(0, params.n, 256):
        sl = slice(lo, min(params.n, lo + 256))
        xyz = torch.tensor(coords[states[sl]] / apix, dtype=torch.float32)
        proj = project_atoms(
            xyz,
            w,
            torch.tensor(rot[sl], dtype=torch.float32),
            torch.tensor(shifts[sl], dtype=torch.float32),
            params.box,
            sigma,
        )
        ctf = CtfParams.create(
            meta["_rlnDefocusU"][sl],
            meta["_rlnDefocusV"][sl],
            meta["_rlnDefocusAngle"][sl],
            params.voltage,
            params.cs,
            params.amplitude_contrast,
        )
        out[sl] = apply_ctf(proj, apix, ctf, pad=2).numpy()
    return out


def noise_sigma(clean: np.ndarray, snr: float) -> float:
    """σ of white noise at ``snr``: mean clean energy inside the inscribed disc (radius box // 2,
    ASPIRE's ``support_mask``) over the noise variance."""
    box = clean.shape[-1]
    yy, xx = np.indices((box, box)) - box // 2
    disc = np.hypot(yy, xx) < box // 2
    energy = float(np.mean(clean[:, disc].astype(np.float64) ** 2))
    return math.sqrt(energy / snr)


def write_star(path: Path, meta: dict[str, np.ndarray], stack_name: str, params: SimParams, subset: np.ndarray) -> None:
    """A RELION 3.1 particle STAR (optics + particles); no ground-truth column."""
    n = params.n
    lines = ["# version 30001", "", "data_optics", "", "loop_"]
    optics = {
        "_rlnOpticsGroup": 1,
        "_rlnOpticsGroupName": "opticsGroup1",
        "_rlnImagePixelSize": params.pixel_size,
        "_rlnImageSize": params.box,
        "_rlnImageDimensionality": 2,
        "_rlnVoltage": params.voltage,
        "_rlnSphericalAberration": params.cs,
        "_rlnAmplitudeContrast": params.amplitude_contrast,
    }
    lines += [f"{k} #{i + 1}" for i, k in enumerate(optics)]
    lines += [" ".join(str(v) for v in optics.values()), "", "", "# version 30001", "", "data_particles", "", "loop_"]
    cols = [
        "_rlnImageName",
        "_rlnAngleRot",
        "_rlnAngleTilt",
        "_rlnAnglePsi",
        "_rlnOriginXAngst",
        "_rlnOriginYAngst",
        "_rlnDefocusU",
        "_rlnDefocusV",
        "_rlnDefocusAngle",
        "_rlnOpticsGroup",
        "_rlnRandomSubset",
    ]
    lines += [f"{k} #{i + 1}" for i, k in enumerate(cols)]
    for i in range(n):
        vals = [f"{i + 1:06d}@{stack_name}"]
        vals += [f"{meta[k][i]:.6f}" for k in cols[1:9]]
        vals += ["1", str(int(subset[i]))]
        lines.append(" ".join(vals))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def write_mrcs(path: Path, stack: np.ndarray, pixel_size: float) -> None:
    import mrcfile

    tmp = path.with_name(path.name + ".tmp")
    with mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(stack.astype(np.float32))
        m.voxel_size = pixel_size
        m.set_image_stack()
    tmp.replace(path)


def write_map(path: Path, vol: np.ndarray, pixel_size: float) -> None:
    import mrcfile

    tmp = path.with_name(path.name + ".tmp")
    with mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(vol.astype(np.float32))
        m.voxel_size = pixel_size
    tmp.replace(path)


def simulate(params: SimParams, out: Path, log: Any = print) -> Path:
    """Write the dataset into ``out`` (cached: done when ``out/done`` exists).

    ``particles.star`` + ``particles.mrcs``: what the pipeline sees. ``oracle/particles.star``
    + ``.mrcs``: the same particles in the reference state, same noise. ``truth/``: ``truth.npz``
    (states' atoms, coordinates, per-particle state, RELION rotation angles) and
    ``reference_state.mrc`` (the noise-free reference-state map by the same renderer).
    """
    if (out / "done").exists():
        return out
    import time

    t0 = time.perf_counter()
    (out / "oracle").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    atoms = load_atoms()
    states = build_states(params, atoms)
    acq = draw_acquisition(params, len(states.coords))
    ref_states = np.full(params.n, states.reference)
    if params.source == "aspire":
        maps = render_maps(states.coords, atoms.elements, params.box, params.pixel_size)
        log(f"rendered {len(maps)} maps with gemmi in {time.perf_counter() - t0:.1f} s")
        clean, meta = aspire_images(params, maps, acq.state, acq, out / "scratch")
        clean_oracle, meta_o = aspire_images(
            params, maps[[states.reference]], np.zeros(params.n, int), acq, out / "scratch"
        )
        for k in meta:
            if not np.allclose(meta[k], meta_o[k]):
                raise RuntimeError(f"ASPIRE gave the oracle different {k}")
        truth_map = maps[states.reference]
    elif params.source == "z3":
        # the poses and CTFs drawn by ASPIRE's metadata for the same seed: one cheap 1-state render
        maps = render_maps(states.coords[[states.reference]], atoms.elements, params.box, params.pixel_size)
        _, meta = aspire_images(params, maps, np.zeros(params.n, int), acq, out / "scratch")
        clean = z3_images(params, states.coords, atoms.elements, acq.state, meta)
        clean_oracle = z3_images(params, states.coords, atoms.elements, ref_states, meta)
        from z3lib.simulate import atom_weights, density_from_atoms, gaussian_sigma

        truth_map = density_from_atoms(
            states.coords[states.reference] / params.pixel_size,
            atom_weights(atoms.elements),
            params.box,
            gaussian_sigma(RESOLUTION) / params.pixel_size,
        )
    else:
        raise ValueError(f"unknown source {params.source!r}")
    log(f"imaged {params.n} particles ({params.source}) in {time.perf_counter() - t0:.1f} s")
    sigma = noise_sigma(clean, params.snr)
    noise = np.random.default_rng([params.seed, 23]).normal(scale=sigma, size=clean.shape).astype(np.float32)
    write_mrcs(out / "particles.mrcs", clean + noise, params.pixel_size)
    write_star(out / "particles.star", meta, "particles.mrcs", params, acq.subset)
    write_mrcs(out / "oracle" / "particles.mrcs", clean_oracle + noise, params.pixel_size)
    write_star(out / "oracle" / "particles.star", meta, "particles.mrcs", params, acq.subset)
    write_map(out / "truth" / "reference_state.mrc", truth_map, params.pixel_size)
    np.savez(
        out / "truth" / "truth.npz",
        coords=states.coords,
        coordinate=states.coordinate,
        names=np.asarray(states.names),
        reference=states.reference,
        state=acq.state,
        rot=meta["_rlnAngleRot"],
        tilt=meta["_rlnAngleTilt"],
        psi=meta["_rlnAnglePsi"],
        noise_sigma=sigma,
        clean_sample=clean[:16],
        oracle_sample=clean_oracle[:16],
    )
    (out / "params.json").write_text(json.dumps(asdict(params), indent=1))
    (out / "done").write_text(f"{time.perf_counter() - t0:.1f} s\n")
    log(f"dataset written to {out} in {time.perf_counter() - t0:.1f} s (noise sigma {sigma:.4g})")
    return out
