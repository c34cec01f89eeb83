"""The report stage: landscape (PCA, UMAP, k-means), maps and models along motions, cluster
subsets for RELION, the Xmipp export and the self-contained HTML report (also rendered in
headless Chromium when it is installed)."""

from __future__ import annotations

import base64
import html.parser
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import starfile
from browser import CHROMIUM, SKIP_REASON, body_attribute, chromium, console_errors, dump_dom

from z3lib import analysis as an
from z3lib import zernike as zk
from z3lib.geometry import points_from_volume, sphere_mask
from z3lib.io import (
    read_map,
    read_model,
    read_particles,
    read_star_blocks,
    read_table,
    write_coefficients,
    write_map,
    write_npz,
    write_particles_star,
    write_table,
)
from z3lib.preprocess import fourier_crop
from z3lib.report import chimerax_series_script, make_report, read_stage_timings
from z3lib.simulate import load_motion
from z3lib.stages.simulate import simulate_dataset

ADK = Path(__file__).parent / "data" / "mdanalysistests_adk"


# ----------------------------------------------------------------------------------------------
# A tiny synthetic run: every input of the report stage, with a known motion
# ----------------------------------------------------------------------------------------------
N_PARTICLES, BOX, PROC_BOX, APIX = 40, 32, 24, 4.0
DEGREES = (3, 2)


