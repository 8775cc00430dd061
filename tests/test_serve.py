"""Tests of ``hyperfeatures serve`` without a browser: the session logic on the tiny model,
uploads, the descriptor cache, and the command's checks (Gradio's server is never started)."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cli import app
from hyperfeatures.config import Settings
from hyperfeatures.serve import session as session_module
from hyperfeatures.serve.session import (
    DEFAULT_TINY_IMAGE_SIZE,
    ServeSession,
    UploadError,
    compatible_model,
    default_model,
    load_sample,
    load_upload,
    sample_names,
)

FAST = "layer-4"  # one UNet call on tiny-sd: about a second per image on one CPU thread


def _texture(size: tuple[int, int], cell: int = 8, seed: int = 0) -> Image.Image:
    """Random colour blocks: strong local structure for random-weight features."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, size=(h // cell + 1, w // cell + 1, 3), dtype=np.uint8)
    big = Image.fromarray(blocks).resize((blocks.shape[1] * cell, blocks.shape[0] * cell), 0)
    return big.crop((0, 0, w, h))


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {name: load_sample(name) for name in sample_names()}


@pytest.fixture(scope="module")
def session() -> ServeSession:
    """One session for the module: methods are built once."""
    return ServeSession(Settings(num_steps=5, steps="all"))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the images the session's methods describe (each pipeline call)."""
    calls: list[int] = []
    real = session_module.call_descriptors

    def counting(method: Any, imgs: list[Image.Image], category: str | None) -> Any:
        calls.append(len(imgs))
        return real(method, imgs, category)

    monkeypatch.setattr(session_module, "call_descriptors", counting)
    return calls


# --------------------------------------------------------------------------- clicks
def test_click_lands_inside_the_target_with_a_heat_map_of_its_size(
    session: ServeSession, images: dict[str, Image.Image]
) -> None:
    src, trg = images["astronaut.jpg"], images["chelsea.jpg"]
    result = session.click(src, trg, 120, 90, FAST, "tiny-sd")
    w, h = trg.size
    px, py = result.point
    assert 0 <= px < w and 0 <= py < h
    assert -1.0 - 1e-5 <= result.similarity <= 1.0 + 1e-5
    for picture in (result.heatmap, result.marked):
        assert picture.shape == (h, w, 3) and picture.dtype == np.uint8
    assert result.similarity_map.shape == (h, w) and result.similarity_map.dtype == np.float32
    assert not np.array_equal(result.heatmap, np.asarray(trg))  # coloured over the target
    assert "source (120, 90) -> target" in result.text()


def test_identical_images_match_the_clicked_point(session: ServeSession) -> None:
    """On the (64 x 64) hyperfeature map, not layer-4's 4 x 4 map whose upsampled border
    region is flat (ties)."""
    image = _texture((160, 120))
    for x, y in [(20, 30), (100, 60), (150, 110)]:
        result = session.click(image, image, x, y, "hyperfeatures", "tiny-sd")
        px, py = result.point
        cell = 160 / session.method("hyperfeatures", "tiny-sd").match_size
        assert abs(px - x) <= 2 * cell + 1 and abs(py - y) <= 2 * cell + 1, (x, y, px, py)
        assert result.similarity == pytest.approx(1.0, abs=1e-4)


def test_a_click_outside_the_source_is_clipped_into_it(
    session: ServeSession, images: dict[str, Image.Image]
) -> None:
    src = images["coffee.jpg"]
    result = session.click(src, src, 10_000, -5, FAST, "tiny-sd")
    sx, sy = result.source_point
    assert 0 <= sx < src.size[0] and sy == 0


def test_tiny_diffusion_models_default_to_a_small_input(session: ServeSession) -> None:
    assert session.settings_for(FAST, "tiny-sd").image_size == DEFAULT_TINY_IMAGE_SIZE
    assert session.settings_for("dinov2", "tiny-dinov2").image_size is None
    given = ServeSession(Settings(image_size=64))
    assert given.settings_for(FAST, "tiny-sd").image_size == 64


# --------------------------------------------------------------------------- cache
def test_a_second_click_on_the_same_pair_computes_nothing(
    images: dict[str, Image.Image], counted: list[int]
) -> None:
    session = ServeSession(Settings(num_steps=5, steps="all"))
    src, trg = images["astronaut.jpg"], images["coffee.jpg"]
    first = session.click(src, trg, 50, 60, FAST, "tiny-sd")
    assert len(counted) == 2 and first.computed == 2
    again = session.click(src, trg, 200, 100, FAST, "tiny-sd")
    assert len(counted) == 2 and again.computed == 0
    assert session.cache.hits >= 2
    # the same pixels under another name (a fresh copy) hit the cache too: keys are content
    session.click(src.copy(), trg.copy(), 10, 10, FAST, "tiny-sd")
    assert len(counted) == 2
    # another method describes the images again
    session.click(src, trg, 10, 10, "tap:up_blocks.1.resnets.1", "tiny-sd")
    assert len(counted) == 4
    assert session.descriptor_calls == 4


