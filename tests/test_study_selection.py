"""Feature selection of the activation study: budgets, rules, preset files, `select`."""

from __future__ import annotations

import itertools
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cache import read_feature_file
from hyperfeatures.cli import app
from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.presets import (
    PRESET_FORMAT,
    Preset,
    PresetError,
    load_preset,
    save_preset,
    shipped_presets,
)
from hyperfeatures.sources.architectures import unet_architecture
from hyperfeatures.study.selection import (
    LOCAL_KINDS,
    SelectionError,
    StudyFileError,
    architecture_rules,
    read_properties,
    read_sweep,
    select_taps,
    write_preset,
)
from hyperfeatures.taps import TapInfo, list_taps

runner = CliRunner()

# tap: (kind, channels, side, PCK at steps 0, 1, 2) -- tap names of tiny-sd
TAPS: dict[str, tuple[str, int, int, tuple[float, ...]]] = {
    "up_blocks.0.resnets.0": ("resnet", 64, 2, (30.0, 28.0, 20.0)),
    "up_blocks.1.resnets.0": ("resnet", 64, 4, (55.0, 50.0, 40.0)),
    "up_blocks.1.resnets.1": ("resnet", 64, 4, (54.0, 49.0, 39.0)),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1:q": ("attn-q", 64, 4, (60.0, 1, 1)),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1:k": ("attn-k", 64, 4, (58.0, 1, 1)),
    "up_blocks.2.resnets.0": ("resnet", 32, 8, (45.0, 44.0, 30.0)),
    "up_blocks.2.attentions.0": ("transformer", 32, 8, (40.0, 41.0, 30.0)),
    "up_blocks.3.resnets.0": ("resnet", 32, 8, (35.0, 34.0, 20.0)),
}
MODEL = "tiny-sd"


def _sweep(taps: dict[str, tuple[str, int, int, tuple[float, ...]]] = TAPS) -> dict[str, Any]:
    rows = [
        {
            "tap": tap,
            "kind": kind,
            "step": step,
            "channels": ch,
            "height": side,
            "width": side,
            "pck_img": pck + 5,
            "pck_bbox": pck,
            "keypoints": 100,
            "pairs": 10,
        }
        for tap, (kind, ch, side, pcks) in taps.items()
        for step, pck in enumerate(pcks)
    ]
    settings = Settings(model=MODEL, num_steps=3, steps="all").to_dict()
    return {
        "format": "hyperfeatures sweep",
        "settings": settings,
        "model": MODEL,
        "dataset": "synthetic",
        "alpha": 0.1,
        "match_size": 64,
        "rows": rows,
    }


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- budgets
def test_count_budget_takes_the_best_taps() -> None:
    sel = select_taps(_sweep(), max_taps=3)
    assert len(sel.taps) == 3
    assert set(sel.taps) == {
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1:q",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1:k",
        "up_blocks.1.resnets.0",
    }
    assert list(sel.taps) == [t for t in TAPS if t in sel.taps]  # execution order
    assert sel.scores["up_blocks.1.resnets.0"] == 55.0 and sel.steps["up_blocks.1.resnets.0"] == 0
    assert set(sel.excluded) == set(TAPS) - set(sel.taps)
    assert all(r.startswith("budget:") for r in sel.excluded.values())


def test_channel_budget_is_never_exceeded_and_filled_with_smaller_taps() -> None:
    sel = select_taps(_sweep(), max_channels=200)
    assert sel.total_channels == 192  # three 64-channel taps; a fourth tap would exceed 200
    sel = select_taps(_sweep(), max_channels=230)
    assert sel.total_channels == 224  # 3 x 64, the next 64 skipped, then one 32 fits
    assert any(r.startswith("channels:") for r in sel.excluded.values())