def _build_run(root: Path) -> dict[str, Any]:
    """Simulated AdK particles (t ~ U(0, 1)) with their true fields as 'refined' coefficients,
    a 'preprocessed' reference at a smaller processing box, fake ZART maps and benchmark files."""
    sim = simulate_dataset(
        root / "simulate",
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=N_PARTICLES,
        box=BOX,
        pixel_size=APIX,
        resolution=10.0,
        snr=1.0,
        seed=5,
    )
    motion, _ = load_motion(sim["motion"])
    t = pd.read_csv(sim["ground_truth"], sep="\t")["t"].to_numpy()
    ref_px = motion.at(0.5) / APIX
    unit = zk.fit_coefficients(
        ref_px, (motion.end - motion.start) / APIX, *DEGREES, BOX / 2, "xmipp", weights=motion.weights
    )
    rng = np.random.default_rng(0)
    coeffs = (t - 0.5)[:, None] * unit[None] + rng.normal(scale=0.01, size=(N_PARTICLES, len(unit)))
    parts = read_particles(sim["particles"])
    refine = root / "refine"
    zernike = {"L1": DEGREES[0], "L2": DEGREES[1], "Rmax": BOX / 2, "basis": "xmipp", "box": BOX}
    write_particles_star(
        refine / "particles.star",
        parts,
        zernike=zernike,
        columns={
            "zernikeCoefficients": coeffs,
            "zernikeCost": rng.uniform(0.5, 0.6, N_PARTICLES),
            "zernikeRefineFlag": np.zeros(N_PARTICLES, dtype=np.int64),
        },
    )
    write_coefficients(refine / "coefficients.npy", coeffs)
    pre = root / "preprocess"
    apix = APIX * BOX / PROC_BOX
    reference = fourier_crop(read_map(sim["reference"]).data, PROC_BOX, ndim=3)
    mask = (fourier_crop(read_map(sim["mask"]).data, PROC_BOX, ndim=3) > 0.5).astype(np.float32)
    write_map(pre / "reference.mrc", reference, apix)
    write_map(pre / "mask.mrc", mask, apix)
    points, amplitudes = points_from_volume(reference, mask=mask)
    write_npz(
        pre / "points.npz",
        points=points.astype(np.float32),
        amplitudes=amplitudes.astype(np.float32),
        box=np.int64(PROC_BOX),
        pixel_size=np.float64(apix),
        original_box=np.int64(BOX),
        original_pixel_size=np.float64(APIX),
        step=np.int64(1),
    )
    zart = root / "zart"
    halves = [reference + rng.normal(scale=0.05 * reference.std(), size=reference.shape) for _ in range(2)]
    blurred = an.lowpass_filter(reference, apix, 30.0)
    write_map(zart / "corrected.mrc", 0.5 * (halves[0] + halves[1]), apix)
    write_map(zart / "uncorrected.mrc", blurred, apix)
    fsc_c = an.fourier_shell_correlation(halves[0], halves[1], apix)
    fsc_u = an.fourier_shell_correlation(
        blurred + rng.normal(scale=0.05, size=blurred.shape), blurred + rng.normal(scale=0.05, size=blurred.shape), apix
    )
    table = fsc_c[["shell", "frequency", "resolution"]].copy()
    table["fsc_corrected"], table["fsc_uncorrected"] = fsc_c["fsc"], fsc_u["fsc"]
    write_table(zart / "fsc.tsv", table)
    # another run of the same particles (say, the shared-network run beside this one): a straight
    # FSC line 1 − 2 f / f_max, which crosses 0.5 at f_max / 4 and 0.143 at 0.4285 f_max
    other = table.copy()
    other["fsc_corrected"] = 1.0 - 2.0 * other["frequency"] / other["frequency"].max()
    write_table(root / "results" / "shared_run" / "zart" / "fsc.tsv", other)
    bench = root / "benchmarks"
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for name, seconds in (
        ("simulate", 1.5),
        ("zart", 12.25),
        ("refine_chunk/1-of-2", 3.0),
        ("refine_chunk/2-of-2", 4.0),
    ):
        (bench / name).parent.mkdir(parents=True, exist_ok=True)
        (bench / f"{name}.tsv").write_text(header + f"{seconds}\t0:00:01\t300.5\t1\t1\t1\t0\t0\t50\t{seconds}\n")
    return {
        "sim": sim,
        "coeffs": coeffs,
        "t": t,
        "unit": unit,
        "parts": parts,
        "refine": refine,
        "pre": pre,
        "zart": zart,
        "bench": bench,
        "compare_fsc": root / "results" / "shared_run" / "zart" / "fsc.tsv",
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("report_run")
    data = _build_run(root)
    out = root / "report"
    data["out"] = out
    data["paths"] = make_report(
        out,
        particles=data["refine"] / "particles.star",
        coefficients=data["refine"] / "coefficients.npy",
        points=data["pre"] / "points.npz",
        reference=data["pre"] / "reference.mrc",
        mask=data["pre"] / "mask.mrc",
        corrected=data["zart"] / "corrected.mrc",
        uncorrected=data["zart"] / "uncorrected.mrc",
        fsc=data["zart"] / "fsc.tsv",
        zernike={"L1": DEGREES[0], "L2": DEGREES[1], "basis": "xmipp"},
        clusters=3,
        motion_steps=5,
        use_umap=True,
        model=data["sim"]["reference_model"],
        ground_truth=data["sim"]["ground_truth"],
        benchmarks=data["bench"],
        run_config={"run": "tiny", "report": {"clusters": 3}},
        run_name="tiny",
        seed=0,
        gold_standard="independent",
        compare_fsc=data["compare_fsc"],
    )
    return data


# ----------------------------------------------------------------------------------------------
# Landscape
# ----------------------------------------------------------------------------------------------
def test_pca_recovers_a_known_axis_with_a_deterministic_sign() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=12)
    v[3] = -5.0  # the largest loading is negative in v
    t = rng.uniform(-1, 1, 200)
    x = t[:, None] * v[None] + rng.normal(scale=0.01, size=(200, 12)) + 3.0
    pca = an.compute_pca(x)
    axis = pca.components[0]
    assert abs(abs(axis @ v) / np.linalg.norm(v) - 1) < 1e-3
    assert axis[np.argmax(np.abs(axis))] > 0  # documented orientation: largest loading positive
    np.testing.assert_allclose(an.compute_pca(-x).components[0], axis, atol=1e-9)  # same for −data
    assert np.corrcoef(pca.scores[:, 0], x[:, 3])[0, 1] > 0.99
    assert pca.explained_variance_ratio[0] > 0.99
    np.testing.assert_allclose(pca.explained_variance, pca.scores.var(axis=0, ddof=1), rtol=1e-9)


