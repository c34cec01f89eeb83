"""One source for every default: the library's settings dataclasses hold the pipeline's defaults
(the config schema's), build themselves from a config section, and refuse unknown keys and
values outside their enumerations (issue 13, item 5: the network's field regularisers were 10×
weaker and its learning rate half the pipeline's)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from z3lib.network import NetworkConfig
from z3lib.refine import RefineConfig
from z3lib.training import PREDICT_BATCH_SIZE
from z3lib.zart import ZartConfig

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
WORKFLOW_ONLY = {
    "refine": {"chunks"},
    "zart": {"backend"},
    "zernike": {"points"},
    "train": {"processes"},
}  # keys no library object holds


@pytest.fixture(scope="module")
def defaults() -> dict[str, Any]:
    """The schema's default of every top-level key."""
    schema = yaml.safe_load(SCHEMA.read_text())
    return {key: sub["default"] for key, sub in schema["properties"].items()}


def class_defaults(cls: type) -> dict[str, Any]:
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(cls)
    }


@pytest.mark.parametrize(
    ("cls", "sections"), [(NetworkConfig, ("zernike", "train")), (RefineConfig, ("refine",)), (ZartConfig, ("zart",))]
)
def test_every_schema_default_is_the_dataclass_default(
    defaults: dict[str, Any], cls: type, sections: tuple[str, ...]
) -> None:
    own = class_defaults(cls)
    for section in sections:
        for key, value in defaults[section].items():
            if key in WORKFLOW_ONLY.get(section, set()):
                assert key not in own, f"{section}.{key} is said to be the workflow's only"
                continue
            assert key in own, f"{section}.{key} has no {cls.__name__} field"
            expected = tuple(value) if isinstance(own[key], tuple) else value
            assert own[key] == expected, f"{section}.{key}: schema {value!r}, {cls.__name__} {own[key]!r}"
    assert own.get("seed", defaults["seed"]) == defaults["seed"]


def test_from_config_of_the_schema_defaults_is_the_default_object(defaults: dict[str, Any]) -> None:
    assert NetworkConfig.from_config(defaults["zernike"], defaults["train"], seed=defaults["seed"]) == NetworkConfig()
    assert RefineConfig.from_config(defaults["refine"]) == RefineConfig()
    assert ZartConfig.from_config(defaults["zart"], seed=defaults["seed"]) == ZartConfig()
    assert defaults["predict"]["batch_size"] == PREDICT_BATCH_SIZE


def test_from_config_passes_settings_and_refuses_unknown_keys(defaults: dict[str, Any]) -> None:
    cfg = NetworkConfig.from_config(
        {"L1": 3, "L2": 2, "basis": "xmipp"}, {"epochs": 5, "roughness": "gradient"}, seed=7
    )
    assert (cfg.L1, cfg.L2, cfg.basis, cfg.epochs, cfg.roughness, cfg.seed) == (3, 2, "xmipp", 5, "gradient", 7)
    assert cfg.smooth_weight == defaults["train"]["smooth_weight"]  # what was not given: the default
    assert ZartConfig.from_config({"sigmas": [2, 1, 0]}).sigmas == (2.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"unknown NetworkConfig settings \['smoth_weight'\]"):
        NetworkConfig.from_config({}, {"smoth_weight": 0.1})
    with pytest.raises(ValueError, match=r"unknown RefineConfig settings \['mode_'\]"):
        RefineConfig.from_config({"chunks": 2, "mode_": "free"})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: NetworkConfig(loss="l2"), r"NetworkConfig.loss = 'l2'; use one of \['corr', 'frc', 'mse'\]"),
        (lambda: NetworkConfig(encoder="resnet"), r"NetworkConfig.encoder = 'resnet'"),
        (
            lambda: NetworkConfig(basis="legendre"),
            r"NetworkConfig.basis = 'legendre'; use one of \['xmipp', 'orthonormal'\]",
        ),
        (lambda: NetworkConfig(roughness="bend"), r"NetworkConfig.roughness = 'bend'"),
        (lambda: RefineConfig(mode="global"), r"RefineConfig.mode = 'global'; use one of \['landscape', 'free'\]"),
        (lambda: RefineConfig(prior="flat"), r"RefineConfig.prior = 'flat'"),
        (lambda: RefineConfig(loss="frc2"), r"RefineConfig.loss = 'frc2'"),
    ],
)
def test_enumerated_settings_are_checked_when_made(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