@pytest.mark.parametrize("rule", ["greedy", "study"])
def test_budgets_are_respected_exactly(rule: str) -> None:
    for max_taps, max_channels in itertools.product([None, 1, 2, 5, 8], [None, 64, 100, 300]):
        if max_taps is None and max_channels is None:
            continue
        sel = select_taps(_sweep(), max_taps=max_taps, max_channels=max_channels, rule=rule)
        assert max_taps is None or len(sel.taps) <= max_taps
        assert max_channels is None or sel.total_channels <= max_channels
        assert sel.total_channels == sum(TAPS[t][1] for t in sel.taps)
        assert len(set(sel.taps)) == len(sel.taps)
        if max_taps is not None and max_channels is None:  # filled while taps remain
            assert len(sel.taps) == min(max_taps, 8 if rule == "greedy" else 6)


def test_step_and_metric() -> None:
    sel = select_taps(_sweep(), max_taps=1, step=1, metric="pck_img")
    assert sel.taps == ("up_blocks.1.resnets.0",)
    assert sel.scores["up_blocks.1.resnets.0"] == 55.0 and sel.steps["up_blocks.1.resnets.0"] == 1


# --------------------------------------------------------------------------- rules
def _properties(**parts: Any) -> dict[str, Any]:
    return {"format": "hyperfeatures properties", "model": MODEL, **parts}


def test_redundancy_skips_a_near_duplicate_tap() -> None:
    a, b = "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"
    props = _properties(granularity={"4x4": {"taps": [a, b], "matrix": [[1, 0.95], [0.95, 1]]}})
    taps = {k: v for k, v in TAPS.items() if v[0] == "resnet"}
    sel = select_taps(_sweep(taps), props, max_taps=2)
    assert a in sel.taps and b not in sel.taps
    assert sel.excluded[b].startswith("redundant:") and a in sel.excluded[b]
    assert "up_blocks.2.resnets.0" in sel.taps  # the next best fills the place
    # below the threshold they are both kept
    sel = select_taps(_sweep(taps), props, max_taps=2, redundancy=0.96)
    assert set(sel.taps) == {a, b}


def test_study_rule_drops_local_taps() -> None:
    greedy = select_taps(_sweep(), max_taps=4)
    assert {"attn1:q", "attn1:k"} <= {t.rsplit(".", 1)[-1] for t in greedy.taps}
    study = select_taps(_sweep(), max_taps=4, rule="study")
    assert not any(study.kinds[t] in LOCAL_KINDS for t in study.taps)
    q = "up_blocks.1.attentions.0.transformer_blocks.0.attn1:q"
    assert study.excluded[q].startswith("locality:")
    assert len(study.taps) == 4


def test_measured_locality_decides_with_max_locality() -> None:
    q = "up_blocks.1.attentions.0.transformer_blocks.0.attn1:q"
    local = "up_blocks.1.resnets.0"
    props = _properties(locality={q: 0.05, local: 0.8})
    sel = select_taps(_sweep(), props, max_taps=3, rule="study", max_locality=0.5)
    assert q in sel.taps  # measured as not local: kept despite its kind
    assert local not in sel.taps and sel.excluded[local].startswith("locality: 0.8")
    with pytest.raises(SelectionError, match="locality"):
        select_taps(_sweep(), max_taps=3, max_locality=0.5)


def test_study_rule_prefers_quiet_steps() -> None:
    tap = "up_blocks.2.attentions.0"  # best PCK (41) at step 1, which is noisy
    noise = {tap: {"0": 0.0, "1": 0.9, "2": 0.5}}  # median 0.5: steps 0 and 2 count
    sel = select_taps(_sweep(), _properties(noise=noise), max_taps=8, rule="study")
    assert sel.steps[tap] == 0 and sel.scores[tap] == 40.0
    assert select_taps(_sweep(), max_taps=8).steps[tap] == 1


