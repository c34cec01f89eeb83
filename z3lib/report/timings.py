"""Wall times and resolutions: stage timings, refinement rounds, another run's FSC beside this one's.

The per-stage timings come from Snakemake benchmark files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from z3lib import analysis as an
from z3lib.io import Z3InputError, read_table

__all__ = ["STAGE_ORDER", "compare_fsc", "read_round_timings", "read_stage_timings", "summarise_rounds"]

#: Pipeline order of the stages in the timing table (others follow, alphabetically).
STAGE_ORDER = (
    "simulate",
    "preprocess",
    "round_reference",
    "round_reference_half",
    "train",
    "train_half",
    "predict",
    "refine_chunk",
    "refine",
    "zart",
    "publish",
    "report",
)

#: The report's logger (the name it had before the report became a package).
_LOG = logging.getLogger("z3lib.report")


def read_stage_timings(benchmark_dir: str | Path | None) -> pd.DataFrame:
    """Per-stage timings from Snakemake benchmark files.

    Parameters
    ----------
    benchmark_dir
        ``benchmarks/<run>/``: one ``<rule>.tsv`` per rule and ``<rule>/<item>.tsv`` per job of a
        scattered rule (e.g. ``refine_chunk/1-of-2.tsv``).

    Returns
    -------
    one row per rule (pipeline order): ``stage``, ``jobs``, ``wall_s`` (sum over jobs; the jobs
    of a scattered rule may run in parallel), ``cpu_s`` (sum), ``max_rss_mb`` (max). Empty when
    the folder or the files are missing.
    """
    columns = ["stage", "jobs", "wall_s", "cpu_s", "max_rss_mb"]
    if benchmark_dir is None or not Path(benchmark_dir).is_dir():
        return pd.DataFrame(columns=columns)
    root = Path(benchmark_dir)
    files: dict[str, list[Path]] = {}
    folders = [root, *sorted(p for p in (root / "rounds").glob("*") if p.is_dir())]  # rounds/<k>/: summed
    for folder in folders:
        for path in sorted(folder.glob("*.tsv")):
            files.setdefault(path.stem, []).append(path)
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "rounds"):
            found = sorted(sub.glob("*.tsv"))
            if found:
                files.setdefault(sub.name, []).extend(found)
    rows = []
    for stage, paths in files.items():
        frames = []
        for path in paths:
            try:
                frames.append(read_table(path))
            except (OSError, ValueError) as exc:  # a foreign or empty file must not sink the report
                _LOG.warning("skipping benchmark file %s: %s", path, exc)
        if not frames:
            continue
        table = pd.concat(frames, ignore_index=True)

        def total(col: str, t: pd.DataFrame = table) -> float:
            return float(pd.to_numeric(t[col], errors="coerce").sum()) if col in t else float("nan")

        rss = pd.to_numeric(table["max_rss"], errors="coerce").max() if "max_rss" in table else np.nan
        rows.append(
            {
                "stage": stage,
                "jobs": len(table),
                "wall_s": total("s"),
                "cpu_s": total("cpu_time"),
                "max_rss_mb": float(rss),
            }
        )
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    rows.sort(key=lambda r: (order.get(str(r["stage"]), len(order)), str(r["stage"])))
    return pd.DataFrame(rows, columns=columns)


def read_round_timings(benchmark_dir: str | Path | None) -> dict[int, float]:
    """Return the wall time (s) of each refinement round.

    The sum of ``s`` over every benchmark file under ``benchmarks/<run>/rounds/<k>/`` (the jobs of a
    round, chunks included; jobs that ran in parallel are counted in full). Rounds without benchmark
    files are left out.

    Parameters
    ----------
    benchmark_dir
        ``benchmarks/<run>/``, or None (no rounds).

    Returns
    -------
    round number (1, 2, …) → wall time (s).
    """
    out: dict[int, float] = {}
    if benchmark_dir is None:
        return out
    for folder in sorted((Path(benchmark_dir) / "rounds").glob("*")):
        if not (folder.is_dir() and folder.name.isdigit()):
            continue
        total, found = 0.0, False
        for path in sorted(folder.rglob("*.tsv")):
            try:
                table = read_table(path)
            except (OSError, ValueError) as exc:
                _LOG.warning("skipping benchmark file %s: %s", path, exc)
                continue
            if "s" in table:
                total += float(pd.to_numeric(table["s"], errors="coerce").sum())
                found = True
        if found:
            out[int(folder.name)] = total
    return out


def summarise_rounds(
    fsc_tables: Sequence[pd.DataFrame], rms_median: Sequence[float], wall: Mapping[int, float]
) -> pd.DataFrame:
    """Tabulate the refinement rounds: one row per round (1, 2, …).

    Half-map FSC 0.143 and 0.5 resolutions (Å) of the corrected and uncorrected maps, the median
    RMS deformation (Å) and the wall time (s; NaN when the round has no benchmark files).

    Parameters
    ----------
    fsc_tables
        Per round, round 1 first: its ``fsc.tsv`` (``fsc_corrected``, ``fsc_uncorrected``, …).
    rms_median
        Per round: the median RMS deformation (Å); as many as ``fsc_tables``.
    wall
        Round number → wall time (s), from :func:`read_round_timings`.

    Returns
    -------
    Columns ``round``, ``corrected 0.143 (Å)``, ``corrected 0.5 (Å)``, ``uncorrected 0.143 (Å)``,
    ``uncorrected 0.5 (Å)``, ``median RMS deformation (Å)``, ``wall time (s)``.
    """
    rows = []
    for k, (fsc, rms) in enumerate(zip(fsc_tables, rms_median, strict=True), start=1):
        cor, unc = an.fsc_summary(fsc, "fsc_corrected"), an.fsc_summary(fsc, "fsc_uncorrected")
        rows.append(
            {
                "round": k,
                "corrected 0.143 (Å)": cor["fsc_0.143"],
                "corrected 0.5 (Å)": cor["fsc_0.5"],
                "uncorrected 0.143 (Å)": unc["fsc_0.143"],
                "uncorrected 0.5 (Å)": unc["fsc_0.5"],
                "median RMS deformation (Å)": float(rms),
                "wall time (s)": wall.get(k, float("nan")),
            }
        )
    return pd.DataFrame(rows)


def compare_fsc(this: pd.DataFrame, other: pd.DataFrame, *, other_name: str, source: str = "") -> pd.DataFrame:
    """Compare the corrected-map FSC of this run with another run's, shell by shell.

    Parameters
    ----------
    this, other
        Two ``fsc.tsv`` tables (``shell``, ``frequency`` in 1/Å, ``fsc_corrected``) of the same
        box and pixel size.
    other_name
        The other run's row label.
    source
        The other table's file, named in the error.

    Returns
    -------
    Rows ``this run``, ``other_name`` and ``difference`` (this − other); columns ``FSC area``
    (mean corrected FSC over the shells up to Nyquist), ``0.143 (Å)`` and ``0.5 (Å)``.

    Raises
    ------
    Z3InputError
        The tables have other shells or frequencies (another box or pixel size), or lack a column.
    """
    for name, table in ((source or other_name, other), ("this run's fsc.tsv", this)):
        missing = {"shell", "frequency", "fsc_corrected"} - set(table.columns)
        if missing:
            raise Z3InputError(f"{name}: column(s) {sorted(missing)} missing; expected a z3 zart/fsc.tsv")
    same = len(this) == len(other) and np.allclose(this["frequency"], other["frequency"], rtol=1e-4)
    if not same:
        raise Z3InputError(
            f"{source or other_name}: its FSC shells ({len(other)} up to "
            f"{float(other['frequency'].max()):.4f} 1/Å) are not this run's ({len(this)} up to "
            f"{float(this['frequency'].max()):.4f} 1/Å): compare runs of the same particles, box and pixel size"
        )
    rows = []
    for table in (this, other):
        res = an.fsc_summary(table, "fsc_corrected")
        area = an.fsc_area(pd.DataFrame({"fsc": table["fsc_corrected"]}))
        rows.append([area, res["fsc_0.143"], res["fsc_0.5"]])
    values = np.array(rows)
    return pd.DataFrame(
        np.vstack([values, values[0] - values[1]]),
        index=pd.Index(["this run", other_name, "difference"], name="corrected map"),
        columns=["FSC area", "0.143 (Å)", "0.5 (Å)"],
    )
