"""The training feature cache (:class:`hyperfeatures.cache.FeatureCache`) and `cache build`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from hyperfeatures.cache import CacheMissError, FeatureCache, read_feature_file
from hyperfeatures.cli import app
from hyperfeatures.config import Settings
from hyperfeatures.datasets import load_image
from hyperfeatures.datasets._testing import write_image, write_spair_fixture
from hyperfeatures.pipeline import FeatureExtractor
from hyperfeatures.sources import load_source

SETTINGS = Settings(model="tiny-sd", num_steps=2, steps="all", image_size=64)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(load_source("tiny-sd"), SETTINGS)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five images of different sizes; two share a stem in different folders."""
    root = tmp_path_factory.mktemp("images")
    names = ["a/cat.jpg", "b/cat.jpg", "dog.png", "c d/bird (1).jpg", "eel.jpg"]
    return [write_image(root / n, (40 + 8 * i, 48), seed=i) for i, n in enumerate(names)]


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=300)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


def test_maps_equal_direct_extraction_in_fp16(
    tmp_path: Path, extractor: FeatureExtractor, images: list[Path]
) -> None:
    console = _quiet()
    cache = FeatureCache.build(
        tmp_path, extractor, images, batch_size=2, progress=False, console=console
    )
    assert len(cache) == len(images) and all(p in cache for p in images)
    assert cache.settings == extractor.settings and cache.directory.parent == tmp_path
    assert "5 images to compute" in console.file.getvalue()  # type: ignore[attr-defined]
    infos = {i.name: i for i in extractor.tap_info()}
    per_image = 2 * 2 * sum(i.channels * i.size[0] * i.size[1] for i in infos.values())
    assert per_image < cache.bytes_per_image < per_image + 8192
    for start in (0, 2, 4):  # the build's batches: the same batch gives the same rounding
        batch = images[start : start + 2]
        direct = extractor.extract([load_image(p) for p in batch])
        for j, path in enumerate(batch):
            maps = cache.maps(path)
            assert sorted(maps) == [0, 1] and list(maps[0]) == list(infos)
            for step, taps in maps.items():
                for tap, x in taps.items():
                    assert x.dtype == torch.float16 and x.shape == (
                        infos[tap].channels,
                        *infos[tap].size,
                    )
                    assert torch.equal(x, direct[step][tap][j].half())
            assert cache.path_for(path).stat().st_size <= cache.bytes_per_image
    wide = cache.maps(images[0], dtype=torch.float32, steps=[1], taps=[extractor.taps[0]])
    assert list(wide) == [1] and wide[1][extractor.taps[0]].dtype == torch.float32
    manifest = json.loads((cache.directory / "manifest.json").read_text())
    assert manifest["record"] == {
        "settings": extractor.settings.to_dict(),
        "kind": "diffusion",
        "dtype": "float32",
        "storage": "float16",
    }
    entry = manifest["images"][str(images[3].resolve())]
    assert entry["original_size"] == [64, 48] and " " not in entry["file"]
    assert len({e["file"] for e in manifest["images"].values()}) == len(images)
    _maps, meta = read_feature_file(cache.path_for(images[3]), steps=[])
    assert meta["cache"]["image"] == str(images[3].resolve())
    with pytest.raises(CacheMissError, match=r"nope\.jpg is not in the feature cache.*build"):
        cache.maps(tmp_path / "nope.jpg")


def test_resume_skips_finished_images(
    tmp_path: Path, extractor: FeatureExtractor, images: list[Path]
) -> None:
    cache = FeatureCache.build(tmp_path, extractor, images[:3], progress=False, console=_quiet())
    inodes = {p.name: p.stat().st_ino for p in cache.directory.glob("*.safetensors")}
    console = _quiet()
    again = FeatureCache.build(tmp_path, extractor, images, progress=False, console=console)
    assert "2 images to compute (3 cached" in console.file.getvalue()  # type: ignore[attr-defined]
    assert len(again) == 5 and again.directory == cache.directory
    after = {p.name: p.stat().st_ino for p in again.directory.glob("*.safetensors")}
    assert {k: after[k] for k in inodes} == inodes  # not rewritten
    again.path_for(images[0]).unlink()  # a lost file is computed again
    third = FeatureCache.build(tmp_path, extractor, images, progress=False, console=_quiet())
    assert images[0] in third and third.path_for(images[0]).is_file()


