"""Tests of the settings record (``hyperfeatures.config``): defaults, validation messages,
step forms, ``replace``, YAML I/O, ``differences``, immutability and ``matching_size``."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import hyperfeatures.config as config_module
from hyperfeatures.config import DEFAULT_STEPS, MAX_SIZE, Settings, SettingsError, parse_steps

PAPER_STEPS = (0, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49)


# --------------------------------------------------------------------------- defaults
def test_defaults_are_the_papers_evaluation_setting() -> None:
    s = Settings()
    assert s.model == "sd15"
    assert s.taps == "default"  # the source's own preset (dhf for diffusion models)
    assert s.num_steps == 50
    assert s.steps == PAPER_STEPS  # every:5 at T = 50: the paper's 11 steps
    assert s.image_size is None
    assert s.load_size == 224
    assert s.match_size is None
    assert s.posterior == "mean"
    assert s.seed == 0
    assert s.prompt == ""
    assert s.guidance_scale == 7.5
    assert s.negative_prompt == ""
    assert DEFAULT_STEPS == "every:5"
    assert MAX_SIZE == 4096


def test_docstring_table_lists_every_field_with_its_default() -> None:
    doc = config_module.__doc__ or ""
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^``(\w+)``\s+(\S+)", doc, re.M)}
    assert set(rows) == set(Settings.model_fields)
    defaults = Settings()
    for name, shown in rows.items():
        if name in ("steps", "taps"):  # a selection spec, shown as written
            assert shown == (DEFAULT_STEPS if name == "steps" else defaults.taps)
            continue
        value = getattr(defaults, name)
        expected = "``None``" if value is None else f"``{value!r}``"
        if isinstance(value, str):
            expected = f'``"{value}"``'
        assert shown == expected, name


def test_steps_are_stored_parsed_as_a_sorted_tuple() -> None:
    s = Settings(num_steps=10, steps=[9, 0, 4, 4])
    assert s.steps == (0, 4, 9)
    assert isinstance(s.steps, tuple)
    assert Settings(num_steps=10, steps="9,0").steps == (0, 9)
    assert Settings(taps=["a", " b "]).taps == ("a", "b")  # a list becomes a tuple, stripped
    assert Settings(taps=" dhf ").taps == "dhf"
    assert Settings(image_size=64.0).image_size == 64  # integral floats are ints
    assert type(Settings(num_steps=10.0).num_steps) is int


# --------------------------------------------------------------------------- validation
_FIELD_CASES = [
    # (field, bad value, what the message says came / why, the fix it names)
    ("model", 3, "valid string", "a registry name"),
    ("taps", [], "an empty list", "a preset name"),
    ("taps", "  ", "empty tap name", "a preset name"),
    ("taps", ["a", 3], "entries [3] are not tap names", "hyperfeatures layers"),
    ("taps", {"a": "b"}, "aliases are an option of capture()", "a preset name"),
    ("num_steps", True, "a boolean", "an integer T in 1..1000"),
    ("num_steps", 0, "greater than or equal to 1", "an integer T in 1..1000"),
    ("num_steps", 1001, "less than or equal to 1000", "an integer T in 1..1000"),
    ("num_steps", 2.5, "fractional part", "an integer T in 1..1000"),
    ("image_size", 4, "greater than or equal to 8", f"8..{MAX_SIZE}, or null for the default"),
    ("image_size", MAX_SIZE + 1, f"less than or equal to {MAX_SIZE}", f"8..{MAX_SIZE}"),
    ("image_size", True, "a boolean", "an integer number of pixels"),
    ("load_size", 4, "greater than or equal to 8", "null to resize directly"),
    ("load_size", 100_000, f"less than or equal to {MAX_SIZE}", "null to resize directly"),
    ("match_size", 7, "greater than or equal to 8", "null for load_size"),
    ("match_size", False, "a boolean", "null for load_size"),
    ("posterior", "median", "'mean' or 'sample'", "'mean' or 'sample'"),
    ("seed", -1, "greater than or equal to 0", "a non-negative integer"),
    ("seed", True, "a boolean", "a non-negative integer"),
    ("prompt", 3, "valid string", "a string"),
    ("guidance_scale", math.nan, "not a finite number", "7.5 is the usual value"),
    ("guidance_scale", math.inf, "not a finite number", "1 = no guidance"),
    ("guidance_scale", "strong", "valid number", "a finite number"),
    ("negative_prompt", None, "valid string", "a string"),
]


@pytest.mark.parametrize(
    ("field", "value", "why", "fix"),
    _FIELD_CASES,
    ids=[f"{c[0]}={c[1]!r}" for c in _FIELD_CASES],
)
def test_every_field_error_names_the_field_and_the_fix(
    field: str, value: object, why: str, fix: str
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings(**{field: value})
    msg = str(info.value)
    assert f"settings field {field!r}" in msg
    assert f"got {value!r}" in msg
    assert why in msg
    assert f"expected {fix}" in msg or fix in msg.split("expected", 1)[1]
    assert isinstance(info.value, ValueError)  # callers may catch ValueError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": "every:0"}, "cannot read steps 'every:0'"),
        ({"steps": "every:x"}, "cannot read steps 'every:x'"),
        ({"steps": "first:0"}, "1 <= K <= 50"),
        ({"num_steps": 10, "steps": "first:11"}, "1 <= K <= 10"),
        ({"steps": "0,a"}, "a comma list like '0,4,9'"),
        ({"steps": [1.5]}, "a list of integers such as [0, 4, 9]"),
        ({"steps": [True]}, "a list of integers"),
        ({"steps": True}, "'all', 'every:N', 'first:K' or '0,4,9'"),
        ({"num_steps": 3, "steps": "0,3"}, "steps [3] are outside 0..2 for 3 inference steps"),
        ({"num_steps": 3, "steps": [-1]}, "outside 0..2"),
        ({"steps": ""}, "outside 0..49"),
    ],
)
def test_bad_steps_forms_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings(**kwargs)
    assert "settings field 'steps'" in str(info.value)
    assert message in str(info.value)


def test_unknown_field_suggests_the_close_name_and_lists_the_valid_ones() -> None:
    with pytest.raises(SettingsError) as info:
        Settings(tapz="dhf")
    msg = str(info.value)
    assert "unknown settings field 'tapz'; did you mean 'taps'?" in msg
    assert "Valid fields: " + ", ".join(Settings.model_fields) in msg
    with pytest.raises(SettingsError, match="unknown settings field 'zzz' Valid fields"):
        Settings(zzz=1)  # nothing close: no suggestion


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(SettingsError) as info:
        Settings(num_steps=0, posterior="x")
    msg = str(info.value)
    assert "settings field 'num_steps'" in msg and "settings field 'posterior'" in msg


def test_size_bounds_are_inclusive() -> None:
    assert Settings(image_size=8, load_size=MAX_SIZE, match_size=8).image_size == 8
    assert Settings(load_size=None, match_size=None).load_size is None


def test_from_dict_names_its_source() -> None:
    assert Settings.from_dict({"num_steps": 4, "steps": "all"}).steps == (0, 1, 2, 3)
    with pytest.raises(SettingsError, match=r"^my config: settings field 'seed'"):
        Settings.from_dict({"seed": -2}, source="my config")
    with pytest.raises(SettingsError, match="my config: expected a mapping of settings, got list"):
        Settings.from_dict([1, 2], source="my config")  # type: ignore[arg-type]


def test_string_num_steps_does_not_silently_drop_the_steps() -> None:
    try:
        s = Settings(num_steps="10", steps="0,5")
    except SettingsError:
        return  # refusing the string is fine too
    assert s.steps == (0, 5)


# --------------------------------------------------------------------------- steps
def test_parse_steps_forms() -> None:
    assert parse_steps("all", 4) == [0, 1, 2, 3]
    assert parse_steps(None, 3) == [0, 1, 2]
    assert parse_steps("every:5", 50) == list(PAPER_STEPS)  # the paper's 11 steps
    assert len(parse_steps("every:5", 50)) == 11
    assert parse_steps("every:1", 5) == [0, 1, 2, 3, 4]
    assert parse_steps("every:2", 4) == [0, 1, 3]
    assert parse_steps("every:100", 50) == [0, 49]  # the noisiest step and step 0
    assert parse_steps("first:3", 50) == [0, 1, 2]
    assert parse_steps("first:50", 50) == list(range(50))
    assert parse_steps("0,4,9", 10) == [0, 4, 9]
    assert parse_steps(" 9, 0 ,4 ", 10) == [0, 4, 9]
    assert parse_steps([9, 0, 4, 4], 10) == [0, 4, 9]
    assert parse_steps((4.0, 1), 10) == [1, 4]
    assert parse_steps(3, 5) == [3]
    assert parse_steps([0], 1) == [0]
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        parse_steps([5], 5)
    with pytest.raises(ValueError, match="cannot read steps"):
        parse_steps(False, 5)


# --------------------------------------------------------------------------- replace
def test_replace_returns_a_validated_copy() -> None:
    s = Settings(model="tiny-sd", num_steps=10, steps="0,1")
    t = s.replace(seed=3, prompt="a cat")
    assert (t.seed, t.prompt, t.model, t.steps) == (3, "a cat", "tiny-sd", (0, 1))
    assert (s.seed, s.prompt) == (0, "")  # the original is unchanged
    assert s.replace() == s
    with pytest.raises(SettingsError, match="settings field 'seed'"):
        s.replace(seed=-1)
    with pytest.raises(SettingsError, match="did you mean 'steps'"):
        s.replace(stepz="all")
    with pytest.raises(SettingsError, match=r"outside 0\.\.9"):
        s.replace(steps=[10])
    assert s.replace(steps="all").steps == tuple(range(10))


def test_replace_num_steps_re_derives_the_steps() -> None:
    s = Settings()
    assert s.replace(num_steps=10).steps == (0, 4, 9)  # every:5 of the new T
    assert s.replace(num_steps=1).steps == (0,)
    assert s.replace(num_steps=10, steps="all").steps == tuple(range(10))
    # steps that still fit the new T are kept
    kept = Settings(num_steps=10, steps="0,1")
    assert kept.replace(num_steps=3).steps == (0, 1)
    assert kept.replace(num_steps=100).steps == (0, 1)
    with pytest.raises(SettingsError, match="settings field 'num_steps'"):
        s.replace(num_steps=0)


# --------------------------------------------------------------------------- YAML
def test_yaml_round_trip(tmp_path: Path) -> None:
    s = Settings(
        model="tiny-sd",
        taps=["up_blocks.1.resnets.0", "up_blocks.3.resnets.2"],
        num_steps=10,
        steps="every:3",
        image_size=64,
        load_size=None,
        match_size=32,
        posterior="sample",
        seed=5,
        prompt="a photo: of 'x'",
        guidance_scale=3.0,
        negative_prompt="blurry",
    )
    path = tmp_path / "sub" / "settings.yaml"
    path.parent.mkdir()
    text = s.to_yaml(path)
    assert path.read_text(encoding="utf-8") == text
    assert [p.name for p in path.parent.iterdir()] == ["settings.yaml"]  # no temp file left
    back = Settings.from_yaml(path)
    assert back == s
    assert back.differences(s) == []
    assert Settings.from_yaml(path).to_dict() == s.to_dict()
    assert s.to_dict()["steps"] == [0, 3, 6, 9]  # a plain list in files
    assert s.to_dict()["taps"] == ["up_blocks.1.resnets.0", "up_blocks.3.resnets.2"]
    # the default record round-trips too (preset taps, None sizes)
    Settings().to_yaml(tmp_path / "d.yaml")
    assert Settings.from_yaml(tmp_path / "d.yaml") == Settings()


def test_yaml_partial_and_empty_files_use_defaults(tmp_path: Path) -> None:
    part = tmp_path / "part.yaml"
    part.write_text("model: tiny-sd\nnum_steps: 4\nsteps: all\n", encoding="utf-8")
    s = Settings.from_yaml(part)
    assert (s.model, s.num_steps, s.steps, s.load_size) == ("tiny-sd", 4, (0, 1, 2, 3), 224)
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert Settings.from_yaml(empty) == Settings()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [tiny-sd\n", "is not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping of settings, got list"),
        ("just a string\n", "expected a mapping of settings, got str"),
        ("stepz: all\n", "unknown settings field 'stepz'; did you mean 'steps'?"),
        ("seed: -3\n", "settings field 'seed': got -3"),
    ],
    ids=["bad-yaml", "list", "scalar", "unknown-key", "bad-value"],
)
def test_bad_yaml_files_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad settings.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        Settings.from_yaml(path)
    assert f"settings file {path}" in str(info.value)
    assert message in str(info.value)


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"settings file .*nowhere\.yaml does not exist"):
        Settings.from_yaml(tmp_path / "nowhere.yaml")


# --------------------------------------------------------------------------- other
def test_differences() -> None:
    a = Settings()
    assert a.differences(Settings()) == []
    b = a.replace(seed=3, taps=["x"], load_size=None)
    assert a.differences(b) == [
        "taps: 'default' != ['x']",
        "load_size: 224 != None",
        "seed: 0 != 3",
    ]
    assert b.differences(a)[0] == "taps: ['x'] != 'default'"


def test_settings_are_frozen_and_hashable() -> None:
    s = Settings()
    with pytest.raises(ValueError, match="frozen"):
        s.seed = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        s.steps = (0,)  # type: ignore[misc]
    assert s.seed == 0 and s.steps == PAPER_STEPS
    assert s == Settings() and hash(s) == hash(Settings())
    assert len({s, Settings(), s.replace(seed=1)}) == 2


def test_matching_size_fallbacks() -> None:
    assert Settings().matching_size == 224  # load_size
    assert Settings(match_size=32).matching_size == 32
    assert Settings(match_size=32, load_size=None, image_size=64).matching_size == 32
    assert Settings(load_size=None, image_size=64).matching_size == 64
    assert Settings(load_size=None).matching_size is None  # the source's default


def test_replace_keeps_what_was_given_explicitly() -> None:
    base = Settings(model="tiny-sd", image_size=64)
    changed = base.replace(match_size=48)
    assert changed.model_fields_set == {"model", "image_size", "match_size"}
    assert changed.match_size == 48 and changed.image_size == 64