def test_kmeans_finds_separated_groups_deterministically() -> None:
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(c, 0.3, size=(m, 4)) for c, m in ((-5, 30), (0, 50), (5, 20))])
    labels, centres = an.cluster_kmeans(x, 3, seed=0, order_by=x[:, 0])
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], [30, 50, 20]))
    np.testing.assert_allclose(centres[:, 0], [-5, 0, 5], atol=0.2)
    again, _ = an.cluster_kmeans(x, 3, seed=0, order_by=x[:, 0])
    np.testing.assert_array_equal(again, labels)
    by_size, _ = an.cluster_kmeans(x, 3, seed=3)
    assert np.bincount(by_size).tolist() == [50, 30, 20]
    with pytest.raises(ValueError, match="k <= n"):
        an.cluster_kmeans(x[:2], 3)


def test_umap_below_15_particles_is_skipped_with_a_clear_message(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert an.compute_umap(np.zeros((14, 6))) is None
    assert "UMAP skipped: 14 particles, it needs at least 15" in caplog.text


# ----------------------------------------------------------------------------------------------
# Maps and models along fields
# ----------------------------------------------------------------------------------------------
def _blob(box: int, centre_xyz: tuple[float, float, float], sigma: float = 1.5) -> np.ndarray:
    ax = np.arange(box) - box // 2
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    cx, cy, cz = centre_xyz
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))


def _centroid_xyz(vol: np.ndarray) -> np.ndarray:
    ax = np.arange(vol.shape[0]) - vol.shape[0] // 2
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    return np.array([(v * vol).sum() for v in (x, y, z)]) / vol.sum()


