"""Append-only journals of partial results: each block is written once, a torn or damaged tail is
dropped (and only it), and a journal of other work is never reused."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from z3lib.io.journal import Journal

N, BLOCK = 1000, 100


def _template() -> dict[str, np.ndarray]:
    return {"coefficients": np.zeros((N, 12)), "flagged": np.zeros(N, dtype=bool), "steps": np.zeros(N, np.int64)}


def _results(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "coefficients": rng.normal(size=(N, 12)),
        "flagged": rng.random(N) < 0.3,
        "steps": rng.integers(0, 50, N),
    }


def _fill(path: Path, results: dict[str, np.ndarray], blocks: int) -> Journal:
    journal, done = Journal.open(path, "work-a", _template())
    assert not done.any()
    for b in range(blocks):
        sl = slice(b * BLOCK, (b + 1) * BLOCK)
        journal.append(sl.start, {k: v[sl] for k, v in results.items()})
    return journal


def test_every_block_is_written_once_and_read_back_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    results = _results(rng)
    path = tmp_path / "chunk.progress"
    journal = _fill(path, results, blocks=4)
    header = path.stat().st_size - journal.bytes_written
    # append-only: the file is the header plus each block's bytes once (12 float64 + bool + int64 per row)
    row_bytes = 12 * 8 + 1 + 8
    assert journal.bytes_written == 4 * (40 + 16 + BLOCK * row_bytes)
    assert 0 < header < 1000
    out = _template()
    _, done = Journal.open(path, "work-a", out)
    assert done.sum() == 4 * BLOCK and done[: 4 * BLOCK].all()
    for key, values in results.items():
        np.testing.assert_array_equal(out[key][: 4 * BLOCK], values[: 4 * BLOCK])
        assert not out[key][4 * BLOCK :].any()


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_a_damaged_last_record_is_dropped_and_the_file_truncated(tmp_path: Path, damage: str) -> None:
    rng = np.random.default_rng(1)
    results = _results(rng)
    path = tmp_path / "chunk.progress"
    _fill(path, results, blocks=3)
    size = path.stat().st_size
    record = 40 + 16 + BLOCK * (12 * 8 + 1 + 8)
    data = bytearray(path.read_bytes())
    if damage == "torn":  # killed while writing the third block
        data = data[: size - record // 2]
    else:  # one bit of the third block's payload changed on disk
        data[size - 10] ^= 0x01
    path.write_bytes(bytes(data))
    out = _template()
    _, done = Journal.open(path, "work-a", out)
    assert done.sum() == 2 * BLOCK
    np.testing.assert_array_equal(out["coefficients"][: 2 * BLOCK], results["coefficients"][: 2 * BLOCK])
    assert path.stat().st_size == size - record  # the bad tail is gone: new records follow good ones
    journal, _ = Journal.open(path, "work-a", _template())
    sl = slice(2 * BLOCK, 3 * BLOCK)
    journal.append(sl.start, {k: v[sl] for k, v in results.items()})
    fingerprint, arrays, done = Journal.load(path)
    assert fingerprint == "work-a" and done.sum() == 3 * BLOCK
    np.testing.assert_array_equal(arrays["steps"][: 3 * BLOCK], results["steps"][: 3 * BLOCK])


def test_a_journal_of_other_work_or_shape_starts_afresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "chunk.progress"
    _fill(path, _results(rng), blocks=2)
    with caplog.at_level(logging.WARNING):
        _, done = Journal.open(path, "work-b", _template())
    assert not done.any() and "not used" in caplog.text
    assert Journal.load(path)[2].sum() == 0  # replaced by an empty journal of the new work
    _fill(path, _results(rng), blocks=1)
    other_shape = {**_template(), "coefficients": np.zeros((N, 15))}
    _, done = Journal.open(path, "work-a", other_shape)
    assert not done.any()


def test_rows_outside_the_journal_are_refused(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path / "x.progress", "w", _template())
    block = {k: v[:BLOCK] for k, v in _template().items()}
    with pytest.raises(ValueError, match="outside"):
        journal.append(N - BLOCK + 1, block)