def test_other_settings_are_refused_by_name(
    tmp_path: Path, extractor: FeatureExtractor, images: list[Path]
) -> None:
    with pytest.raises(FileNotFoundError, match="no feature cache under"):
        FeatureCache.open(tmp_path, extractor, must_exist=True)
    built = FeatureCache.build(tmp_path, extractor, images[:1], progress=False, console=_quiet())
    other = FeatureExtractor(extractor.source, SETTINGS.replace(load_size=64, steps=[1]))
    with pytest.raises(ValueError, match=r"steps: \[1\] != \[0, 1\]; load_size: 64 != 224"):
        FeatureCache.open(tmp_path, other, must_exist=True)
    fresh = FeatureCache.open(tmp_path, other)  # not required to exist: a new key folder
    assert fresh.directory != built.directory and len(fresh) == 0
    assert FeatureCache.open(tmp_path, extractor, must_exist=True).directory == built.directory
    # a bare settings record (tap preset, no input size) finds the cache too
    found = FeatureCache.open(tmp_path, Settings(model="tiny-sd", num_steps=2, steps="all"))
    assert found.directory == built.directory and images[0] in found
    with pytest.raises(ValueError, match="num_steps: 3 != 2"):
        FeatureCache.open(tmp_path, SETTINGS.replace(num_steps=3), must_exist=True)


def test_max_gb_refuses_before_writing(
    tmp_path: Path, extractor: FeatureExtractor, images: list[Path]
) -> None:
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match="max_gb=1e-06 GB"):
        FeatureCache.build(root, extractor, images, max_gb=1e-6, progress=False, console=_quiet())
    assert not root.exists()


def test_corrupt_image_is_skipped_and_reported(
    tmp_path: Path, extractor: FeatureExtractor, images: list[Path]
) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    console = _quiet()
    cache = FeatureCache.build(
        tmp_path / "cache", extractor, [images[0], bad, images[1]], console=console, progress=False
    )
    assert f"skipped unreadable image {bad.resolve()}" in console.file.getvalue()  # type: ignore[attr-defined]
    assert len(cache) == 2 and bad not in cache and images[1] in cache
    assert list(cache.failed) == [str(bad.resolve())]
    manifest = json.loads((cache.directory / "manifest.json").read_text())
    assert list(manifest["failed"]) == [str(bad.resolve())]
    assert len(list(cache.directory.glob("*.safetensors"))) == 2
    assert not list(cache.directory.rglob("*.tmp"))


def test_two_shards_make_the_files_of_one_build(
    tmp_path: Path, extractor: FeatureExtractor, images: list[Path]
) -> None:
    kw = {"batch_size": 1, "progress": False, "console": _quiet()}
    half = FeatureCache.build(tmp_path / "sharded", extractor, images, shard=(0, 2), **kw)
    assert len(half) == 3 and images[1] not in half  # images 0, 2, 4
    FeatureCache.build(tmp_path / "sharded", extractor, images, shard=(1, 2), **kw)
    whole = FeatureCache.build(tmp_path / "single", extractor, images, **kw)
    sharded = FeatureCache.open(tmp_path / "sharded", extractor, must_exist=True)
    assert sharded.key == whole.key and len(sharded) == 5
    assert _files(sharded.directory) == _files(whole.directory)  # same names, same bytes
    merged = json.loads((sharded.directory / "manifest.json").read_text())
    single = json.loads((whole.directory / "manifest.json").read_text())
    assert merged["images"] == single["images"] and len(merged["images"]) == 5
    parts = sorted(p.name for p in (sharded.directory / "parts").iterdir())
    assert parts == ["shard-0-of-2.json", "shard-1-of-2.json"]
    with pytest.raises(ValueError, match="shard"):
        FeatureCache.build(tmp_path, extractor, images, shard=(2, 2), **kw)


def test_cli_cache_build_on_spair(tmp_path: Path, extractor: FeatureExtractor) -> None:
    data = write_spair_fixture(tmp_path / "spair", splits=("trn", "val"), pairs_per_category=2)
    config = tmp_path / "train.yaml"
    config.write_text(
        "settings: {model: tiny-sd, num_steps: 2, steps: all, image_size: 64}\n"
        f"train: {{dataset: spair, data_root: '{data}', cache: '{tmp_path / 'cache'}', "
        "val_max_pairs: 1}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["cache", "build", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(tmp_path / "cache", extractor, must_exist=True)
    assert "feature cache: 4 of 4 images" in result.output and cache.key in result.output
    assert all(p in cache for p in (data / "JPEGImages").rglob("*.jpg"))
    config.write_text(config.read_text().replace(f", cache: '{tmp_path / 'cache'}'", ""))
    result = runner.invoke(app, ["cache", "build", str(config)])
    assert result.exit_code == 2 and "pass --root DIR" in result.output
