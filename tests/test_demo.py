"""The demo runs end to end on the bundled tiny model and sample images."""

from __future__ import annotations

import json

from PIL import Image

from hyperfeatures.cache import read_feature_file
from hyperfeatures.demo import run_demo, sample_image_paths


def test_sample_images_are_bundled():
    paths = sample_image_paths()
    assert len(paths) == 3
    for path in paths:
        with Image.open(path) as img:
            assert img.mode == "RGB" and max(img.size) == 256


def test_demo_writes_every_output(tmp_path):
    written = run_demo(tmp_path, image_size=64, num_steps=2)
    names = {p.name for p in written}
    assert {"manifest.json", "correspondences.png", "mixing_weights.png", "warp.png"} <= names
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
    manifest = json.loads((tmp_path / "features" / "manifest.json").read_text())
    assert [i["status"] for i in manifest["items"]] == ["ok"] * 3
    maps, meta = read_feature_file(tmp_path / "features" / "chelsea.safetensors")
    assert sorted(maps) == [0, 1] and len(maps[0]) == 12
    assert meta["model"] == "tiny-sd"
