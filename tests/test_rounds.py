"""Refinement rounds and independent gold-standard halves at library level: fine-tuning starts
from the given weights, checkpoints never cross rounds, each half's network, refinement and ZART
map see that half's particles and fields only, and a round's reference is made from a map."""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from z3lib.io import (
    read_coefficients,
    read_map,
    read_npz,
    read_particles,
    write_coefficients,
    write_map,
    write_npz,
)
from z3lib.network import NetworkConfig, build_model
from z3lib.refine import RefineConfig
from z3lib.rounds import mask_for_round
from z3lib.stages.predict import predict
from z3lib.stages.preprocess import preprocess
from z3lib.stages.refine import refine_chunk
from z3lib.stages.rounds import publish_files, reference_from_map
from z3lib.stages.simulate import simulate_dataset
from z3lib.stages.train import train
from z3lib.stages.zart import zart
from z3lib.training import ParticleBatchSource, train_model
from z3lib.zart import ZartConfig, half_sets

ADK = Path(__file__).parent / "data" / "mdanalysistests_adk"
BOX = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """80 AdK particles along the motion (box 28 cropped to 24), and a copy of the processed
    particles whose half-2 images are pure noise."""
    root = tmp_path_factory.mktemp("rounds")
    sim = simulate_dataset(
        root / "sim",
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=80,
        box=28,
        pixel_size=4.0,
        resolution=10.0,
        snr=1.0,
        seed=4,
    )
    pre = preprocess(sim["particles"], sim["reference"], sim["mask"], root / "pre", box=BOX)
    noisy = root / "noisy"
    shutil.copytree(root / "pre", noisy)
    subsets = read_particles(pre["particles"]).table["random_subset"].to_numpy()
    _, h2 = half_sets(subsets, 0)
    with mrcfile.open(noisy / "particles.mrcs", mode="r+") as stack:
        stack.data[h2] = np.random.default_rng(9).normal(size=(len(h2), BOX, BOX)).astype(np.float32)
    return {
        **sim,
        **{f"pre_{k}": v for k, v in pre.items()},
        "noisy_particles": noisy / "particles.star",
        "noisy_points": noisy / "points.npz",
    }


def _config(**kw: object) -> NetworkConfig:
    args: dict[str, object] = {
        "L1": 3,
        "L2": 2,
        "basis": "xmipp",
        "epochs": 1,
        "batch_size": 16,
        "encoder_box": BOX,
        "channels": 4,
        "hidden": 32,
        "validation_fraction": 0.1,
        "seed": 0,
        "learning_rate": 1e-3,
        "energy_weight": 1e-4,
        "smooth_weight": 1e-3,
    }
    args.update(kw)
    return NetworkConfig(**args)  # type: ignore[arg-type]


def _trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    """The learned weights that carry over between rounds (not the decoder's learned reference,
    which belongs to its point cloud)."""
    return [
        p.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad and not name.startswith("decoder.")
    ]