def test_deform_map_zero_field_is_identity_and_mass_is_conserved() -> None:
    box = 24
    vol = _blob(box, (2.0, -1.0, 3.0)) + 0.1 * _blob(box, (-6.0, 5.0, 0.0), 3.0)
    mask = sphere_mask(box, 10)
    k = zk.count_terms(3, 2)
    spec = zk.ZernikeSpec(3, 2, "xmipp", box)
    np.testing.assert_allclose(an.deform_map(vol, np.zeros(3 * k), mask, spec), vol, atol=1e-6)
    c = np.random.default_rng(4).normal(scale=0.3, size=3 * k)  # |d| < 1.2 px: stays inside
    out = an.deform_map(vol, c, mask, zk.ZernikeSpec(3, 2, "xmipp", box))
    assert out.sum() == pytest.approx(vol.sum(), rel=1e-5)  # nothing pushed out of the box here
    outside = ~mask
    np.testing.assert_allclose(out[outside] - vol[outside] >= -1e-6, True)  # unmasked voxels only gain
    # the same field at a voxel: splatting moves a point mass to x + d(x)
    pt = np.zeros((box,) * 3)
    pt[box // 2 + 3, box // 2 - 2, box // 2 + 1] = 1.0  # (x, y, z) = (1, -2, 3)
    d = zk.deformation_field(zk.evaluate_basis(np.array([[1.0, -2.0, 3.0]]), 3, 2, box / 2, "xmipp"), c)[0]
    np.testing.assert_allclose(_centroid_xyz(an.deform_map(pt, c, mask, spec)), [1, -2, 3] + d, atol=1e-6)


def test_maps_along_a_known_motion_come_out_in_order() -> None:
    """A population whose coefficients are t·v (plus small noise): the PC1 series moves a blob
    monotonically along the field of v, by 4σ·d(v) from first to last map."""
    box = 32
    k = zk.count_terms(3, 2)
    rng = np.random.default_rng(6)
    v = np.zeros(3 * k)
    v[0] = 3.0  # constant term of c_x: a translation along x (the largest loading, positive)
    v[k + 2] = 1.0  # plus a smaller y component that varies with position
    t = rng.uniform(-1, 1, 60)
    population = t[:, None] * v[None] + rng.normal(scale=0.02, size=(60, 3 * k))
    pca = an.compute_pca(population)
    path, s = an.component_path(pca, 0, steps=7, extent=2.0)
    assert np.all(np.diff(s) > 0)
    blob_at = (4.0, -2.0, 1.0)
    vol = _blob(box, blob_at)
    mask = sphere_mask(box, 12)
    maps = an.deform_maps(vol, path, mask, zk.ZernikeSpec(3, 2, "xmipp", box))
    centroids = np.array([_centroid_xyz(m) for m in maps])
    z = zk.evaluate_basis(np.array([blob_at]), 3, 2, box / 2, "xmipp")
    direction = zk.deformation_field(z, v)[0]
    along = centroids @ direction / np.linalg.norm(direction)
    assert np.all(np.diff(along) > 0), along
    expected = np.array(blob_at) + zk.deformation_field(z, path)[:, 0]
    np.testing.assert_allclose(centroids, expected, atol=0.05)
    # the same motion written as −t·v gives the same (oriented) series
    flipped = an.component_path(an.compute_pca(-population), 0, steps=7)[0]
    np.testing.assert_allclose(flipped - flipped.mean(0), path - path.mean(0), atol=1e-8)


def test_deforming_the_reference_model_by_its_true_field_reproduces_the_end_states(tmp_path: Path) -> None:
    """The t = 0.5 AdK model (simulate's reference_model.pdb), moved by the true field to t = 0 and
    t = 1 fitted in the (7, 7) orthonormal basis, lands on the true end states.

    Measured: Cα RMSD 0.40 Å (all atoms 0.81 Å) for both ends; the undeformed model is 3.45 Å
    (Cα) away. Tolerance: Cα < 0.6 Å, all atoms < 1.2 Å, while the undeformed model is > 3 Å away.
    """
    box, apix = 40, 3.0
    sim = simulate_dataset(
        tmp_path,
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=2,
        box=box,
        pixel_size=apix,
        resolution=8.0,
        snr=1.0,
        seed=1,
    )
    motion, _ = load_motion(sim["motion"])
    model = read_model(sim["reference_model"])
    ca = (model.atom_names == "CA") & (model.elements == "C")
    centre = (box // 2) * apix
    ref_px = (model.coords - centre) / apix
    for t_end in (0.0, 1.0):
        truth = motion.at(t_end) + centre
        coeffs = zk.fit_coefficients(
            ref_px, (t_end - 0.5) * (motion.end - motion.start) / apix, 7, 7, box / 2, "orthonormal"
        )
        moved = an.deform_model(model.coords, coeffs, zk.ZernikeSpec(7, 7, "orthonormal", box), apix)

        def rmsd(a: np.ndarray, sel: np.ndarray, truth: np.ndarray = truth) -> float:
            return math.sqrt(((a[sel] - truth[sel]) ** 2).sum(1).mean())

        assert rmsd(model.coords, ca) > 3.0
        assert rmsd(moved, ca) < 0.6
        assert rmsd(moved, np.ones(len(ca), bool)) < 1.2
    # a batch of fields gives a batch of models; a zero field moves nothing
    zero = an.deform_model(
        model.coords, np.zeros((2, 3 * zk.count_terms(3, 2))), zk.ZernikeSpec(3, 2, "xmipp", box), apix
    )
    np.testing.assert_allclose(zero, np.broadcast_to(model.coords, zero.shape), atol=1e-9)


def test_mean_deformation_map_of_a_translation_is_its_length() -> None:
    box = 20
    k = zk.count_terms(3, 2)
    z0 = float(zk.evaluate_basis(np.zeros((1, 3)), 3, 2, box / 2, "xmipp")[0, 0])
    c = np.zeros((2, 3 * k))
    c[0, 0], c[1, k] = 1.0 / z0, 3.0 / z0  # |d| = 1 px and 3 px everywhere
    mask = sphere_mask(box, 6)
    out = an.mean_deformation_map(c, mask, zk.ZernikeSpec(3, 2, "xmipp", box), pixel_size=2.0)
    np.testing.assert_allclose(out[mask], 4.0, rtol=1e-6)  # mean(1, 3) px × 2 Å/px
    assert not out[~mask].any()


# ----------------------------------------------------------------------------------------------
# Outputs of make_report
# ----------------------------------------------------------------------------------------------
def test_cluster_stars_round_trip_with_every_input_column(run: dict[str, Any]) -> None:
    parts = run["parts"]
    refine = read_particles(run["refine"] / "particles.star")
    land = pd.read_csv(run["out"] / "landscape.tsv", sep="\t")
    assert len(land) == N_PARTICLES and sorted(land["cluster"].unique()) == [1, 2, 3]
    seen = []
    for j in (1, 2, 3):
        sub = read_particles(run["out"] / "clusters" / f"cluster_{j:02d}.star")
        rows = np.nonzero(land["cluster"].to_numpy() == j)[0]
        assert list(sub.raw.columns) == list(refine.raw.columns)  # every input column, same order
        assert set(parts.raw.columns) < set(sub.raw.columns)
        pd.testing.assert_frame_equal(sub.raw.reset_index(drop=True), refine.raw.iloc[rows].reset_index(drop=True))
        pd.testing.assert_frame_equal(sub.optics, refine.optics)
        blocks = read_star_blocks(run["out"] / "clusters" / f"cluster_{j:02d}.star")
        assert int(blocks["zernike3d"]["box"].iloc[0]) == BOX
        cs = read_particles(run["out"] / "clusters" / f"cluster_{j:02d}.cs").table  # for cryoSPARC
        want = refine.table.iloc[rows].reset_index(drop=True)
        for column in ("image_index", "rot", "tilt", "psi", "shift_x", "shift_y", "defocus_u", "optics_group"):
            np.testing.assert_allclose(cs[column], want[column], atol=1e-4, err_msg=column)
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(N_PARTICLES))
    # clusters are numbered by increasing mean PC1 score
    means = land.groupby("cluster")["pc1"].mean().to_numpy()
    assert np.all(np.diff(means) > 0)


def test_xmd_export_is_parseable_with_the_coefficients(run: dict[str, Any]) -> None:
    block = starfile.read(run["out"] / "particles.xmd", always_dict=True)[""]
    assert len(block) == N_PARTICLES
    for label in (
        "image",
        "angleRot",
        "angleTilt",
        "anglePsi",
        "shiftX",
        "shiftY",
        "ctfDefocusU",
        "ctfDefocusV",
        "ctfDefocusAngle",
        "ctfSphericalAberration",
        "ctfVoltage",
        "ctfQ0",
        "sphCoefficients",
        "sphDeformation",
        "cost",
        "itemId",
        "enabled",
    ):
        assert label in block.columns, label
    coeffs = np.array([[float(x) for x in str(v).split()] for v in block["sphCoefficients"]])
    assert coeffs.shape == (N_PARTICLES, 3 * zk.count_terms(*DEGREES))
    np.testing.assert_array_equal(coeffs, run["coeffs"])
    table = run["parts"].table
    np.testing.assert_allclose(block["shiftX"], table["shift_x"])  # px, RELION's sign
    np.testing.assert_allclose(block["angleTilt"], table["tilt"])
    assert block["image"].tolist() == table["image_name"].tolist()
    text = (run["out"] / "particles.xmd").read_text()
    assert "'" + " ".join(repr(v) for v in run["coeffs"][0].tolist()) + "'" in text


def test_motion_series_maps_models_and_chimerax_scripts(run: dict[str, Any]) -> None:
    motion = run["out"] / "motion"
    for pc in (1, 2):
        maps = [motion / f"motion_pc{pc}_{i:02d}.mrc" for i in range(1, 6)]
        models = [motion / f"motion_pc{pc}_{i:02d}.pdb" for i in range(1, 6)]
        assert all(p.is_file() for p in maps + models)
        assert sorted(motion.glob(f"motion_pc{pc}_*.mrc")) == maps  # the .cxc glob matches exactly these
        m = read_map(maps[0])
        assert m.data.shape == (PROC_BOX,) * 3 and m.pixel_size == pytest.approx(APIX * BOX / PROC_BOX)
        script = (motion / f"motion_pc{pc}.cxc").read_text()
        assert f"open motion_pc{pc}_*.mrc vseries true" in script
        assert "vseries play #1 loop true direction oscillate maxFrameRate 4" in script
        assert "open " + " ".join(p.name for p in models) in script
        assert "mseries #2-6 pauseFrames 15 loop 1000" in script
        for line in script.splitlines():  # comments only on lines of their own
            assert line.startswith("#") or "#" not in line or re.search(r"#\d", line), line
    # the PC1 models move the atoms along the simulated motion, in order (PC1 ~ t here)
    cas = []
    for i in range(1, 6):
        model = read_model(motion / f"motion_pc1_{i:02d}.pdb")
        cas.append(model.coords[model.atom_names == "CA"])
    travel = np.array([np.sqrt(((c - cas[0]) ** 2).sum(1).mean()) for c in cas])
    assert np.all(np.diff(travel) > 0)
    assert (run["out"] / "clusters" / "clusters.cxc").read_text().count("vseries slider #1") == 1


def test_stage_timings_are_read_from_benchmark_files(run: dict[str, Any]) -> None:
    timings = read_stage_timings(run["bench"])
    assert timings["stage"].tolist() == ["simulate", "refine_chunk", "zart"]
    row = timings.set_index("stage").loc["refine_chunk"]
    assert row["jobs"] == 2 and row["wall_s"] == pytest.approx(7.0)
    assert read_stage_timings(run["bench"] / "missing").empty


class _HtmlChecker(html.parser.HTMLParser):
    VOID: ClassVar[set[str]] = {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
    }

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        if tag in ("script", "iframe", "object", "link"):
            self.errors.append(f"<{tag}> in a self-contained report")
        if tag == "a":
            self.links.append(dict(attrs).get("href") or "")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def test_report_is_valid_self_contained_html_with_every_figure(run: dict[str, Any]) -> None:
    page = (run["out"] / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    checker = _HtmlChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert not checker.stack, f"unclosed tags: {checker.stack}"
    alts = []
    for img in checker.images:
        src = str(img.get("src"))
        match = re.fullmatch(r"data:image/(png|svg\+xml);base64,([A-Za-z0-9+/=]+)", src)
        assert match, src[:60]
        data = base64.b64decode(match.group(2), validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n") if match.group(1) == "png" else b"<svg" in data[:500]
        alts.append(img.get("alt"))
    assert alts == [
        "PCA landscape",
        "UMAP landscape",
        "motion series",
        "mean deformation magnitude",
        "FSC curves",
        "central slices",
    ]
    for href in checker.links:  # every link points to a file of the report (or a section)
        assert href.startswith("#") or (run["out"] / href).is_file(), href
    for text in (
        "FSC table",
        "Timings",
        "refine_chunk",
        "Run parameters",
        "&quot;clusters&quot;: 3",
        "cluster_01.star",
        "cluster_01.cs",
        "landscape.html",
        "motion_pc1.cxc",
        "particles.xmd",
        "|Spearman| PC1 vs true t",
    ):
        assert text in page, text
    for stem in ("landscape_pca", "landscape_umap", "fsc"):
        assert (run["out"] / f"{stem}.png").is_file() and (run["out"] / f"{stem}.svg").is_file()
    assert (run["out"] / "mean_deformation.mrc").is_file()


def test_report_landscape_follows_the_simulated_motion(run: dict[str, Any]) -> None:
    land = pd.read_csv(run["out"] / "landscape.tsv", sep="\t")
    assert abs(np.corrcoef(land["pc1"], run["t"])[0, 1]) > 0.99
    assert {"umap1", "umap2", "true_t", "deformation_rms_A"} <= set(land.columns)


def test_chimerax_script_without_models_uses_the_glob_of_the_series() -> None:
    text = chimerax_series_script(["a_01.mrc", "a_02.mrc"], title="t", level=None, play=False)
    assert "open a_*.mrc vseries true" in text and "vseries slider #1" in text and "mseries" not in text


# ----------------------------------------------------------------------------------------------
# Headless Chromium (Debian's chromium package, tests/browser.py)
# ----------------------------------------------------------------------------------------------
# Injected into a copy of the report only: marks every image that failed to decode, and counts
# script errors, in attributes that --dump-dom shows. The report itself has no script.
_PROBE = """<script>
window.addEventListener('error', function () {
  var root = document.documentElement;
  root.setAttribute('data-errors', String(1 + Number(root.getAttribute('data-errors') || 0)));
}, true);
window.addEventListener('load', function () {
  var imgs = document.images, bad = 0;
  for (var i = 0; i < imgs.length; i++) { if (!imgs[i].complete || imgs[i].naturalWidth === 0) { bad++; } }
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken', String(bad));
});
</script>"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason=SKIP_REASON)
def test_report_renders_in_headless_chromium(run: dict[str, Any], tmp_path: Path) -> None:
    page = run["out"] / "report.html"
    shot = tmp_path / "report.png"
    result = chromium(
        ["--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()], tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.is_file() and shot.read_bytes().startswith(b"\x89PNG")
    assert not console_errors(result.stderr), console_errors(result.stderr)
    if os.environ.get("Z3_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["Z3_REPORT_SCREENSHOT"])
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</head>", _PROBE + "</head>", 1), encoding="utf-8")
    dom = dump_dom(probe, tmp_path)
    assert body_attribute(dom, "data-images") == "6" and body_attribute(dom, "data-broken") == "0", dom[:300]
    assert "data-errors" not in dom.split("<head", 1)[0]


@pytest.mark.skipif(not CHROMIUM.exists(), reason=SKIP_REASON)
def test_report_landscape_page_loads_with_every_particle(run: dict[str, Any], tmp_path: Path) -> None:
    """The run's interactive landscape (report/landscape.html) loads without errors, holds every
    particle of landscape.tsv, and a box over everything selects all of them."""
    page = run["out"] / "landscape.html"
    assert 'href="landscape.html"' in (run["out"] / "report.html").read_text(encoding="utf-8")
    result = chromium(
        ["--enable-logging=stderr", "--v=0", f"--screenshot={tmp_path / 'l.png'}", page.as_uri()], tmp_path
    )
    assert result.returncode == 0 and not console_errors(result.stderr), result.stderr[-2000:]
    probe = tmp_path / "probe.html"
    script = (
        "<script>window.addEventListener('load', function () { var z = window.z3explorer;"
        " z.setTool('box'); var c = document.getElementById('plot'), r = c.getBoundingClientRect();"
        " var f = function (t, x, y) {"
        " c.dispatchEvent(new PointerEvent(t, {clientX: x, clientY: y, bubbles: true})); };"
        " f('pointerdown', r.left + 1, r.top + 1); f('pointermove', r.right - 2, r.bottom - 2);"
        " f('pointerup', r.right - 2, r.bottom - 2);"
        " document.body.setAttribute('data-n', String(z.selected().length)); });</script>"
    )
    probe.write_text(page.read_text(encoding="utf-8").replace("</head>", script + "</head>", 1), encoding="utf-8")
    n = len(read_table(run["out"] / "landscape.tsv"))
    assert body_attribute(dump_dom(probe, tmp_path), "data-n") == str(n)


def test_fsc_comparison_with_another_run_is_tabulated_in_the_report(run: dict[str, Any]) -> None:
    """Item 4 of issue 11: the FSC difference against another run (the shared-network one) is
    shown. The other run's curve is the line 1 − 2 f / f_max over n shells f_k = k f_max / n: its
    area (the mean of 1 − 2k/n over k = 1..n) is −1/n, it crosses 0.5 at f_max / 4 and 0.143 at
    (1 − 0.143) / 2 · f_max; this run's row is its own fsc.tsv's."""
    from z3lib.report.timings import compare_fsc

    this = pd.read_csv(run["zart"] / "fsc.tsv", sep="\t")
    other = pd.read_csv(run["compare_fsc"], sep="\t")
    f_max, n = float(other["frequency"].max()), len(other)
    table = compare_fsc(this, other, other_name="shared_run")
    assert list(table.index) == ["this run", "shared_run", "difference"]
    assert table.loc["shared_run", "FSC area"] == pytest.approx(-1.0 / n, abs=1e-6)
    assert table.loc["shared_run", "0.5 (Å)"] == pytest.approx(4.0 / f_max, rel=1e-6)
    assert table.loc["shared_run", "0.143 (Å)"] == pytest.approx(2.0 / ((1 - 0.143) * f_max), rel=1e-6)
    assert table.loc["this run", "FSC area"] == pytest.approx(this["fsc_corrected"].mean(), abs=1e-12)
    assert table.loc["difference"].to_numpy() == pytest.approx(
        (table.loc["this run"] - table.loc["shared_run"]).to_numpy()
    )
    page = (run["out"] / "report.html").read_text(encoding="utf-8")
    section = page[page.index("gold standard: independent) beside shared_run") :]
    assert "difference" in section[:3000] and str(run["compare_fsc"]) in section[:3000]
    assert f"{table.loc['difference', 'FSC area']:.4f}" in section[:3000]
    # a run of another box or pixel size cannot be compared shell by shell
    with pytest.raises(ValueError, match="other.tsv.*same particles, box and pixel size"):
        compare_fsc(this, other.iloc[:-3], other_name="x", source="other.tsv")
