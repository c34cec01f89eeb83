"""The benchmarks' caches (benchmarks/common.py) can never hand back numbers of other code,
settings or inputs: their key covers all three, and a half-made cache is never reused (issue 12,
item 6: caches keyed by fixed names reported numbers of older code)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("z3_bench_common", REPO / "benchmarks" / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sources_of_a_module_include_what_it_imports(common: ModuleType) -> None:
    """z3lib.refine imports z3lib.network (which imports z3lib.zernike, z3lib.ctf, ...): an edit
    of any of them changes the key of a cache that z3lib.refine makes."""
    names = {p.relative_to(REPO).as_posix() for p in common.z3lib_sources("z3lib.refine")}
    assert {"z3lib/__init__.py", "z3lib/refine.py", "z3lib/network.py", "z3lib/zernike.py", "z3lib/ctf.py"} <= names
    assert not any(n.startswith("z3lib/report") for n in names)  # not imported by it: its edits leave the key alone


def test_key_changes_with_settings_code_and_inputs(common: ModuleType, tmp_path: Path) -> None:
    data = tmp_path / "input.bin"
    code = tmp_path / "bench_x.py"
    data.write_bytes(b"particles v1")
    code.write_text("STEPS = 10\n")
    key = common.cache_key({"steps": 10, "seed": 0}, ["z3lib.zernike"], [data, code])
    assert key == common.cache_key({"seed": 0, "steps": 10}, ["z3lib.zernike"], [data, code])  # order-free
    assert key != common.cache_key({"steps": 11, "seed": 0}, ["z3lib.zernike"], [data, code])
    assert key != common.cache_key({"steps": 10, "seed": 0}, ["z3lib.zernike", "z3lib.refine"], [data, code])
    data.write_bytes(b"particles v2")  # same name, other content
    assert key != common.cache_key({"steps": 10, "seed": 0}, ["z3lib.zernike"], [data, code])
    data.write_bytes(b"particles v1")
    code.write_text("STEPS = 20\n")  # the benchmark's own code
    assert key != common.cache_key({"steps": 10, "seed": 0}, ["z3lib.zernike"], [data, code])


def test_cached_array_is_made_again_for_other_settings(
    common: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "WORK", tmp_path)
    made: list[int] = []

    def make(value: int) -> Callable[[], np.ndarray]:
        def inner() -> np.ndarray:
            made.append(value)
            return np.full(3, value)

        return inner

    a = common.cached_array("x", {"v": 1}, [], [], make(1))
    again = common.cached_array("x", {"v": 1}, [], [], make(99))  # cached: not made again
    other = common.cached_array("x", {"v": 2}, [], [], make(2))
    np.testing.assert_array_equal(a, [1, 1, 1])
    np.testing.assert_array_equal(again, [1, 1, 1])
    np.testing.assert_array_equal(other, [2, 2, 2])
    assert made == [1, 2]


def test_half_made_cache_folder_is_not_complete_and_starts_empty(common: ModuleType, tmp_path: Path) -> None:
    folder = tmp_path / "run_abc"
    common.start_cache(folder)
    (folder / "partial.npy").write_bytes(b"half")  # an attempt killed before it finished
    assert not common.is_complete(folder)
    common.start_cache(folder)  # the next attempt
    assert list(folder.iterdir()) == []
    common.mark_complete(folder, {"v": 1})
    assert common.is_complete(folder)