def test_readers_accept_the_probe_layout(tmp_path: Path) -> None:
    a, b = "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"
    data = _properties(
        rows=[],
        locality={a: -0.1, b: None},
        noise={a: {"0": 0.0, "2": 0.4}, b: [0.0, 0.1, 0.2]},
        granularity=[{"resolution": [4, 4], "taps": [a, b], "matrix": [[1.0, None], [0.5, 1.0]]}],
    )
    folder = tmp_path / "probe"
    folder.mkdir()
    props = read_properties(_write(folder / "properties.json", data), model=MODEL)
    assert props.locality == {a: -0.1}
    assert props.noise[b] == {0: 0.0, 1: 0.1, 2: 0.2} and props.noise[a] == {0: 0.0, 2: 0.4}
    assert props.similarity == {(b, a): 0.5, (a, b): 0.5}
    assert read_properties(folder).path == str(folder / "properties.json")
    _write(folder / "sweep.json", _sweep())
    assert len(read_sweep(folder).rows) == 3 * len(TAPS)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.update(rows=[]), "rows"),
        (lambda d: d["rows"][3].update(step=-1), "rows[3].step"),
        (lambda d: d["rows"][2].update(pck_bbox="high"), "rows[2].pck_bbox"),
        (lambda d: d["rows"][1].update(channels=0), "rows[1].channels"),
        (lambda d: d["rows"].append(dict(d["rows"][0])), "rows[24]"),
        (lambda d: d.pop("model"), "model"),
    ],
)
def test_bad_sweep_fields_are_named(tmp_path: Path, change: Any, field: str) -> None:
    data = _sweep()
    change(data)
    path = _write(tmp_path / "sweep.json", data)
    with pytest.raises(StudyFileError) as err:
        read_sweep(path)
    assert str(path) in str(err.value) and f"field {field!r}" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_properties_are_named() -> None:
    with pytest.raises(StudyFileError, match=r"field 'granularity\.4x4\.matrix'"):
        read_properties(_properties(granularity={"4x4": {"taps": ["a", "b"], "matrix": [[1]]}}))
    with pytest.raises(StudyFileError, match="field 'model'"):
        read_properties({"model": "sd15"}, model=MODEL)
    with pytest.raises(StudyFileError, match=r"field 'noise\.t'"):
        read_properties({"noise": {"t": {"late": 0.1}}})


def test_bad_arguments() -> None:
    with pytest.raises(SelectionError, match="budget"):
        select_taps(_sweep())
    with pytest.raises(SelectionError, match="metric"):
        select_taps(_sweep(), max_taps=2, metric="pck")
    with pytest.raises(SelectionError, match="max_taps"):
        select_taps(_sweep(), max_taps=0)
    with pytest.raises(SelectionError, match="no tap fits"):
        select_taps(_sweep(), max_channels=10)
    with pytest.raises(SelectionError, match="step 7"):
        select_taps(_sweep(), max_taps=2, step=7)


# --------------------------------------------------------------------------- preset files
def test_preset_round_trip(tmp_path: Path) -> None:
    sweep = _write(tmp_path / "sweep.json", _sweep())
    sel = select_taps(sweep, max_taps=3, max_channels=160)
    path = tmp_path / "top.yaml"
    written = write_preset(sel, path, name="top", model=MODEL, description="test preset")
    loaded = load_preset(path)
    assert loaded == written
    assert loaded.taps == sel.taps and loaded.model == MODEL and loaded.name == "top"
    derived = loaded.derived_from
    assert derived["sweep"] == str(sweep) and derived["metric"] == "pck_bbox"
    assert derived["budget"] == {"max_taps": 3, "max_channels": 160}
    assert derived["rule"] == "greedy" and derived["dataset"] == "synthetic"
    assert set(derived["scores"]) == set(sel.taps)
    assert yaml.safe_load(path.read_text())["format"] == PRESET_FORMAT
    as_json = write_preset(sel, tmp_path / "top.json", name="top")
    assert load_preset(tmp_path / "top.json").taps == as_json.taps
    with pytest.raises(ValueError, match="measured on"):
        write_preset(sel, tmp_path / "other.yaml", name="x", model="sd15")
    assert not (tmp_path / "other.yaml").exists()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("format: other\nmodel: m\ntaps: [a]\n", "format"),
        (f"format: {PRESET_FORMAT}\nmodel: m\ntaps: []\n", "taps"),
        (f"format: {PRESET_FORMAT}\nmodel: m\ntaps: [a, 3]\n", "taps[1]"),
        (f"format: {PRESET_FORMAT}\ntaps: [a]\n", "model"),
        (f"format: {PRESET_FORMAT}\nmodel: m\ntaps: [a, other.yaml]\n", "taps[1]"),
    ],
)
def test_load_preset_names_the_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PresetError) as err:
        load_preset(path)
    message = str(err.value)
    assert str(path) in message and f"field {field!r}" in message and "\n" not in message


