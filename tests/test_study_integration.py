"""Where the activation-study pieces meet the rest: presets in `layers`, processes that only a
diffusion source has, templates refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.pipeline import FeatureExtractor
from hyperfeatures.presets import load_preset
from hyperfeatures.sources import load_source

runner = CliRunner()


def test_layers_lists_the_taps_of_a_preset_file() -> None:
    from hyperfeatures.cli import app

    result = runner.invoke(app, ["layers", "--model", "sd15", "--taps", "@sd15-study-rules"])
    assert result.exit_code == 0, result.output
    listed = [line.split("\t")[0] for line in result.output.splitlines()[2:-1]]
    assert set(listed) == set(load_preset("@sd15-study-rules").taps)


@pytest.mark.parametrize("field", [{"process": "noise"}, {"ensemble": 2}])
def test_non_diffusion_sources_refuse_a_diffusion_process(field: dict) -> None:
    source = load_source("tiny-dino")
    settings = Settings(model="tiny-dino", num_steps=1, image_size=112, **field)
    with pytest.raises(SettingsError, match="has no diffusion process"):
        FeatureExtractor(source, settings)


def test_extract_refuses_a_category_template_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hyperfeatures import pipeline
    from hyperfeatures.cli import app

    def no_model(*_a: object, **_k: object) -> None:
        raise AssertionError("the model must not load")

    monkeypatch.setattr(pipeline.FeatureExtractor, "from_settings", no_model)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "extract",
            str(image),
            "--out",
            str(out),
            "--model",
            "tiny-sd",
            "--process",
            "noise",
            "--prompt",
            "a photo of a {category}",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "is a template" in result.output and "Traceback" not in result.output
    assert not out.exists()
