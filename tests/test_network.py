"""Zernike3Deep: physical decoder, gradients, learning two states, resumable training, prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from analytic import fine_frequencies, gaussian_image, gaussian_volume, relion_ctf

from z3lib import zernike as zk
from z3lib.ctf import CtfParams, apply_ctf
from z3lib.decoder import PhysicalDecoder, image_loss
from z3lib.geometry import euler_to_matrix, points_from_volume, random_rotations
from z3lib.io import read_coefficients, read_npz, read_particles, read_star_blocks, read_table
from z3lib.network import NetworkConfig, build_model, load_model
from z3lib.projection import project_volume
from z3lib.stages.predict import predict
from z3lib.stages.preprocess import preprocess
from z3lib.stages.simulate import simulate_dataset
from z3lib.stages.train import train
from z3lib.training import ParticleBatchSource, train_model

ADK = Path(__file__).parent / "data" / "mdanalysistests_adk"
XMIPP_32: dict[str, object] = {"L1": 3, "L2": 2, "basis": "xmipp"}  # 39 coefficients: small and fast


@pytest.fixture(scope="module")
def two_states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny two-state AdK dataset (closed/open), box 40 cropped to 32 for processing."""
    root = tmp_path_factory.mktemp("two_states")
    sim = simulate_dataset(
        root / "sim",
        start_model=ADK / "adk_closed.pdb",
        end_model=ADK / "adk_open.pdb",
        n_particles=400,
        box=40,
        pixel_size=3.2,
        resolution=9.0,
        snr=1.0,
        seed=11,
        t_values=(0.0, 1.0),
        consensus=False,
    )  # an exact reference: this tests the network
    pre = preprocess(sim["particles"], sim["reference"], sim["mask"], root / "pre", box=32)
    return {**sim, **{f"pre_{k}": v for k, v in pre.items()}}


def _small_config(**kw: object) -> NetworkConfig:
    args: dict[str, object] = {
        **XMIPP_32,
        "epochs": 8,
        "batch_size": 16,
        "learning_rate": 2e-3,
        "encoder_box": 32,
        "channels": 8,
        "hidden": 64,
        "validation_fraction": 0.1,
        "seed": 3,
        "energy_weight": 1e-4,
        "smooth_weight": 1e-3,
    }
    args.update(kw)
    return NetworkConfig(**args)  # type: ignore[arg-type]