def test_the_cache_evicts_at_its_bound(images: dict[str, Image.Image], counted: list[int]) -> None:
    session = ServeSession(Settings(num_steps=5, steps="all"), cache_items=2)
    a, b, c = (images[n] for n in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg"))
    session.click(a, b, 10, 10, FAST, "tiny-sd")
    assert len(counted) == 2 and len(session.cache) == 2
    session.click(a, c, 10, 10, FAST, "tiny-sd")  # a is kept (just used), b goes
    assert len(counted) == 3 and len(session.cache) == 2
    session.click(a, b, 10, 10, FAST, "tiny-sd")  # b computed again
    assert len(counted) == 4 and len(session.cache) == 2


def test_the_cache_bound_in_bytes(images: dict[str, Image.Image]) -> None:
    session = ServeSession(Settings(num_steps=5, steps="all"), cache_bytes=1)
    a, b = images["astronaut.jpg"], images["chelsea.jpg"]
    session.click(a, b, 10, 10, FAST, "tiny-sd")
    assert len(session.cache) == 1  # the newest entry is always kept


def test_methods_are_built_lazily_and_bounded() -> None:
    built: list[str] = []

    def create(name: str, settings: Settings, **kwargs: Any) -> Any:
        built.append(f"{name}/{settings.model}")
        return type("Fake", (), {"match_size": 8, "describe": lambda self: {"n": name}})()

    session = ServeSession(create=create, max_methods=2)
    assert built == []
    session.method("layer-4", "tiny-sd")
    session.method("layer-4", "tiny-sd")
    session.method("dinov2", "tiny-dinov2")
    session.method("dino", "tiny-dino")  # evicts layer-4
    session.method("layer-4", "tiny-sd")
    assert built == [
        "layer-4/tiny-sd",
        "dinov2/tiny-dinov2",
        "dino/tiny-dino",
        "layer-4/tiny-sd",
    ]


# --------------------------------------------------------------------------- errors
def test_unknown_method_or_model_is_a_clear_error(
    session: ServeSession, images: dict[str, Image.Image]
) -> None:
    a = images["astronaut.jpg"]
    with pytest.raises(ValueError, match="unknown method 'hyperfeaturez'"):
        session.click(a, a, 1, 1, "hyperfeaturez", "tiny-sd")
    with pytest.raises(ValueError, match=r"unknown model|not a registry name"):
        session.click(a, a, 1, 1, FAST, "tiny-sdd")
    with pytest.raises(ValueError, match="fusion"):
        session.method("fusion", "tiny-sd")


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with an empty Hugging Face cache (also for an already imported hub client)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_missing_weights_show_in_the_status_not_a_crash(
    empty_hf_cache: Path, images: dict[str, Image.Image]
) -> None:
    page = pytest.importorskip("hyperfeatures.serve.app", reason="gradio is not installed")
    from hyperfeatures.sources.hub import WeightsNotFoundError

    session = ServeSession()
    a = images["astronaut.jpg"]
    with pytest.raises(WeightsNotFoundError):
        session.method("layer-4", "sd15")
    out = page.click_outputs(session, a, a, "layer-4", "sd15", [5, 5])
    assert len(out) == 5 and out[3] == ""
    assert out[4].startswith("error: ") and "hf download" in out[4], out[4]
    assert "Traceback" not in out[4]
    missing = page.click_outputs(session, None, a, "layer-4", "tiny-sd", [5, 5])
    assert "pick or upload both images" in missing[4]


def test_page_click_gives_marked_images_and_the_match_text(
    session: ServeSession, images: dict[str, Image.Image]
) -> None:
    page = pytest.importorskip("hyperfeatures.serve.app", reason="gradio is not installed")
    a, b = images["astronaut.jpg"], images["chelsea.jpg"]
    shown, marked, heat, text, status = page.click_outputs(session, a, b, FAST, "tiny-sd", [9, 9])
    assert shown.size == a.size and marked.shape == heat.shape == (b.size[1], b.size[0], 3)
    assert text.startswith("match: (") and "similarity" in text
    assert status.startswith(f"{FAST} on tiny-sd: source (9, 9)")
    update, note = page.method_outputs("dinov2", "tiny-sd")
    assert "tiny-dinov2" in note and update["value"] == "tiny-dinov2"


def test_model_menus_follow_the_method() -> None:
    assert default_model("dinov2") == "tiny-dinov2" and default_model("hyperfeatures") == "tiny-sd"
    assert compatible_model("dinov2", "tiny-sd") == "tiny-dinov2"
    assert compatible_model("dino", "sd15") == "dino-vits8"
    assert compatible_model("layer-4", "tiny-dino") == "tiny-sd"
    assert compatible_model("layer-4", "sdxl") == "sdxl"
    assert compatible_model("layer-4", "some/hub-model") == "some/hub-model"


# --------------------------------------------------------------------------- uploads
def test_upload_too_many_bytes(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    _texture((64, 64)).save(path)
    with pytest.raises(UploadError, match=r"'big.png' is .* MB, more than the limit of"):
        load_upload(path, max_bytes=100)


def test_upload_too_many_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hyperfeatures.datasets.images as image_module

    path = tmp_path / "wide.png"
    _texture((64, 32)).save(path)
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UploadError, match="MAX_IMAGE_PIXELS") as info:
        load_upload(path, name="my wide.png")
    assert "'my wide.png'" in str(info.value) and str(tmp_path) not in str(info.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_upload_corrupt_image(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "broken.jpg"
    if kind == "garbage":
        path.write_bytes(b"this is not an image at all" * 10)
    else:
        buffer = io.BytesIO()
        _texture((128, 128)).save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UploadError, match=r"upload rejected: .*'broken\.jpg'") as info:
        load_upload(path)
    assert str(tmp_path) not in str(info.value)


def test_upload_is_downscaled_to_the_max_side(tmp_path: Path) -> None:
    path = tmp_path / "large.png"
    _texture((900, 300)).save(path)
    image = load_upload(path, max_side=300)
    assert image.size == (300, 100) and image.mode == "RGB"


def test_page_shows_a_bad_upload_as_a_message(tmp_path: Path) -> None:
    page = pytest.importorskip("hyperfeatures.serve.app", reason="gradio is not installed")
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = page.upload_outputs(str(path), 2**20, 256)
    assert out[4].startswith("error: upload rejected:") and "broken.png" in out[4]
    good = tmp_path / "ok.png"
    _texture((40, 30)).save(good)
    state, shown, match, heat, status = page.upload_outputs(str(good), 2**20, 256)
    assert state.size == shown.size == (40, 30) and match is None and heat is None
    assert "ok.png: 40 x 30 px" in status
    with pytest.raises(UploadError):
        load_sample("../../etc/passwd")
    assert page.pick_outputs("nope.jpg", 256)[4].startswith("error: unknown sample image")


# --------------------------------------------------------------------------- command
def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["serve", *args])


@pytest.fixture
def fake_launch(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replaces the Gradio launcher: records its arguments and the environment it saw."""
    page = pytest.importorskip("hyperfeatures.serve.app", reason="gradio is not installed")
    calls: list[dict[str, Any]] = []

    def launch(session: ServeSession, **kwargs: Any) -> None:
        temp = os.environ["GRADIO_TEMP_DIR"]
        kwargs.update(
            session=session,
            temp=temp,
            temp_existed=Path(temp).is_dir(),
            analytics=os.environ.get("GRADIO_ANALYTICS_ENABLED"),
        )
        calls.append(kwargs)

    monkeypatch.setattr(page, "launch", launch)
    return calls


def test_serve_defaults_to_loopback_and_removes_its_temp_dir(
    fake_launch: list[dict[str, Any]],
) -> None:
    result = _invoke("--port", "0", "--cache-items", "3", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    (call,) = fake_launch
    assert call["host"] == "127.0.0.1" and 0 < call["port"] < 65536
    assert call["model"] == "tiny-sd" and call["method"] == "hyperfeatures"
    assert call["max_upload_bytes"] == 20 * 2**20
    assert call["session"].cache.max_items == 3
    assert call["temp_existed"] and call["analytics"] == "False"
    assert not Path(call["temp"]).exists()  # removed at exit
    assert "GRADIO_TEMP_DIR" not in os.environ or os.environ["GRADIO_TEMP_DIR"] != call["temp"]


def test_serve_warns_for_a_non_loopback_host(fake_launch: list[dict[str, Any]]) -> None:
    result = _invoke("--host", "0.0.0.0", "--port", "7999")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "not a loopback address" in result.stderr
    assert fake_launch[0]["host"] == "0.0.0.0" and fake_launch[0]["port"] == 7999
    quiet = _invoke("--host", "localhost", "--method", "dinov2", "--max-upload-mb", "2")
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr
    assert fake_launch[1]["model"] == "tiny-dinov2"
    assert fake_launch[1]["max_upload_bytes"] == 2 * 2**20


def test_serve_without_gradio_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    result = _invoke()
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert 'pip install "hyperfeatures[demo]"' in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--method", "hyperfeaturez"), "unknown method 'hyperfeaturez'"),
        (("--model", "tiny-sdd"), "unknown model 'tiny-sdd'"),
        (("--port", "70000"), "--port must be an integer 0..65535"),
        (("--cache-items", "0"), "--cache-items must be an integer"),
        (("--max-upload-mb", "0"), "--max-upload-mb must be in"),
        (("--method", "layer-4", "--aggregator", "x.pt"), "--aggregator: not an option"),
        (("--method", "fusion"), "fusion"),
        (("--image-size", "3"), "--image-size must be an integer"),
        (("--threads", "-1"), "--threads must be an integer 0..1024"),
    ],
)
def test_serve_bad_flags_are_one_error_line(args: tuple[str, ...], message: str) -> None:
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0], lines[0]
