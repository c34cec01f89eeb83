"""Choosing particles from the landscape: selection files, criteria, the STAR and ``.cs`` exports,
and the interactive page in a real headless browser (issue 15, items 2 and 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import CHROMIUM, SKIP_REASON, body_attribute, chromium, console_errors, dump_dom
from matplotlib.path import Path as PolygonPath

from z3lib import conventions
from z3lib.io import Z3InputError, read_particles, write_cs
from z3lib.report.explorer import explorer_html
from z3lib.selection import (
    SELECTION_HEADER,
    SelectionCriteria,
    read_selection_file,
    select_rows,
    write_selection,
)

DATA = Path(__file__).parent / "data"
REAL_CS = DATA / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"  # a cryoSPARC refinement's export
OPTICS_STAR = DATA / "cryodrgn" / "relion31.6opticsgroups.star"  # RELION 3.1, 139 particles, 6 groups


def _landscape(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "particle": np.arange(n),
            "cluster": rng.integers(1, 4, n),
            "pc1": rng.normal(size=n),
            "pc2": 0.6 * rng.normal(size=n),
            "pc3": 0.3 * rng.normal(size=n),
            "umap1": 3.0 * rng.normal(size=n),
            "umap2": rng.normal(size=n),
            "deformation_rms_A": rng.uniform(0.5, 2.0, n),
        }
    )


# ----------------------------------------------------------------------------------------------
# cryoSPARC .cs export
# ----------------------------------------------------------------------------------------------
def test_cs_written_from_the_table_reproduces_a_real_cryosparc_export(tmp_path: Path) -> None:
    """The real refinement's particles, read and written again from their canonical table (the
    path a RELION STAR takes): cryoSPARC's field names and types, and the same poses (as rotations),
    shifts, CTF, pixel sizes, signs, images, exposure groups and half sets as cryoSPARC wrote."""
    real = np.load(REAL_CS)
    table = read_particles(REAL_CS).table
    written_path = tmp_path / "out.cs"
    write_cs(written_path, table)
    out = np.load(written_path, allow_pickle=False)
    assert len(out) == len(real) and len(np.unique(out["uid"])) == len(out)
    for name in out.dtype.names or ():
        if name not in ("uid", "blob/path", "ctf/type", "ctf/bfactor"):
            assert out.dtype[name] == real.dtype[name], name
    rotations = conventions.rotvec_to_matrix(out["alignments3D/pose"])
    np.testing.assert_allclose(rotations, conventions.rotvec_to_matrix(real["alignments3D/pose"]), atol=1e-6)
    for name in ("alignments3D/shift", "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm"):
        np.testing.assert_array_equal(out[name], real[name], err_msg=name)
    for name in ("blob/idx", "blob/shape", "blob/psize_A", "blob/sign", "ctf/exp_group_id", "alignments3D/split"):
        np.testing.assert_array_equal(out[name], real[name], err_msg=name)
    assert (out["blob/path"] == real["blob/path"]).all()


def test_cs_from_its_source_keeps_every_field_and_writes_only_changed_poses(tmp_path: Path) -> None:
    real = np.load(REAL_CS)
    table = read_particles(REAL_CS).table
    rows = np.array([7, 3, 1000])
    changed = table.iloc[rows].copy()
    changed.iloc[1, changed.columns.get_loc("psi")] += 10.0  # row 3: a refined in-plane angle
    changed.iloc[2, changed.columns.get_loc("defocus_u")] += 150.0  # row 1000: a refined defocus
    write_cs(tmp_path / "s.cs", changed, source=REAL_CS, source_rows=rows)
    out = np.load(tmp_path / "s.cs")
    assert out.dtype == real.dtype  # every field of cryoSPARC's file, passthrough ones included
    untouched = [n for n in real.dtype.names or () if n not in ("alignments3D/pose", "ctf/df1_A")]
    for name in untouched:
        np.testing.assert_array_equal(out[name], real[name][rows], err_msg=name)
    np.testing.assert_array_equal(out["alignments3D/pose"][[0, 2]], real["alignments3D/pose"][[7, 1000]])
    np.testing.assert_array_equal(out["ctf/df1_A"][[0, 1]], real["ctf/df1_A"][[7, 3]])
    assert out["ctf/df1_A"][2] == pytest.approx(real["ctf/df1_A"][1000] + 150.0)
    # the changed pose: RELION's A turned by +10° in-plane, i.e. R_z(10°) A
    a_old = conventions.cryosparc_pose_to_relion_matrix(real["alignments3D/pose"][3])
    turn = conventions.euler_to_matrix(0.0, 0.0, 10.0)
    a_new = conventions.cryosparc_pose_to_relion_matrix(out["alignments3D/pose"][1])
    np.testing.assert_allclose(a_new, turn @ a_old, atol=1e-6)
    with pytest.raises(Z3InputError, match="source rows"):
        write_cs(tmp_path / "bad.cs", changed, source=REAL_CS, source_rows=[1, 2])


# ----------------------------------------------------------------------------------------------
# Selection files and criteria
# ----------------------------------------------------------------------------------------------
def test_selection_file_forms_and_their_errors(tmp_path: Path) -> None:
    text = tmp_path / "selection.txt"
    text.write_text(f"{SELECTION_HEADER}\n5\n\n2\n5\n")
    np.testing.assert_array_equal(read_selection_file(text, 10), [2, 5])
    npy = tmp_path / "s.npy"
    np.save(npy, np.array([9, 0]))
    np.testing.assert_array_equal(read_selection_file(npy, 10), [0, 9])
    table = tmp_path / "picked.tsv"
    _landscape(10).iloc[[1, 4]].to_csv(table, sep="\t", index=False)
    np.testing.assert_array_equal(read_selection_file(table, 10), [1, 4])
    text.write_text("1\nthree\n")
    with pytest.raises(Z3InputError, match=r"line 2: 'three'"):
        read_selection_file(text, 10)
    text.write_text("1\n12\n")
    with pytest.raises(Z3InputError, match=r"row 12 is outside 0…9.*another run"):
        read_selection_file(text, 10)
    with pytest.raises(Z3InputError, match="select.file"):
        read_selection_file(tmp_path / "missing.txt", 10)


def test_criteria_intersect_and_name_what_is_wrong(tmp_path: Path) -> None:
    land = _landscape()
    pc1, cluster = land["pc1"].to_numpy(), land["cluster"].to_numpy()
    rows = select_rows(land, SelectionCriteria(clusters=(1, 3)))
    np.testing.assert_array_equal(rows, np.flatnonzero(np.isin(cluster, [1, 3])))
    rows = select_rows(land, SelectionCriteria(pc=(1, -0.5, None)))
    np.testing.assert_array_equal(rows, np.flatnonzero(pc1 >= -0.5))
    file = tmp_path / "sel.txt"
    file.write_text("\n".join(map(str, range(0, 400, 3))))
    rows = select_rows(land, SelectionCriteria(file=file, clusters=(2,), pc=(1, None, 0.0)))
    expect = np.flatnonzero((np.arange(400) % 3 == 0) & (cluster == 2) & (pc1 <= 0.0))
    np.testing.assert_array_equal(rows, expect)
    criteria = SelectionCriteria.from_config({"file": None, "clusters": [2], "pc": [2, None, 0.1]})
    assert criteria == SelectionCriteria(clusters=(2,), pc=(2, None, 0.1))
    with pytest.raises(Z3InputError, match="nothing to select: set select.file"):
        select_rows(land, SelectionCriteria())
    with pytest.raises(Z3InputError, match=r"cluster\(s\) \[7\] do not exist"):
        select_rows(land, SelectionCriteria(clusters=(7,)))
    with pytest.raises(Z3InputError, match="no column pc9"):
        select_rows(land, SelectionCriteria(pc=(9, None, None)))
    with pytest.raises(Z3InputError, match="the selection is empty"):
        select_rows(land, SelectionCriteria(pc=(1, 50.0, None)))


def test_selection_round_trip_keeps_every_row_and_column(tmp_path: Path) -> None:
    """A selection of a real RELION 3.1 STAR (6 optics groups) → STAR and .cs → read_particles:
    the chosen rows, every input column of the STAR, and the canonical values through the .cs."""
    source = read_particles(OPTICS_STAR)
    rows = np.array([0, 17, 40, 41, 99, 138])
    files = write_selection(tmp_path, rows, particles=OPTICS_STAR)
    star = read_particles(files["star"])
    assert list(star.raw.columns) == list(source.raw.columns)
    pd.testing.assert_frame_equal(star.raw, source.raw.iloc[rows].reset_index(drop=True), check_dtype=False)
    pd.testing.assert_frame_equal(star.optics, source.optics, check_dtype=False)
    back = read_particles(files["cs"]).table
    want = source.table.iloc[rows].reset_index(drop=True)
    for column in want.columns:
        if column == "image_path":  # resolved beside each metadata file
            continue
        if column == "image_name":  # N@stack: the .cs reader writes N with leading zeros
            split = [[(int(v.split("@")[0]), v.split("@")[1]) for v in t[column]] for t in (back, want)]
            assert split[0] == split[1]
            continue
        if want[column].dtype.kind == "f":
            np.testing.assert_allclose(back[column], want[column], atol=1e-4, err_msg=column)
        else:
            np.testing.assert_array_equal(back[column], want[column], err_msg=column)
    lines = files["indices"].read_text().splitlines()
    assert lines[0] == SELECTION_HEADER and [int(x) for x in lines[1:]] == rows.tolist()


# ----------------------------------------------------------------------------------------------
# The interactive page, in headless Chromium
# ----------------------------------------------------------------------------------------------
_PROBE = """<script>
window.addEventListener('error', function () { document.documentElement.setAttribute('data-errors', '1'); }, true);
window.addEventListener('load', function () {
  var out = {};
  try {
    var z = window.z3explorer, canvas = document.getElementById('plot');
    var fire = function (type, p, extra) {
      var init = { clientX: p[0], clientY: p[1], bubbles: true, pointerId: 1, button: 0, isPrimary: true };
      for (var k in (extra || {})) { init[k] = extra[k]; }
      canvas.dispatchEvent(new PointerEvent(type, init));
    };
    var drag = function (poly, extra) {
      var pts = poly.map(function (p) {
        var c = z.dataToClient(p[0], p[1]); return [Math.round(c[0]), Math.round(c[1])];
      });
      fire('pointerdown', pts[0], extra);
      for (var i = 1; i < pts.length; i++) { fire('pointermove', pts[i], extra); }
      fire('pointerup', pts[pts.length - 1], extra);
    };
    z.setView('pca'); z.setAxes('pc1', 'pc2'); z.setTool('lasso');
    drag(LASSO);
    out.lasso = z.selected(); out.lasso_shape = z.lastShape();
    z.setView('umap'); z.setTool('box');
    drag(BOX, { shiftKey: true });
    out.box_shape = z.lastShape(); out.union = z.selected();
    z.setColour('deformation');
    out.text = z.selectionText();
    out.status = document.getElementById('status').textContent;
  } catch (err) { out.error = String(err); }
  document.body.setAttribute('data-result', JSON.stringify(out));
});
</script>"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason=SKIP_REASON)
def test_landscape_page_selects_what_a_lasso_and_a_box_enclose(tmp_path: Path) -> None:
    """A scripted lasso on PCA, then a shift-box on UMAP (added), through the page's own pointer
    handlers: the rows chosen are those a point-in-polygon test (matplotlib) finds inside the
    shapes drawn, the shapes are where they were asked to be, and the saved text is the union."""
    land = _landscape()
    page = tmp_path / "landscape.html"
    page.write_text(explorer_html(land, run_name="probe"), encoding="utf-8")
    lasso = [[-1.0, -0.5], [1.0, -0.8], [1.2, 0.6], [0.0, 1.0], [-1.1, 0.4]]
    box = [[2.0, -0.5], [5.0, 1.5]]
    probe = _PROBE.replace("LASSO", json.dumps(lasso)).replace("BOX", json.dumps(box))
    test_page = tmp_path / "probe.html"
    test_page.write_text(page.read_text(encoding="utf-8").replace("</head>", probe + "</head>", 1), encoding="utf-8")
    dom = dump_dom(test_page, tmp_path)
    assert "data-errors" not in dom.split("<head", 1)[0]
    result = json.loads(body_attribute(dom, "data-result") or "{}")
    assert "error" not in result and "lasso" in result, result
    shape = np.asarray(result["lasso_shape"])
    assert np.abs(shape[: len(lasso)] - np.asarray(lasso)).max() < 0.02  # within a pixel of the ask
    pca = land[["pc1", "pc2"]].to_numpy()
    inside = PolygonPath(shape).contains_points(pca)
    assert 50 < inside.sum() < 350
    assert result["lasso"] == np.flatnonzero(inside).tolist()
    (x0, y0), (x1, y1) = result["box_shape"]
    assert np.abs(np.asarray([[x0, y0], [x1, y1]]) - np.asarray(box)).max() < 0.05
    u = land[["umap1", "umap2"]].to_numpy()
    in_box = (u[:, 0] >= x0) & (u[:, 0] <= x1) & (u[:, 1] >= y0) & (u[:, 1] <= y1)
    assert in_box.sum() > 10 and (in_box & ~inside).any()
    union = np.flatnonzero(inside | in_box)
    assert result["union"] == union.tolist()
    lines = result["text"].splitlines()
    assert lines[0].startswith(SELECTION_HEADER) and [int(x) for x in lines[1:]] == union.tolist()
    assert result["status"].startswith(f"{len(union)} of 400 particles selected (cluster 1:")
    saved = tmp_path / "selection.txt"
    saved.write_text(result["text"])
    np.testing.assert_array_equal(read_selection_file(saved, len(land)), union)


@pytest.mark.skipif(not CHROMIUM.exists(), reason=SKIP_REASON)
def test_landscape_page_loads_without_console_errors_and_fails_when_its_script_breaks(tmp_path: Path) -> None:
    page = tmp_path / "landscape.html"
    page.write_text(explorer_html(_landscape(50), run_name="x"), encoding="utf-8")
    good = chromium(["--enable-logging=stderr", "--v=0", f"--screenshot={tmp_path / 'a.png'}", page.as_uri()], tmp_path)
    assert good.returncode == 0 and not console_errors(good.stderr), console_errors(good.stderr)
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text(encoding="utf-8").replace("function inside(", "function inside((", 1))
    bad = chromium(
        ["--enable-logging=stderr", "--v=0", f"--screenshot={tmp_path / 'b.png'}", broken.as_uri()], tmp_path
    )
    assert any("Uncaught" in line for line in console_errors(bad.stderr)), bad.stderr[-1500:]
