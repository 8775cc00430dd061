"""The model does not wait for the disk: ``extract`` decodes the next images in a loader
thread and writes each batch in a writer thread (``DiskWriter(background=True)``), with the
same files, manifest and failure handling as when everything ran in turn."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import hyperfeatures.extract_inputs as extract_inputs
import hyperfeatures.sinks as sinks
from hyperfeatures.cache import read_feature_file
from hyperfeatures.cli import app
from hyperfeatures.sinks import DiskWriter

FAST = ["--model", "tiny-sd", "--num-steps", "2", "--steps", "all", "--image-size", "64"]


def _batch(writer: DiskWriter, keys: list[str], value: float) -> None:
    writer.begin_batch(keys, [{"i": str(i)} for i in range(len(keys))])
    writer(0, "tap", torch.full((len(keys), 2, 3, 3), value))


def test_background_writer_writes_the_same_files(tmp_path: Path) -> None:
    sync, background = DiskWriter(tmp_path / "sync"), DiskWriter(tmp_path / "bg", background=True)
    for writer in (sync, background):
        _batch(writer, ["a", "b"], 1.0)
        writer.end_batch()
        _batch(writer, ["c"], 2.0)
        writer.end_batch()
    assert background.wait() == [tmp_path / "bg" / "c.safetensors"]  # the last batch's files
    background.close()
    for name in ("a", "b", "c"):
        want, want_meta = read_feature_file(tmp_path / "sync" / f"{name}.safetensors")
        got, got_meta = read_feature_file(tmp_path / "bg" / f"{name}.safetensors")
        torch.testing.assert_close(got[0]["tap"], want[0]["tap"], rtol=0, atol=0)
        assert got_meta == want_meta


def test_background_write_errors_reach_the_caller(tmp_path: Path) -> None:
    writer = DiskWriter(tmp_path / "bg", background=True)
    _batch(writer, ["a"], 1.0)
    (tmp_path / "bg").rmdir()
    (tmp_path / "bg").write_text("a file where the folder was")
    writer.end_batch()  # returns at once; the error comes with wait()
    with pytest.raises(OSError):
        writer.wait()
    writer.close()


def _images(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def test_extract_loads_and_writes_beside_the_model(tmp_path: Path, monkeypatch) -> None:
    threads: dict[str, set[str]] = {"load": set(), "write": set()}
    load, write = extract_inputs.load_input, sinks.write_feature_file

    def loading(*args, **kwargs):
        threads["load"].add(threading.current_thread().name)
        return load(*args, **kwargs)

    def writing(*args, **kwargs):
        threads["write"].add(threading.current_thread().name)
        return write(*args, **kwargs)

    import hyperfeatures.extract as extract

    monkeypatch.setattr(extract, "load_input", loading)
    monkeypatch.setattr(sinks, "write_feature_file", writing)
    folder = _images(tmp_path / "images", 5)
    (folder / "img2.png").write_bytes(b"not an image")  # fails alone, as before
    out = tmp_path / "features"
    result = CliRunner().invoke(
        app, ["extract", str(folder), "--out", str(out), "--batch-size", "2", *FAST]
    )
    assert result.exit_code == 3, result.output
    assert all(name.startswith("hyperfeatures-loader") for name in threads["load"])
    assert threads["write"] and all(n.startswith("hyperfeatures-writer") for n in threads["write"])
    manifest = json.loads((out / "manifest.json").read_text())
    status = {item["key"]: item["status"] for item in manifest["items"]}
    assert status == {"img0": "ok", "img1": "ok", "img2": "failed", "img3": "ok", "img4": "ok"}
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"img{i}.safetensors" for i in (0, 1, 3, 4)
    ]
    assert not list(out.glob(".*"))  # no temporary files left
    assert not [t for t in threading.enumerate() if t.name.startswith("hyperfeatures-")]


def test_evaluate_decodes_the_next_pair_ahead(tmp_path: Path, monkeypatch) -> None:
    import warnings

    import hyperfeatures.evaluation.prefetch as prefetch
    from hyperfeatures.config import Settings
    from hyperfeatures.datasets.synthetic import make_warped_pairs, sample_photos
    from hyperfeatures.evaluation import create_method, evaluate

    threads: list[str] = []
    load = prefetch.load_image

    def loading(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return load(*args, **kwargs)

    monkeypatch.setattr(prefetch, "load_image", loading)
    pairs = make_warped_pairs(sample_photos()[:2], tmp_path, pairs_per_image=2, size=64, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = create_method("layer-4", Settings(model="tiny-sd", image_size=64))
    result = evaluate(method, pairs, progress=False)
    assert len(result.predictions) == 4
    # 2 sources + 4 targets, each decoded once: the first pair's two on the main thread,
    # every later one ahead of its pair in the loader thread
    assert len(threads) == 6
    assert sum(name.startswith("hyperfeatures-loader") for name in threads) == 4
    assert not [t for t in threading.enumerate() if t.name.startswith("hyperfeatures-")]


def test_prefetcher_is_bounded_and_reports_bad_files(tmp_path: Path) -> None:
    from hyperfeatures.datasets.images import ImageLoadError
    from hyperfeatures.evaluation.prefetch import ImagePrefetcher

    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i, 0, 0)).save(paths[-1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with ImagePrefetcher() as loader:
        loader.ahead(paths, "pair x")
        assert len(loader._ahead) == ImagePrefetcher.KEEP  # the oldest were dropped
        assert loader.load(paths[-1], "pair x").getpixel((0, 0)) == (5, 0, 0)
        assert loader.load(paths[0], "pair x").getpixel((0, 0)) == (0, 0, 0)  # decoded now
        loader.ahead([bad], "pair y")
        with pytest.raises(ImageLoadError, match=r"bad\.png"):
            loader.load(bad, "pair y")