def test_load_preset_refuses_unknown_fields_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"format: {PRESET_FORMAT}\nmodel: m\ntaps: [a]\ntapz: [b]\n")
    with pytest.raises(PresetError, match="unknown fields"):
        load_preset(path)
    path.write_text("taps: [a\n")
    with pytest.raises(PresetError, match="not valid YAML"):
        load_preset(path)
    with pytest.raises(PresetError, match="does not exist"):
        load_preset(tmp_path / "missing.yaml")


def _tiny_preset(tmp_path: Path, model: str = MODEL) -> Path:
    taps = ("up_blocks.1.resnets.0", "up_blocks.2.attentions.0.transformer_blocks.0.attn1:v")
    return save_preset(Preset(name="tiny", model=model, taps=taps), tmp_path / "tiny.yaml")


def test_settings_expand_a_preset_file(tmp_path: Path) -> None:
    path = _tiny_preset(tmp_path)
    settings = Settings(model=MODEL, taps=str(path))
    assert settings.taps == load_preset(path).taps
    assert settings.to_dict()["taps"] == list(settings.taps)  # the record stores names
    assert Settings(**settings.to_dict()) == settings
    mixed = Settings(model=MODEL, taps=["up_blocks.0.resnets.0", str(path)])
    assert mixed.taps == ("up_blocks.0.resnets.0", *settings.taps)
    config = tmp_path / "settings.yaml"
    config.write_text(f"model: {MODEL}\ntaps: {path}\n")
    assert Settings.from_yaml(config).taps == settings.taps


def test_a_preset_of_another_model_is_refused(tmp_path: Path) -> None:
    path = _tiny_preset(tmp_path, model="sd15")
    with pytest.raises(SettingsError) as err:
        Settings(model=MODEL, taps=str(path))
    message = str(err.value)
    assert "'taps'" in message and str(path) in message and "'sd15'" in message
    with pytest.raises(SettingsError, match="does not exist"):
        Settings(model=MODEL, taps=str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match="@sd15-study-rules"):
        Settings(taps="@no-such-preset")
    # the default model is sd15, and a hub id of the same weights is the same model
    assert Settings(taps=str(path)).taps == load_preset(path).taps
    hub = Settings(model="stable-diffusion-v1-5/stable-diffusion-v1-5", taps="@sd15-study-rules")
    assert len(hub.taps) == len(load_preset("@sd15-study-rules").taps)
    with pytest.raises(SettingsError, match="'sd15'"):
        Settings(model="sdxl", taps="@sd15-study-rules")


def _image(folder: Path) -> Path:
    folder.mkdir()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(folder / "a.png")
    return folder / "a.png"


def test_extract_takes_a_preset_file(tmp_path: Path) -> None:
    path = _tiny_preset(tmp_path)
    out = tmp_path / "features"
    args = ["extract", str(_image(tmp_path / "images")), "--out", str(out), "--model", MODEL]
    fast = ["--image-size", "64", "--num-steps", "1", "--steps", "0"]
    result = runner.invoke(app, [*args, "--taps", str(path), *fast])
    assert result.exit_code == 0, result.output
    maps, _meta = read_feature_file(out / "a.safetensors")
    assert set(maps[0]) == set(load_preset(path).taps)
    (tmp_path / "other").mkdir()
    other = _tiny_preset(tmp_path / "other", model="sd15")
    result = runner.invoke(app, [*args, "--taps", str(other), *fast, "--overwrite"])
    assert result.exit_code == 2 and "error:" in result.output and "'sd15'" in result.output


