"""The library's shape (issue 13, items 3 and 4): every module imports on its own (no import
cycle hides behind an import order), the light modules do not import torch, and no file or
function grows past what one reader takes in (800 lines a file, 100 lines a function)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "z3lib"
MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 100
#: Importing these must not import torch (file formats, conventions, basis, CTF, device choice).
TORCH_FREE = [
    "z3lib.io",
    "z3lib.conventions",
    "z3lib.zernike",
    "z3lib.ctf",
    "z3lib.devices",
    "z3lib.settings",
    "z3lib.arrays",
]


def _modules() -> list[str]:
    names = []
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, in an interpreter that holds no z3lib module yet: an import
    cycle fails for the module whose import enters it first, whichever that is."""
    modules = _modules()
    assert {"z3lib.decoder", "z3lib.network", "z3lib.training", "z3lib.devices", "z3lib.stages.train"} <= set(modules)
    code = f"""
import importlib, sys, traceback
failed = []
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m == "z3lib" or m.startswith("z3lib.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc())
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module", TORCH_FREE)
def test_light_modules_do_not_import_torch(module: str) -> None:
    result = _run(f"import sys, {module}; assert 'torch' not in sys.modules, sorted(sys.modules)")
    assert result.returncode == 0, result.stderr[-2000:]


def test_zernike_does_not_import_the_file_layer() -> None:
    """The basis is below the file layer: ``z3lib.io`` imports ``z3lib.zernike``, never the reverse."""
    result = _run("import sys, z3lib.zernike; assert 'z3lib.io' not in sys.modules, sorted(sys.modules)")
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_file_is_over_800_lines() -> None:
    long = {
        str(p.relative_to(REPO)): n
        for p in sorted(LIBRARY.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_over_100_lines() -> None:
    """From ``def`` (its decorators included) to its last line, docstring included."""
    long = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                assert node.end_lineno is not None
                if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_rule_carries_its_output_version() -> None:
    """Each workflow rule that writes results carries ``z3lib.OUTPUT_VERSIONS[rule]`` in its
    params, and no entry is newer than the library (or all older: the last bump named its rule),
    so a library change reruns the stages it changes and Snakemake sees it."""
    import re

    import z3lib

    def parse(version: str) -> tuple[int, ...]:
        return tuple(int(x) for x in version.split("."))

    carried = {}
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^(?=rule )", path.read_text(), flags=re.MULTILINE)[1:]:
            name = block.split(":", 1)[0].split()[1]
            if (m := re.search(r'z3lib=output_version\("(\w+)"\)', block)) is not None:
                carried[name] = m.group(1)
    assert carried == {name: name for name in carried}, "a rule carries another rule's version"
    assert set(carried) == set(z3lib.OUTPUT_VERSIONS), set(carried) ^ set(z3lib.OUTPUT_VERSIONS)
    versions = [parse(v) for v in z3lib.OUTPUT_VERSIONS.values()]
    assert max(versions) == parse(z3lib.__version__)