def test_fine_tuning_starts_from_the_given_weights(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights before round 2's first optimiser step are round 1's, while the decoder holds
    round 2's point cloud and the learning-rate schedule starts again."""
    source = ParticleBatchSource.from_particles(read_particles(data["pre_particles"]))
    cloud = read_npz(data["pre_points"])
    cfg = _config()
    first, _ = train_model(source, cloud["points"], cloud["amplitudes"], BOX, cfg, checkpoint_dir=tmp_path / "r1")
    # round 2's cloud: every other point, other amplitudes
    points2, amps2 = cloud["points"][::2], 2.0 * cloud["amplitudes"][::2] + 0.1
    seen: list[list[torch.Tensor]] = []
    step = torch.optim.Adam.step

    def spy(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        if not seen:
            seen.append([p.detach().clone() for group in self.param_groups for p in group["params"]])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    second, history = train_model(
        source, points2, amps2, BOX, cfg, checkpoint_dir=tmp_path / "r2", init_weights=first.state_dict()
    )
    expected = _trainable(first)
    fresh = _trainable(build_model(points2, amps2, BOX, source.pixel_size, cfg))
    delta = second.decoder.amplitude_delta
    assert delta is not None and len(seen[0]) == len(expected) + 1
    assert not torch.equal(delta.detach(), torch.zeros_like(delta))  # round 2 learns its own map ...
    seen_delta = [t for t in seen[0] if t.shape == delta.shape]
    assert len(seen_delta) == 1 and torch.equal(seen_delta[0], torch.zeros_like(delta))  # ... from zero
    seen[0] = [t for t in seen[0] if t.shape != delta.shape]
    for before, weight, _seeded in zip(seen[0], expected, fresh, strict=True):
        torch.testing.assert_close(before, weight, rtol=0, atol=0)
    assert any(not torch.equal(w, s) for w, s in zip(expected, fresh, strict=True))  # not the seeded start
    torch.testing.assert_close(second.decoder.points, torch.as_tensor(points2, dtype=torch.float32))
    torch.testing.assert_close(second.decoder.amplitudes, torch.as_tensor(amps2, dtype=torch.float32))
    assert history["learning_rate"].iloc[0] == pytest.approx(cfg.learning_rate)


def test_checkpoint_is_not_resumed_for_another_starting_model(data: dict[str, Path], tmp_path: Path) -> None:
    source = ParticleBatchSource.from_particles(read_particles(data["pre_particles"]))
    cloud = read_npz(data["pre_points"])
    cfg = _config(epochs=2)
    base, _ = train_model(source, cloud["points"], cloud["amplitudes"], BOX, _config(), checkpoint_dir=tmp_path / "a")
    epochs: list[int] = []
    train_model(
        source,
        cloud["points"],
        cloud["amplitudes"],
        BOX,
        cfg,
        checkpoint_dir=tmp_path / "b",
        on_epoch_end=lambda epoch, row: epochs.append(epoch),
    )
    assert epochs == [1, 2]
    # Same folder, same data, same settings: a finished run resumes with nothing left to do ...
    epochs.clear()
    train_model(
        source,
        cloud["points"],
        cloud["amplitudes"],
        BOX,
        cfg,
        checkpoint_dir=tmp_path / "b",
        on_epoch_end=lambda epoch, row: epochs.append(epoch),
    )
    assert epochs == []
    # ... but not when the starting weights differ (another round) or the point cloud does.
    train_model(
        source,
        cloud["points"],
        cloud["amplitudes"],
        BOX,
        cfg,
        checkpoint_dir=tmp_path / "b",
        on_epoch_end=lambda epoch, row: epochs.append(epoch),
        init_weights=base.state_dict(),
    )
    assert epochs == [1, 2]
    epochs.clear()
    train_model(
        source,
        cloud["points"][1:],
        cloud["amplitudes"][1:],
        BOX,
        cfg,
        checkpoint_dir=tmp_path / "b",
        on_epoch_end=lambda epoch, row: epochs.append(epoch),
        init_weights=base.state_dict(),
    )
    assert epochs == [1, 2]


def _refined_star(data: dict[str, Path], path: Path, seed: int) -> pd.DataFrame:
    """A refine STAR as the next round reads it: the particles as given (original box) with other
    angles, shifts and defocus; returns its canonical table."""
    from z3lib.io import write_particles_star

    original = read_particles(data["particles"])
    rng = np.random.default_rng(seed)
    table = original.table.copy()
    n = len(table)
    for name, scale in (("rot", 5.0), ("tilt", 5.0), ("psi", 5.0), ("shift_x", 1.0), ("shift_y", 1.0)):
        table[name] = table[name] + rng.normal(scale=scale, size=n)
    change = rng.normal(scale=300.0, size=n)
    table["defocus_u"], table["defocus_v"] = table["defocus_u"] + change, table["defocus_v"] + change
    write_particles_star(path, original, table=table)
    return table


def test_round_network_trains_and_predicts_with_the_latest_poses(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12: train and predict of round k >= 2 get round k-1's refine STAR as ``poses``. The
    particles the network trains on and encodes carry its angles, shifts (px of the processing
    box, through Å) and defocus, the predict STAR carries them on to the refinement, and a
    checkpoint made with other poses is not resumed (the same poses resume it)."""
    import logging

    from z3lib.stages import predict as predict_stage
    from z3lib.stages import train as train_stage

    latest = _refined_star(data, tmp_path / "refine.star", seed=3)
    apix_orig = read_particles(data["particles"]).table["pixel_size"].to_numpy()
    apix_proc = read_particles(data["pre_particles"]).table["pixel_size"].to_numpy()
    expected_shifts = latest[["shift_x", "shift_y"]].to_numpy() * (apix_orig / apix_proc)[:, None]
    seen: dict[str, ParticleBatchSource] = {}
    real_train, real_predict = train_stage.train_model, predict_stage.predict_coefficients

    def spy_train(source: ParticleBatchSource, *args: object, **kwargs: object) -> object:
        seen["train"] = source
        return real_train(source, *args, **kwargs)  # type: ignore[arg-type]

    def spy_predict(model: object, source: ParticleBatchSource, **kwargs: object) -> object:
        seen["predict"] = source
        return real_predict(model, source, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_stage, "train_model", spy_train)
    monkeypatch.setattr(predict_stage, "predict_coefficients", spy_predict)
    log = logging.getLogger("test.latest_poses")
    out = train(
        data["pre_particles"],
        data["pre_points"],
        tmp_path / "train",
        _config(),
        poses=tmp_path / "refine.star",
        log=log,
    )
    predicted = predict(
        out["model"],
        data["pre_particles"],
        data["particles"],
        tmp_path / "predict",
        poses=tmp_path / "refine.star",
        log=log,
    )
    for stage, source in seen.items():
        np.testing.assert_allclose(
            source.angles.numpy(), latest[["rot", "tilt", "psi"]], rtol=0, atol=1e-3, err_msg=stage
        )
        np.testing.assert_allclose(source.shifts.numpy(), expected_shifts, rtol=0, atol=1e-4, err_msg=stage)
        for name in ("defocus_u", "defocus_v"):
            np.testing.assert_allclose(getattr(source.ctf, name).numpy(), latest[name], rtol=1e-6, err_msg=stage)
    assert set(seen) == {"train", "predict"}
    star = read_particles(predicted["particles"]).table  # what round k's refinement starts from
    for name in ("rot", "tilt", "psi", "shift_x", "shift_y", "defocus_u", "defocus_v"):
        np.testing.assert_allclose(star[name], latest[name], rtol=0, atol=1e-9, err_msg=name)
    # The checkpoint records the poses it was trained with.
    with caplog.at_level(logging.INFO, logger="test.latest_poses"):
        train(data["pre_particles"], data["pre_points"], tmp_path / "train", _config(), log=log)
        assert "made for other data or settings" in caplog.text and "resuming" not in caplog.text
        caplog.clear()
        _refined_star(data, tmp_path / "other.star", seed=4)
        train(
            data["pre_particles"],
            data["pre_points"],
            tmp_path / "other",
            _config(),
            poses=tmp_path / "refine.star",
            log=log,
            checkpoint_dir=tmp_path / "ckpt",
        )
        caplog.clear()
        train(
            data["pre_particles"],
            data["pre_points"],
            tmp_path / "other",
            _config(),
            poses=tmp_path / "other.star",
            log=log,
            checkpoint_dir=tmp_path / "ckpt",
        )
        assert "made for other data or settings" in caplog.text and "resuming" not in caplog.text
        caplog.clear()
        train(
            data["pre_particles"],
            data["pre_points"],
            tmp_path / "other",
            _config(),
            poses=tmp_path / "other.star",
            log=log,
            checkpoint_dir=tmp_path / "ckpt",
        )
        assert "resuming from" in caplog.text and "other data" not in caplog.text


def test_half_network_never_sees_the_other_half(data: dict[str, Path], tmp_path: Path) -> None:
    """Half 1's network is the same whether half 2's images are particles or noise; half 2's
    is not (so the comparison can fail). The model records the rows it was trained on."""
    cfg = _config()
    rows = half_sets(read_particles(data["pre_particles"]).table["random_subset"].to_numpy(), cfg.seed)
    models = {}
    for name in ("pre", "noisy"):
        for half in (1, 2):
            out = train(data[f"{name}_particles"], data[f"{name}_points"], tmp_path / name / f"h{half}", cfg, half=half)
            models[name, half] = torch.load(out["model"], weights_only=True)
    for half in (1, 2):
        meta = models["pre", half]["meta"]
        np.testing.assert_array_equal(meta["rows"].numpy(), rows[half - 1])
        assert meta["half"] == half and meta["n_particles"] == len(rows[half - 1]) and meta["n_total"] == 80
    clean1, noisy1 = models["pre", 1]["state_dict"], models["noisy", 1]["state_dict"]
    for key in clean1:
        torch.testing.assert_close(clean1[key], noisy1[key], rtol=0, atol=0, msg=key)
    clean2, noisy2 = models["pre", 2]["state_dict"], models["noisy", 2]["state_dict"]
    assert any(not torch.equal(clean2[k], noisy2[k]) for k in clean2)

    # Prediction with both networks: each encodes exactly its own half's particles.
    both = read_coefficients(
        predict(
            [tmp_path / "pre/h1/model.pt", tmp_path / "pre/h2/model.pt"],
            data["pre_particles"],
            data["particles"],
            tmp_path / "both",
        )["coefficients"]
    )
    for half in (1, 2):
        alone = read_coefficients(
            predict(
                tmp_path / f"pre/h{half}/model.pt", data["pre_particles"], data["particles"], tmp_path / f"alone{half}"
            )["coefficients"]
        )
        np.testing.assert_array_equal(both[rows[half - 1]], alone[rows[half - 1]])
    with pytest.raises(ValueError, match="cover"):
        predict(
            [tmp_path / "pre/h1/model.pt", tmp_path / "noisy/h1/model.pt"],
            data["pre_particles"],
            data["particles"],
            tmp_path / "bad",
        )


def test_independent_refinement_keeps_the_halves_apart(data: dict[str, Path], tmp_path: Path) -> None:
    """With independent halves, half 1's refined fields do not change when half 2's images are
    noise and its predictions are different (its landscape and prior are its own); in shared
    mode they do (the landscape is built from every particle)."""
    rng = np.random.default_rng(2)
    n = 80
    prior = rng.normal(scale=0.5, size=(n, 39))
    rows = half_sets(read_particles(data["pre_particles"]).table["random_subset"].to_numpy(), 0)
    other = prior.copy()
    other[rows[1]] = rng.normal(scale=2.0, size=(len(rows[1]), 39))
    write_coefficients(tmp_path / "prior.npy", prior)
    write_coefficients(tmp_path / "other.npy", other)
    cfg = RefineConfig(steps=3, grid_points=5, batch_size=64)
    kw = {"chunk": 0, "n_chunks": 1, "zernike": {"L1": 3, "L2": 2, "basis": "xmipp"}, "config": cfg, "seed": 0}
    results = {}
    for mode in (True, False):
        for name, prior_file in (("pre", "prior.npy"), ("noisy", "other.npy")):
            out = refine_chunk(
                data[f"{name}_particles"],
                [data["pre_points"], data["noisy_points"]] if mode else data["pre_points"],
                tmp_path / prior_file,
                tmp_path / f"{name}{mode}.npz",
                independent_halves=mode,
                **kw,
            )
            results[name, mode] = read_npz(out)
    clean, noisy = results["pre", True], results["noisy", True]
    np.testing.assert_array_equal(clean["index"], np.arange(n))
    h1 = rows[0]
    np.testing.assert_array_equal(clean["coefficients"][h1], noisy["coefficients"][h1])
    np.testing.assert_array_equal(clean["cost"][h1], noisy["cost"][h1])
    assert not np.array_equal(clean["coefficients"][rows[1]], noisy["coefficients"][rows[1]])
    assert not np.array_equal(results["pre", False]["coefficients"][h1], results["noisy", False]["coefficients"][h1])


def test_zart_halves_use_their_own_fields_and_masks(data: dict[str, Path], tmp_path: Path) -> None:
    """Half h of the corrected map is reconstructed from half h's fields on half h's point cloud:
    garbage fields on half 2 leave half 1 as it was, and a smaller half-2 cloud bounds half 2."""
    cloud = read_npz(data["pre_points"])
    rows = half_sets(read_particles(data["pre_particles"]).table["random_subset"].to_numpy(), 0)
    rng = np.random.default_rng(1)
    fields = rng.normal(scale=0.3, size=(80, 39))
    garbage = fields.copy()
    garbage[rows[1]] = rng.normal(scale=3.0, size=(len(rows[1]), 39))
    write_coefficients(tmp_path / "fields.npy", fields)
    write_coefficients(tmp_path / "garbage.npy", garbage)
    small = tmp_path / "small.npz"
    keep = np.abs(cloud["points"]).max(1) <= 5
    write_npz(small, **{**cloud, "points": cloud["points"][keep], "amplitudes": cloud["amplitudes"][keep]})
    # a fixed field scale: "auto" picks one s from both halves' FSC (one number, as the FSC is)
    cfg = ZartConfig(iterations=1, batch_size=16, seed=0, field_scale=1.0)
    kw = {"zernike": {"L1": 3, "L2": 2, "basis": "xmipp"}, "config": cfg, "backend": "numpy"}
    a = zart(data["pre_particles"], [data["pre_points"], small], tmp_path / "fields.npy", tmp_path / "a", **kw)
    b = zart(data["pre_particles"], [data["pre_points"], small], tmp_path / "garbage.npy", tmp_path / "b", **kw)
    c = zart(data["pre_particles"], data["pre_points"], tmp_path / "fields.npy", tmp_path / "c", **kw)
    half = {key: read_map(path).data for key, path in a.items() if key.endswith(("half1", "half2"))}
    np.testing.assert_array_equal(half["corrected_half1"], read_map(b["corrected_half1"]).data)
    assert not np.array_equal(half["corrected_half2"], read_map(b["corrected_half2"]).data)
    np.testing.assert_array_equal(half["corrected_half1"], read_map(c["corrected_half1"]).data)
    centre = BOX // 2
    outside = np.ones((BOX, BOX, BOX), dtype=bool)
    outside[centre - 5 : centre + 6, centre - 5 : centre + 6, centre - 5 : centre + 6] = False
    for name in ("corrected_half2", "uncorrected_half2"):
        assert np.all(half[name][outside] == 0) and np.any(half[name] != 0), name
    assert np.any(half["corrected_half1"][outside] != 0)


def test_reference_from_map_keeps_the_map_and_derives_mask_and_points(data: dict[str, Path], tmp_path: Path) -> None:
    ref = read_map(data["pre_reference"])
    volume = tmp_path / "corrected.mrc"
    write_map(volume, ref.data, ref.pixel_size)
    out = reference_from_map(volume, data["pre_points"], tmp_path / "round2")
    np.testing.assert_array_equal(read_map(out["reference"]).data, ref.data)
    mask = read_map(out["mask"]).data
    np.testing.assert_array_equal(mask, mask_for_round(ref.data, ref.pixel_size))
    assert 0 < mask.sum() < mask.size
    new, template = read_npz(out["points"]), read_npz(data["pre_points"])
    for key in ("box", "pixel_size", "original_box", "original_pixel_size", "step"):
        assert new[key] == template[key], key
    idx = np.round(new["points"][:, ::-1] + BOX // 2).astype(int)
    assert len(idx) == int(mask.sum())
    np.testing.assert_allclose(new["amplitudes"], ref.data[idx[:, 0], idx[:, 1], idx[:, 2]], rtol=1e-6)
    assert np.all(mask[idx[:, 0], idx[:, 1], idx[:, 2]] == 1)


def test_publish_copies_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("round 2")
    publish_files([(tmp_path / "a.txt", tmp_path / "stage" / "a.txt")])
    assert (tmp_path / "stage" / "a.txt").read_text() == "round 2"
    assert (tmp_path / "stage" / "a.txt").stat().st_ino != (tmp_path / "a.txt").stat().st_ino
