"""ChimeraX command scripts (``.cxc``) that play the report's map and model series."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["chimerax_series_script"]


def chimerax_series_script(
    maps: Sequence[str],
    *,
    title: str,
    level: float | None = None,
    models: Sequence[str] = (),
    play: bool = True,
) -> str:
    """Return a ChimeraX command script (``.cxc`` text) that opens a map series and plays it as a movie.

    ChimeraX runs a ``.cxc`` with its own folder as the current directory, so ``maps`` and
    ``models`` are file names relative to the script. Lines starting with ``#`` are comments (a
    ``#`` inside a command line would be read as a model number, so comments have lines of
    their own).

    Parameters
    ----------
    maps
        The series' MRC files in order; their common ``prefix_`` + ``*.mrc`` glob must match
        exactly these files (ChimeraX sorts the glob, so number them with leading zeros).
    title
        What the series is (first comment line).
    level
        Contour level of the surfaces (map units); ChimeraX's automatic level when None.
    models
        Atomic models along the same series (PDB), played with ``mseries`` alongside the maps.
    play
        Play the maps back and forth in a loop (``vseries play``); False shows a slider instead
        (for unordered sets such as clusters).
    """
    if not maps:
        raise ValueError("a ChimeraX series script needs at least one map")
    stem = maps[0].rsplit("_", 1)[0]
    lines = [
        f"# {title}",
        "# Open in ChimeraX (File > Open, or the command `open <this file>`); file names are",
        "# relative to this script's folder, where ChimeraX runs it.",
        "# Close every open model first, so the map series becomes model #1.",
        "close",
        f"# Open {len(maps)} maps ({maps[0]} ... {maps[-1]}) as one volume series, in file-name order.",
        f"open {stem}_*.mrc vseries true",
    ]
    if level is not None:
        lines += [
            "# Show the maps as surfaces, contoured at the median of the reference inside the mask.",
            f"volume #1 style surface level {level:.6g}",
        ]
    else:
        lines += ["# Show the maps as surfaces (ChimeraX's initial contour level).", "volume #1 style surface"]
    if models:
        first, last = 2, 1 + len(models)
        lines += [
            f"# Open the {len(models)} deformed atomic models as models #{first}-{last}, one per map.",
            "open " + " ".join(models),
            f"cartoon #{first}-{last}",
        ]
    lines += ["# Fit everything in the view.", "view"]
    if play:
        lines += [
            "# Play the map series forward and backward in a loop, at most 4 maps per second",
            "# (stop with `vseries stop #1`).",
            "vseries play #1 loop true direction oscillate maxFrameRate 4",
        ]
        if models:
            lines += [
                "# Play the models as a model series, about 4 models per second at 60 frames/s,",
                "# repeated 1000 times.",
                f"mseries #{first}-{last} pauseFrames 15 loop 1000",
            ]
    else:
        lines += ["# A slider to step through the maps (and `vseries play #1` to play them).", "vseries slider #1"]
        if models:
            lines += ["# A slider for the models.", f"mseries slider #{first}-{last}"]
    return "\n".join(lines) + "\n"
