"""Presets, validation and the network's parameter counts (SPEC §3.1 arithmetic)."""

from __future__ import annotations

import pytest

import dynaguide
from dynaguide.config import RefineConfig, get_preset, presets
from dynaguide.model import build_model, conv_flops_per_pixel, count_parameters


def test_preset_names():
    names = set(presets())
    for base in ("dfc", "dynaseg-scf", "dynaseg-fsf", "dynaguide"):
        assert base in names and f"{base}-reference" in names


@pytest.mark.parametrize(
    "name, params",
    [
        ("dfc", 103_600),
        ("dynaseg-fsf", 103_600),
        ("dynaguide", 106_400),
        ("dynaguide-reference", 193_900),
    ],
)
def test_parameter_counts(name, params):
    assert count_parameters(build_model(get_preset(name), seed=0)) == params


def test_flop_floor_matches_issue():
    # about 95 GFLOP per training iteration for the 106K net at 481x321
    gflop = conv_flops_per_pixel(get_preset("dynaguide")) * 481 * 321 / 1e9
    assert 90 < gflop < 100


def test_weights_and_semantics():
    p = presets()
    assert p["dynaseg-scf"].weight_mode == "scf" and p["dynaseg-fsf"].weight_mode == "fsf"
    dg = p["dynaguide"]
    assert (dg.penalty, dg.neighbors, dg.beta, dg.skip, dg.alignment) == (
        "huber",
        8,
        15.0,
        "separate",
        "overlap",
    )
    ref = p["dynaguide-reference"]
    assert (ref.n_conv, ref.skip, ref.alignment, ref.final_pass) == (
        3,
        "shared",
        "reference",
        "eval",
    )


def test_presets_are_fresh():
    a = presets()
    a["dfc"] = None
    assert isinstance(presets()["dfc"], RefineConfig)


def test_replace_validates():
    cfg = get_preset("dfc")
    assert cfg.replace(max_iter=5).max_iter == 5
    with pytest.raises(TypeError, match="unknown RefineConfig field"):
        cfg.replace(max_iters=5)
    with pytest.raises(ValueError, match="neighbors"):
        cfg.replace(neighbors=6)
    with pytest.raises(ValueError, match="max_iter"):
        cfg.replace(max_iter=-1)  # 0 is valid: no refinement, the guide alone
    with pytest.raises(ValueError, match="lr"):
        cfg.replace(lr=-1.0)
    with pytest.raises(KeyError, match="known presets"):
        get_preset("dfcc")


def test_round_trip_dict():
    cfg = get_preset("dynaguide")
    assert RefineConfig.from_dict(cfg.to_dict()) == cfg
    assert dynaguide.get_preset(cfg) is cfg