# --------------------------------------------------------------------------- shipped presets
@cache
def _catalogue(model: str) -> dict[str, TapInfo]:
    return {i.name: i for i in list_taps(unet_architecture(model))}


@pytest.mark.parametrize("name", sorted(shipped_presets()))
def test_shipped_presets_name_taps_of_their_model(name: str) -> None:
    preset = load_preset(f"@{name}")
    assert preset.name == name and preset.description
    catalogue = _catalogue(preset.model)
    assert set(preset.taps) <= set(catalogue)
    assert not any(catalogue[t].kind in LOCAL_KINDS for t in preset.taps)
    assert preset.derived_from["command"].startswith("hyperfeatures select --architecture")
    assert preset.taps == architecture_rules(preset.model).taps  # regenerated: the same
    assert Settings(model=preset.model, taps=f"@{name}").taps == preset.taps


def test_sd15_and_sdxl_presets_are_shipped() -> None:
    assert {"sd15-study-rules", "sdxl-study-rules"} <= set(shipped_presets())


# --------------------------------------------------------------------------- command line
def test_select_command_writes_a_preset(tmp_path: Path) -> None:
    sweep = _write(tmp_path / "sweep.json", _sweep())
    props = _write(tmp_path / "properties.json", _properties(locality={}))
    out = tmp_path / "best.yaml"
    budget = ["--max-taps", "3", "--max-channels", "160"]
    args = ["select", str(sweep), "--properties", str(props), *budget, "--rule", "study"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    preset = load_preset(out)
    assert preset.name == "best" and len(preset.taps) <= 3
    assert "up_blocks.1.resnets.0" in result.output and "55.00" in result.output
    assert "budget used" in result.output and str(out) in result.output
    assert Settings(model=MODEL, taps=str(out)).taps == preset.taps


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "budget"),
        (["--max-taps", "2", "--metric", "pck"], "unknown metric"),
        (["--max-taps", "2", "--rule", "best"], "unknown rule"),
        (["--max-taps", "2", "--properties", "missing.json"], "not found"),
    ],
)
def test_select_refuses_bad_input_with_one_line(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    sweep = _write(tmp_path / "sweep.json", _sweep())
    out = tmp_path / "p.yaml"
    result = runner.invoke(app, ["select", str(sweep), "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not out.exists()


def test_select_refuses_bad_files_and_existing_outputs(tmp_path: Path) -> None:
    bad = tmp_path / "sweep.json"
    bad.write_text("{not json")
    out = tmp_path / "p.yaml"
    result = runner.invoke(app, ["select", str(bad), "--max-taps", "2", "--out", str(out)])
    assert result.exit_code == 2 and "not valid JSON" in result.output and not out.exists()
    data = _sweep()
    data["rows"][0]["height"] = "tall"
    _write(bad, data)
    result = runner.invoke(app, ["select", str(bad), "--max-taps", "2", "--out", str(out)])
    assert result.exit_code == 2 and "rows[0].height" in result.output and not out.exists()
    out.write_text("keep")
    good = _write(tmp_path / "good.json", _sweep())
    result = runner.invoke(app, ["select", str(good), "--max-taps", "2", "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output and out.read_text() == "keep"
    result = runner.invoke(app, ["select", str(good), "--max-taps", "2", "--out", "p.txt"])
    assert result.exit_code == 2 and ".yaml" in result.output
    result = runner.invoke(app, ["select", "--max-taps", "2", "--out", str(tmp_path / "q.yaml")])
    assert result.exit_code == 2 and "--architecture" in result.output
    args = ["select", "--architecture", MODEL, "--max-taps", "2", "--out", str(out) + ".yaml"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "ranks nothing" in result.output


def test_select_architecture_writes_the_rules_preset(tmp_path: Path) -> None:
    out = tmp_path / "tiny-rules.yaml"
    result = runner.invoke(app, ["select", "--architecture", MODEL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    preset = load_preset(out)
    assert preset.model == MODEL and preset.taps == architecture_rules(MODEL).taps
    assert "no PCK" in preset.description