def test_decoder_zero_field_equals_rigid_projection_with_ctf(device: str) -> None:
    rng = np.random.default_rng(0)
    box = 24
    zz, yy, xx = np.meshgrid(*[np.arange(box) - box // 2] * 3, indexing="ij")
    vol = np.exp(-((xx - 2) ** 2 + yy**2 + (zz + 1) ** 2) / 8.0) + 0.5 * np.exp(
        -((xx + 4) ** 2 + (yy - 3) ** 2 + zz**2) / 4.0
    )
    points, amps = points_from_volume(vol)
    dec = PhysicalDecoder(
        torch.tensor(points), torch.tensor(amps), zk.ZernikeSpec(3, 2, "xmipp", box), 2.0, NetworkConfig()
    ).to(device)
    rots = torch.tensor(random_rotations(3, rng), dtype=torch.float32, device=device)
    shifts = torch.tensor(rng.normal(size=(3, 2)), dtype=torch.float32, device=device)
    ctf = CtfParams.create([12000.0, 15000.0, 20000.0], [11000.0, 15000.0, 19000.0], [10.0, 0.0, 80.0], device=device)
    out = dec(torch.zeros(3, 39, device=device), rots, shifts, ctf)
    expected = apply_ctf(project_volume(vol, rots, shifts), 2.0, ctf, pad=2)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_decoder_images_are_the_analytic_projection_with_relion_ctf() -> None:
    """The decoder's image of an undeformed Gaussian blob (zero coefficients) at a pose and CTF
    equals the closed-form 2D Gaussian at ``(A c)_xy − s`` filtered by RELION's CTF
    (tests/analytic.py), and a rigid translation field ``d = t`` moves it to ``(A (c + t))_xy − s``:
    the image model and the field's frame against formulas, not against z3's projector or CTF."""
    box, apix, sigma = 32, 2.0, 2.0
    centre = np.array([3.0, -2.0, 1.0])
    vol = gaussian_volume(box, [centre], [1.0], sigma)
    points, amps = points_from_volume(vol, mask=vol > 1e-7)
    dec = PhysicalDecoder(
        torch.tensor(points), torch.tensor(amps), zk.ZernikeSpec(3, 2, "xmipp", box), apix, NetworkConfig()
    ).double()
    rots = np.array(
        [[[0, 1, 0], [0, 0, 1], [1, 0, 0]], [[-1, 0, 0], [0, 0, 1], [0, 1, 0]], [[1, 0, 0], [0, -1, 0], [0, 0, -1]]],
        dtype=float,
    )  # voxel points stay on pixels
    shifts = np.array([[2.0, -1.0], [-1.0, 3.0], [0.0, -2.0]])
    defoci = [(9000.0, 8000.0, 30.0), (15000.0, 13500.0, 100.0), (20000.0, 19000.0, 160.0)]
    ctf = CtfParams.create([d[0] for d in defoci], [d[1] for d in defoci], [d[2] for d in defoci])
    translation = np.array([1.0, 0.0, -2.0])  # px, whole voxels
    c = np.zeros((3, 3, 13))  # (particle, axis, term): K = 13 terms per axis at (3, 2)
    c[:, :, 0] = translation / zk.evaluate_basis(np.zeros((1, 3)), 3, 2, box / 2)[0, 0]  # Z_0 is constant
    kx, ky = fine_frequencies()
    for coefficients, offset in ((np.zeros((3, 39)), np.zeros(3)), (c.reshape(3, 39), translation)):
        with torch.no_grad():
            out = dec(torch.tensor(coefficients), torch.tensor(rots), torch.tensor(shifts), ctf).numpy()
        for i, (rot, shift, d) in enumerate(zip(rots, shifts, defoci, strict=True)):
            want = gaussian_image(
                box, [(rot @ (centre + offset))[:2] - shift], [1.0], sigma, relion_ctf(kx, ky, apix, *d)
            )
            error = np.linalg.norm(out[i] - want) / np.linalg.norm(want)
            assert error < 1e-4, (i, offset, error)  # measured 1.5e-7


def _encoder_view(image: np.ndarray, mask: np.ndarray, encoder_box: int, flip: np.ndarray | None) -> np.ndarray:
    """What the encoder is documented to see (``Zernike3Deep.encoder_input``): the masked
    ``(N, N)`` image, multiplied in Fourier space (``np.fft.fft2`` order) by ``flip`` (sign(CTF);
    None = no flip), band-limited to the encoder box's Nyquist and sampled on its grid, at unit
    standard deviation."""
    box = image.shape[-1]
    k = np.fft.fftfreq(box)
    spectrum = np.fft.fft2(image * mask)
    if flip is not None:
        spectrum = spectrum * flip
    limit = 0.5 * encoder_box / box
    spectrum = spectrum * ((np.abs(k)[:, None] < limit) & (np.abs(k)[None, :] < limit))
    out = np.fft.ifft2(spectrum).real[:: box // encoder_box, :: box // encoder_box]
    return np.asarray(out / out.std())


@pytest.mark.parametrize("phase_flipped", [False, True])
def test_encoder_channels_are_the_analytic_projection_with_ctf_magnitude(phase_flipped: bool) -> None:
    """The encoder's two channels, as ``encode`` hands them to the encoder, for a noise-free,
    undeformed particle of a Gaussian blob: the particle (channel 1) and the reference projected
    at its pose (channel 2) both equal the analytic expectation — the blob's closed-form 2D
    Gaussian projection at ``(A c)_xy − s`` with RELION's CTF (tests/analytic.py), masked,
    phase-flipped by sign(CTF) unless the data are already flipped, low-passed to the encoder
    box (the reference channel, projected on the encoder's coarser grid, to within the blur of
    that grid's interpolations). So flipped data are not flipped again and their reference
    carries |CTF|, and unflipped data are flipped. Independent of the decoder, projector and CTF
    code: the particle images and what both channels must be are made in closed form."""
    box, apix, encoder_box, sigma = 32, 2.0, 16, 2.0
    centre = np.array([3.0, -2.0, 1.0])  # (x, y, z) px from the box centre
    vol = gaussian_volume(box, [centre], [1.0], sigma)
    points, amps = points_from_volume(vol, mask=vol > 1e-7)
    model = build_model(
        points, amps, box, apix, _small_config(encoder_box=encoder_box, learn_reference=False), torch.device("cpu")
    )
    # rotations that keep voxel points on pixels (the sampled Gaussian then projects exactly to
    # its closed form), integer shifts, astigmatic CTFs with several lobes inside the band
    rots = np.array(
        [
            [[0, 1, 0], [0, 0, 1], [1, 0, 0]],
            [[0, 0, -1], [0, 1, 0], [1, 0, 0]],
            [[-1, 0, 0], [0, 0, 1], [0, 1, 0]],
            [[1, 0, 0], [0, -1, 0], [0, 0, -1]],
        ],
        dtype=float,
    )
    shifts = np.array([[2.0, -1.0], [-1.0, 3.0], [1.0, 1.0], [0.0, -2.0]])
    defoci = [(9000.0, 8000.0, 30.0), (12000.0, 12000.0, 0.0), (15000.0, 13500.0, 100.0), (20000.0, 19000.0, 160.0)]
    ctf = CtfParams.create([d[0] for d in defoci], [d[1] for d in defoci], [d[2] for d in defoci])
    mask = model.image_mask.numpy().astype(np.float64)
    seen: dict[str, torch.Tensor] = {}
    model.encoder.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach().clone()))

    kx, ky = fine_frequencies()
    k = np.fft.fftfreq(box)
    images, expected, unflipped_view = [], [], []
    for rot, shift, d in zip(rots, shifts, defoci, strict=True):
        where = [(rot @ centre)[:2] - shift]
        signed = gaussian_image(box, where, [1.0], sigma, relion_ctf(kx, ky, apix, *d))
        if phase_flipped:
            images.append(gaussian_image(box, where, [1.0], sigma, np.abs(relion_ctf(kx, ky, apix, *d))))
            expected.append(_encoder_view(images[-1], mask, encoder_box, None))
        else:
            images.append(signed)
            flip = np.sign(relion_ctf(k[None, :], k[:, None], apix, *d))
            expected.append(_encoder_view(signed, mask, encoder_box, flip))
        unflipped_view.append(_encoder_view(signed, mask, encoder_box, None))
    with torch.no_grad():
        model.encode(
            torch.tensor(np.stack(images), dtype=torch.float32),
            ctf,
            torch.tensor(rots, dtype=torch.float32),
            torch.tensor(shifts, dtype=torch.float32),
            phase_flipped=phase_flipped,
        )
    x = seen["x"].numpy().astype(np.float64)
    assert x.shape == (4, 2, encoder_box, encoder_box)
    for i, want in enumerate(expected):
        # the CTF's sign matters here: the view without the flip is far from the expectation
        assert np.linalg.norm(unflipped_view[i] - want) / np.linalg.norm(want) > 0.25
        error = np.linalg.norm(x[i, 0] - want) / np.linalg.norm(want)
        assert error < 0.04, (i, error)  # measured ≤ 0.014
        # the reference channel is projected on the coarse grid (binned cloud, bilinear splat):
        # what blur is left after its compensation is the error, far below a wrong flip's
        error = np.linalg.norm(x[i, 1] - want) / np.linalg.norm(want)
        wrong = np.linalg.norm(x[i, 1] - unflipped_view[i]) / np.linalg.norm(want)
        assert error < 0.15 and wrong > 2.5 * error, (i, error, wrong)  # measured ≤ 0.11; ≥ 0.30


def test_gradients_match_finite_differences() -> None:
    """d loss / d (coefficients, angles, shifts) through decoder + CTF + correlation loss."""
    rng = np.random.default_rng(1)
    box = 16
    points = rng.uniform(-5, 5, size=(40, 3))
    dec = PhysicalDecoder(
        torch.tensor(points),
        torch.tensor(rng.uniform(0.5, 1.5, 40)),
        zk.ZernikeSpec(3, 2, "xmipp", box),
        3.0,
        NetworkConfig(),
    ).double()
    target = torch.tensor(rng.normal(size=(2, box, box)))
    mask = torch.ones(box, box, dtype=torch.float64)
    ctf = CtfParams.create([15000.0, 18000.0], [14000.0, 17000.0], 30.0, dtype=torch.float64)

    def f(c: torch.Tensor, ang: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        rot = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
        pred = dec(c, rot, s, ctf)
        return image_loss(pred, target, mask, "corr").sum() + dec.field_energy(c).sum() + dec.field_roughness(c).sum()

    c = torch.tensor(rng.normal(scale=0.3, size=(2, 39)), requires_grad=True)
    ang = torch.tensor(rng.uniform(20, 160, size=(2, 3)), requires_grad=True)
    s = torch.tensor(rng.normal(scale=0.5, size=(2, 2)), requires_grad=True)
    assert torch.autograd.gradcheck(f, (c, ang, s), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("roughness", ["strain", "gradient"])
def test_regularisers_are_field_energy_and_roughness(roughness: str) -> None:
    """Quadratic forms equal the sampled field's mean |d|² and its mean |sym ∇d|² (strain) or
    |∇d|² (gradient), the Jacobian taken by finite differences of the field itself."""
    rng = np.random.default_rng(2)
    points = rng.uniform(-8, 8, size=(300, 3))
    cfg = NetworkConfig(L1=3, L2=2, basis="xmipp", roughness=roughness)
    dec = PhysicalDecoder(torch.tensor(points), torch.ones(300), zk.ZernikeSpec(3, 2, "xmipp", 32), 2.0, cfg).double()
    c = rng.normal(size=39)
    z = zk.evaluate_basis(points, 3, 2, 16.0)
    d = zk.deformation_field(z, c)
    assert float(dec.field_energy(torch.tensor(c[None]))) == pytest.approx((d**2).sum(1).mean(), rel=1e-6)
    h = 1e-5
    jac = np.stack(
        [
            (
                zk.deformation_field(zk.evaluate_basis(points + h * e, 3, 2, 16.0), c)
                - zk.deformation_field(zk.evaluate_basis(points - h * e, 3, 2, 16.0), c)
            )
            / (2 * h)
            for e in np.eye(3)
        ],
        axis=-1,
    )  # (N, 3, 3): J[n, a, j] = ∂d_a/∂x_j
    if roughness == "strain":
        jac = 0.5 * (jac + jac.transpose(0, 2, 1))
    assert float(dec.field_roughness(torch.tensor(c[None]))) == pytest.approx((jac**2).sum((1, 2)).mean(), rel=1e-6)


def test_strain_roughness_leaves_rigid_motions_free() -> None:
    """Linear elasticity: a rotation ω × x has zero strain (its gradient norm is 2|ω|²), a
    uniform stretch ε·x has strain ε·I, so 3ε² under both penalties (analytic values)."""
    rng = np.random.default_rng(5)
    points = rng.uniform(-12, 12, size=(2000, 3))
    omega, eps = np.array([0.02, -0.01, 0.03]), 0.01
    decs = {
        r: PhysicalDecoder(
            torch.tensor(points),
            torch.ones(2000),
            zk.ZernikeSpec(7, 7, "orthonormal", 64),
            2.0,
            NetworkConfig(roughness=r),
        ).double()
        for r in ("strain", "gradient")
    }
    for field, expected in (
        (np.cross(omega, points), {"strain": 0.0, "gradient": 2 * float(omega @ omega)}),
        (eps * points, {"strain": 3 * eps**2, "gradient": 3 * eps**2}),
    ):
        c = torch.tensor(zk.fit_coefficients(points, field, 7, 7, 32.0, "orthonormal").reshape(1, -1))
        for name, dec in decs.items():
            assert float(dec.field_roughness(c)) == pytest.approx(expected[name], abs=1e-9)
    with pytest.raises(ValueError, match="roughness"):
        PhysicalDecoder(
            torch.tensor(points[:10]),
            torch.ones(10),
            zk.ZernikeSpec(7, 7, "orthonormal", 64),
            2.0,
            NetworkConfig(roughness="bend"),
        )


def test_losses() -> None:
    rng = np.random.default_rng(3)
    a = torch.tensor(rng.normal(size=(4, 16, 16)))
    mask = torch.ones(16, 16, dtype=torch.float64)
    for kind in ("corr", "mse", "frc"):
        scaled = 3.0 * a + 1.0 if kind != "frc" else 3.0 * a
        np.testing.assert_allclose(image_loss(scaled, a, mask, kind).numpy(), 0.0, atol=1e-9)
    assert torch.all(image_loss(a, -a, mask, "corr") > 1.99)
    with pytest.raises(ValueError, match="unknown loss"):
        image_loss(a, a, mask, "l1")


def test_short_training_separates_two_states(two_states: dict[str, Path], tmp_path: Path) -> None:
    parts = read_particles(two_states["pre_particles"])
    cloud = read_npz(two_states["pre_points"])
    source = ParticleBatchSource.from_particles(parts)
    model, history = train_model(
        source, cloud["points"], cloud["amplitudes"], 32, _small_config(), checkpoint_dir=tmp_path
    )
    assert len(history) == 8 and history["train_image"].iloc[-1] < history["train_image"].iloc[0]
    from z3lib.training import predict_coefficients

    c = predict_coefficients(model, source)["coefficients"]
    pc1 = (c - c.mean(0)) @ np.linalg.svd(c - c.mean(0), full_matrices=False)[2][0]
    state = read_table(two_states["ground_truth"])["t"].to_numpy() > 0.5
    threshold = np.median(pc1)
    accuracy = max(np.mean((pc1 > threshold) == state), np.mean((pc1 <= threshold) == state))
    assert accuracy > 0.9, accuracy


def test_interrupted_training_resumes_to_the_same_model(two_states: dict[str, Path], tmp_path: Path) -> None:
    parts = read_particles(two_states["pre_particles"])
    cloud = read_npz(two_states["pre_points"])
    source = ParticleBatchSource.from_particles(parts)
    cfg = _small_config(epochs=3)
    straight, h1 = train_model(source, cloud["points"], cloud["amplitudes"], 32, cfg, checkpoint_dir=tmp_path / "a")

    class Interrupt(Exception):
        pass

    def stop_after_two(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_model(
            source,
            cloud["points"],
            cloud["amplitudes"],
            32,
            cfg,
            checkpoint_dir=tmp_path / "b",
            on_epoch_end=stop_after_two,
        )
    resumed, h2 = train_model(source, cloud["points"], cloud["amplitudes"], 32, cfg, checkpoint_dir=tmp_path / "b")
    assert len(h2) == 3
    for (k, v1), v2 in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(v1, v2, atol=1e-6, rtol=1e-5, msg=k)
    np.testing.assert_allclose(h1["train_image"], h2["train_image"], rtol=1e-6)


def test_extending_epochs_resumes_without_a_learning_rate_jump(two_states: dict[str, Path], tmp_path: Path) -> None:
    """train.epochs 3 → 6 for a finished run: the 3 trained epochs are kept (not retrained), only
    epochs 4-6 train, and their learning rates decay on from the last one used (with the old
    schedule over 6 epochs, epoch 4 jumped from 0.325 to 0.55 of the base rate)."""
    parts = read_particles(two_states["pre_particles"])
    cloud = read_npz(two_states["pre_points"])
    source = ParticleBatchSource.from_particles(parts).take(np.arange(48))
    base = 2e-3
    _, h3 = train_model(
        source, cloud["points"], cloud["amplitudes"], 32, _small_config(epochs=3), checkpoint_dir=tmp_path
    )
    # an uninterrupted run: cosine from the base rate towards 10 % of it over its epochs
    expected3 = [base * (0.1 + 0.45 * (1 + np.cos(np.pi * e / 3))) for e in range(3)]
    np.testing.assert_allclose(h3["learning_rate"], expected3, rtol=1e-12)
    trained: list[int] = []
    _, h6 = train_model(
        source,
        cloud["points"],
        cloud["amplitudes"],
        32,
        _small_config(epochs=6),
        checkpoint_dir=tmp_path,
        on_epoch_end=lambda epoch, row: trained.append(epoch),
    )
    assert trained == [4, 5, 6]  # resumed after epoch 3, did not restart
    assert list(h6["epoch"]) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(h6["train_image"][:3], h3["train_image"])
    lr = h6["learning_rate"].to_numpy()
    np.testing.assert_array_equal(lr[:3], h3["learning_rate"])
    assert np.all(np.diff(lr) < 0), lr  # no increase anywhere, the junction included
    # the extension: cosine from the last rate used towards the same floor, over the added epochs
    last, floor = lr[2], 0.1 * base
    expected_tail = [floor + (last - floor) * 0.5 * (1 + np.cos(np.pi * j / 4)) for j in (1, 2, 3)]
    np.testing.assert_allclose(lr[3:], expected_tail, rtol=1e-12)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    np.testing.assert_allclose(ckpt["lr_schedule"], lr, rtol=0)


def test_checkpoint_of_other_particles_or_points_is_not_resumed(
    two_states: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished checkpoint, then the same number of particles with other poses, then another
    point cloud (a new mask): each trains afresh on its own data (a checkpoint keyed by the
    settings, the count and the box was resumed, training 0 epochs, or crashed on the cloud)."""
    import logging

    import starfile

    cfg = _small_config(epochs=2)
    ckpt = tmp_path / "checkpoint"
    blocks = starfile.read(two_states["pre_particles"], always_dict=True)
    rows = blocks["particles"].iloc[:48].copy()
    folder = Path(two_states["pre_particles"]).parent  # the stack paths, made absolute
    rows["rlnImageName"] = [f"{n.split('@')[0]}@{folder / n.split('@')[1]}" for n in rows["rlnImageName"]]
    stars = {}
    for name, turn in (("a", 0.0), ("b", 25.0)):
        rows["rlnAngleRot"] = blocks["particles"]["rlnAngleRot"].iloc[:48] + turn
        stars[name] = tmp_path / f"{name}.star"
        starfile.write({**blocks, "particles": rows}, stars[name])
    cloud = read_npz(two_states["pre_points"])
    fewer = tmp_path / "points_fewer.npz"
    np.savez(fewer, **{**cloud, "points": cloud["points"][::2], "amplitudes": cloud["amplitudes"][::2]})
    runs = [
        ("a", two_states["pre_points"]),
        ("a", two_states["pre_points"]),
        ("b", two_states["pre_points"]),
        ("b", fewer),
    ]
    histories, messages = [], []
    caplog.set_level(logging.INFO, logger="z3.test")
    for i, (name, points) in enumerate(runs):
        caplog.clear()
        paths = train(
            stars[name], points, tmp_path / f"out{i}", cfg, checkpoint_dir=ckpt, log=logging.getLogger("z3.test")
        )
        histories.append(read_table(paths["history"]))
        messages.append(" | ".join(caplog.messages))
    assert "resuming" in messages[1] and "after epoch 2" in messages[1]  # the same data: resumed, finished
    np.testing.assert_array_equal(histories[1]["train_image"], histories[0]["train_image"])
    for i in (2, 3):  # other poses; then other points: ignored, two epochs trained on the new data
        assert "ignoring" in messages[i] and "resuming" not in messages[i], messages[i]
        assert list(histories[i]["epoch"]) == [1, 2]
        assert not np.allclose(histories[i]["train_image"], histories[i - 1]["train_image"])
    assert len(read_npz(tmp_path / "out3" / "points.npz")["points"]) == len(cloud["points"][::2])


def test_train_and_predict_files(two_states: dict[str, Path], tmp_path: Path) -> None:
    cfg = _small_config(epochs=1, refine_pose=True)
    paths = train(two_states["pre_particles"], two_states["pre_points"], tmp_path / "train", cfg)
    payload = torch.load(paths["model"], weights_only=True)  # no code is unpickled
    assert payload["meta"]["original_box"] == 40 and payload["meta"]["box"] == 32
    assert list(read_table(paths["history"])["epoch"]) == [1]
    model, _meta = load_model(paths["model"])
    out = predict(paths["model"], two_states["pre_particles"], two_states["particles"], tmp_path / "predict")
    coeffs = read_coefficients(out["coefficients"])
    assert coeffs.shape == (400, 39)
    blocks = read_star_blocks(out["particles"])
    original = read_star_blocks(two_states["particles"])
    star = blocks["particles"]
    # every input column kept, same order of particles, plus the Flexutils column
    assert set(original["particles"].columns) <= set(star.columns)
    assert star["rlnImageName"].tolist() == original["particles"]["rlnImageName"].tolist()
    from z3lib.io import parse_coefficient_column

    np.testing.assert_allclose(parse_coefficient_column(star["zernikeCoefficients"]), coeffs, rtol=1e-6, atol=1e-9)
    z = blocks["zernike3d"].iloc[0]
    assert int(z["L1"]) == 3 and int(z["L2"]) == 2 and float(z["Rmax"]) == 20.0 and int(z["box"]) == 40
    # coefficients are in px of the original box: the processing-box prediction × 40/32
    from z3lib.training import predict_coefficients

    src = ParticleBatchSource.from_particles(read_particles(two_states["pre_particles"]))
    raw = predict_coefficients(model, src)
    np.testing.assert_allclose(coeffs, raw["coefficients"] * 40 / 32, rtol=1e-5, atol=1e-7)
    # pose corrections are applied to the angles and recorded
    np.testing.assert_allclose(
        star["rlnAngleRot"] - original["particles"]["rlnAngleRot"], star["delta_angle_rot"], atol=1e-6
    )
    assert {"delta_shift_x", "delta_shift_y"} <= set(star.columns)


@pytest.mark.parametrize("encoder,loss", [("conv", "frc"), ("mlp", "corr"), ("mlp", "mse")])
def test_encoder_and_loss_options_train(two_states: dict[str, Path], tmp_path: Path, encoder: str, loss: str) -> None:
    parts = read_particles(two_states["pre_particles"])
    cloud = read_npz(two_states["pre_points"])
    source = ParticleBatchSource.from_particles(parts)
    cfg = _small_config(
        epochs=2,
        encoder=encoder,
        loss=loss,
        encoder_box=16,
        encoder_reference=False,
        encoder_pose=False,
        encoder_phase_flip=False,
    )
    _, history = train_model(source, cloud["points"], cloud["amplitudes"], 32, cfg, checkpoint_dir=tmp_path)
    assert np.all(np.isfinite(history["train_loss"])) and len(history) == 2


def test_build_model_is_seeded() -> None:
    pts = np.random.default_rng(0).uniform(-5, 5, size=(50, 3))
    a = build_model(pts, np.ones(50), 16, 2.0, NetworkConfig(seed=5, encoder_box=16, L1=3, L2=2, basis="xmipp"))
    b = build_model(pts, np.ones(50), 16, 2.0, NetworkConfig(seed=5, encoder_box=16, L1=3, L2=2, basis="xmipp"))
    for v1, v2 in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(v1, v2)


def test_learned_reference_sharpens_a_blurred_reference(two_states: dict[str, Path], tmp_path: Path) -> None:
    """train.learn_reference: from a reference blurred to 20 Å, the amplitudes the network learns
    from the particles come closer to the exact map's than the blurred start (the particles, not
    the reference, hold the detail); without it the cloud written is the input's."""
    from z3lib.analysis import lowpass_filter
    from z3lib.io import read_map, write_map

    ref = read_map(two_states["reference"])
    write_map(tmp_path / "blurred.mrc", lowpass_filter(ref.data, ref.pixel_size, 20.0), ref.pixel_size)
    pre = preprocess(two_states["particles"], tmp_path / "blurred.mrc", two_states["mask"], tmp_path / "pre", box=32)
    exact, start = read_npz(two_states["pre_points"]), read_npz(pre["points"])
    np.testing.assert_array_equal(exact["points"], start["points"])  # same mask, same cloud
    learned = read_npz(
        train(pre["particles"], pre["points"], tmp_path / "on", _small_config(learn_reference=True))["points"]
    )
    kept = read_npz(
        train(pre["particles"], pre["points"], tmp_path / "off", _small_config(epochs=1, learn_reference=False))[
            "points"
        ]
    )
    np.testing.assert_array_equal(kept["amplitudes"], start["amplitudes"])

    def corr(a: np.ndarray) -> float:
        return float(np.corrcoef(a, exact["amplitudes"])[0, 1])

    assert corr(learned["amplitudes"]) > corr(start["amplitudes"]) + 0.03, (
        corr(learned["amplitudes"]),
        corr(start["amplitudes"]),
    )
