"""``hyperfeatures extract``: batch feature extraction to disk.

Writes into ``out``:

- ``<key>.safetensors`` per image or prompt (the format of :mod:`hyperfeatures.cache`):
  tensors ``step_{k}/{tap}`` of shape ``(C, h, w)`` and metadata: the effective settings
  record (taps resolved, input size filled in), the model, its dtype, the storage dtype, the
  output size, the process (``inversion`` / ``generation``), the source file and original
  size (or the prompt). Each file appears only once complete (temp file, then rename).
- ``<key>.png`` per prompt: the generated image.
- ``manifest.json``: the settings and one entry per input (status ``ok``, ``skipped``,
  ``failed`` with the reason), rewritten atomically after every batch.

An interrupted run leaves only complete files; ``resume=True`` skips the inputs whose file
exists (after checking that everything that shapes its content matches: the settings record,
the model dtype, storage, output size and process), ``overwrite=True`` replaces them, and with
neither an existing file is an error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console

from ._io import atomic_write, atomic_write_text
from ._progress import progress_bar
from .cache import read_feature_file
from .config import Settings
from .datasets.images import ImageLoadError, iter_image_paths, load_image
from .pipeline import FeatureExtractor
from .sinks import DiskWriter

__all__ = ["ExtractJob", "read_prompts"]

# Metadata that determines a file's content: a file made with other values is not resumed.
_CONTENT_FIELDS = ("settings", "model", "dtype", "storage", "output_size", "mode")


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a text file: one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt (one prompt per line)")
    return prompts


def _keys_for(paths: Sequence[Path]) -> list[str]:
    """Output names: the file stem, made unique with the input index when stems repeat."""
    stems = [re.sub(r"[^A-Za-z0-9._-]", "_", p.stem) or "image" for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else f"{s}_{i:05d}" for i, s in enumerate(stems)]


def _consecutive_runs(items: Sequence[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """Split ``items`` (tuples whose first field is an input index) into runs of consecutive
    indices: ``[(0, ..), (1, ..), (3, ..)] -> [[(0, ..), (1, ..)], [(3, ..)]]``."""
    runs: list[list[tuple[Any, ...]]] = []
    for item in items:
        if runs and runs[-1][-1][0] + 1 == item[0]:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


@dataclass
class ExtractJob:
    """One extraction run (the engine behind ``hyperfeatures extract``)."""

    out: Path
    settings: Settings = field(default_factory=Settings)
    model_path: str | None = None
    output_size: int | None = None
    batch_size: int = 4
    storage: str = "fp32"
    device: str = "cpu"
    dtype: str = "fp32"
    strict: bool = False
    resume: bool = False
    overwrite: bool = False
    console: Console | None = None
    extractor: FeatureExtractor | None = None
    _manifest: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if self.storage not in ("fp32", "fp16"):
            raise ValueError(f"storage must be fp32 or fp16, got {self.storage!r}")

    # ------------------------------------------------------------------ setup
    def _extractor(self) -> FeatureExtractor:
        if self.extractor is None:
            self.extractor = FeatureExtractor.from_settings(
                self.settings, device=self.device, dtype=self.dtype, model_path=self.model_path
            )
        return self.extractor

    def _writer(self, ex: FeatureExtractor, mode: str) -> DiskWriter:
        settings = {
            "settings": ex.settings.to_dict(),
            "model": ex.source.name,
            "kind": ex.source.kind,
            "dtype": str(ex.source.dtype).removeprefix("torch."),
            "storage": self.storage,
            "output_size": self.output_size,
            "mode": mode,
        }
        dtype = torch.float16 if self.storage == "fp16" else torch.float32
        self._manifest = {"settings": settings, "items": []}
        return DiskWriter(self.out, dtype=dtype, metadata=settings, output_size=self.output_size)

    def _existing(self, writer: DiskWriter, key: str, settings: dict[str, Any]) -> bool:
        """Whether the item's file exists and may be kept (raises on a conflict)."""
        path = writer.path_for(key)
        if not path.exists():
            return False
        if self.overwrite:
            return False
        if not self.resume:
            raise FileExistsError(
                f"{path} already exists; pass --resume to continue an interrupted run or "
                "--overwrite to replace the files"
            )
        _maps, meta = read_feature_file(path, steps=[], taps=[])
        diffs = [k for k in _CONTENT_FIELDS if meta.get(k) != settings.get(k)]
        if "settings" in diffs and isinstance(meta.get("settings"), dict):
            old, new = meta["settings"], settings["settings"]
            diffs = [k for k in diffs if k != "settings"]
            diffs += [f"{k}: {old.get(k)!r} != {new[k]!r}" for k in new if old.get(k) != new[k]]
        if diffs:
            raise ValueError(
                f"--resume: {path} was written with other settings ({'; '.join(diffs)}); use "
                "another --out folder or --overwrite"
            )
        return True

    def _save_manifest(self) -> Path:
        path = self.out / "manifest.json"
        atomic_write_text(path, json.dumps(self._manifest, indent=2))
        return path

    def _summary(self) -> dict[str, Any]:
        items = self._manifest["items"]
        return {
            "out": str(self.out),
            "manifest": str(self.out / "manifest.json"),
            "written": sum(i["status"] == "ok" for i in items),
            "skipped": sum(i["status"] == "skipped" for i in items),
            "failed": sum(i["status"] == "failed" for i in items),
            "errors": [f"{i['input']}: {i['error']}" for i in items if i["status"] == "failed"],
        }

    # ------------------------------------------------------------------ images
    def run_images(self, inputs: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
        """Invert every image and write its features. Returns a summary dict."""
        paths = iter_image_paths(list(inputs))
        if self.strict:  # check every image before writing anything
            for p in paths:
                load_image(p)
        ex = self._extractor()
        self.out.mkdir(parents=True, exist_ok=True)
        writer = self._writer(ex, "inversion")
        settings = writer.metadata
        keys = _keys_for(paths)
        items = self._manifest["items"]
        todo: list[tuple[int, Path, str]] = []
        for i, (p, k) in enumerate(zip(paths, keys, strict=True)):
            if self._existing(writer, k, settings):
                items.append({"input": str(p), "key": k, "status": "skipped"})
            else:
                todo.append((i, p, k))
        with progress_bar(console=self.console) as bar:
            task = bar.add_task("extracting", total=len(todo))
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                ok: list[tuple[int, Path, str, Image.Image]] = []
                for i, p, k in chunk:
                    try:
                        img = load_image(p)
                    except ImageLoadError as err:
                        if self.strict:
                            raise
                        items.append(
                            {"input": str(p), "key": k, "status": "failed", "error": str(err)}
                        )
                        continue
                    ok.append((i, p, k, img))
                # Posterior-sample seeds are seed + input index and run_images numbers its
                # batch from first_index: batch only runs of consecutive indices (a skipped or
                # unreadable input in between would shift the seeds of those after it).
                for run in _consecutive_runs(ok):
                    writer.begin_batch(
                        [k for _i, _p, k, _img in run],
                        [
                            {"source": str(p), "original_size": list(img.size)}
                            for _i, p, _k, img in run
                        ],
                    )
                    ex.run([img for *_, img in run], writer, first_index=run[0][0])
                    for path, (_i, p, k, img) in zip(writer.end_batch(), run, strict=True):
                        items.append(
                            {
                                "input": str(p),
                                "key": k,
                                "file": path.name,
                                "status": "ok",
                                "original_size": list(img.size),
                            }
                        )
                self._save_manifest()
                bar.advance(task, len(chunk))
        self._save_manifest()
        return self._summary()

    # ------------------------------------------------------------------ prompts
    def run_prompts(self, prompts_file: str | os.PathLike[str]) -> dict[str, Any]:
        """Generate an image per prompt, write its features and the image."""
        prompts = read_prompts(prompts_file)
        ex = self._extractor()
        self.out.mkdir(parents=True, exist_ok=True)
        writer = self._writer(ex, "generation")
        settings = writer.metadata
        keys = [f"prompt_{i:05d}" for i in range(len(prompts))]
        items = self._manifest["items"]
        todo = []
        for i, (prompt, k) in enumerate(zip(prompts, keys, strict=True)):
            if self._existing(writer, k, settings) and (self.out / f"{k}.png").exists():
                items.append({"input": prompt, "key": k, "status": "skipped"})
            else:
                todo.append((i, prompt, k))
        with progress_bar(console=self.console) as bar:
            task = bar.add_task("generating", total=len(todo))
            # noise seeds are seed + prompt index: batch only consecutive indices (see images)
            chunks = [
                run[start : start + self.batch_size]
                for run in _consecutive_runs(todo)
                for start in range(0, len(run), self.batch_size)
            ]
            for chunk in chunks:
                writer.begin_batch(
                    [k for _i, _p, k in chunk], [{"prompt": p} for _i, p, _k in chunk]
                )
                images = ex.run_prompts([p for _i, p, _k in chunk], writer, first_index=chunk[0][0])
                for (_i, _prompt, k), img in zip(chunk, images, strict=True):
                    arr = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
                    atomic_write(
                        self.out / f"{k}.png",
                        lambda f, a=arr: Image.fromarray(a).save(f, format="PNG"),
                    )
                for path, (_i, prompt, k) in zip(writer.end_batch(), chunk, strict=True):
                    items.append(
                        {
                            "input": prompt,
                            "key": k,
                            "file": path.name,
                            "image": f"{k}.png",
                            "status": "ok",
                        }
                    )
                self._save_manifest()
                bar.advance(task, len(chunk))
        self._save_manifest()
        return self._summary()
