"""``hyperfeatures extract``: batch feature extraction to disk.

Writes into ``out``:

- ``<key>.safetensors`` per image or prompt (the format of :mod:`hyperfeatures.cache`):
  tensors ``step_{k}/{tap}`` of shape ``(C, h, w)`` and metadata: the effective settings
  record (taps resolved, input size filled in), the model, its dtype, the storage dtype, the
  output size, the process (``inversion`` / ``generation``), the source file and original
  size (after the EXIF orientation is applied, as image viewers show the photo) or the
  prompt. Each file appears only once complete (temp file, then rename).
- ``<key>.png`` per prompt: the generated image.
- ``manifest.json``: ``{"format": "hyperfeatures extract", "settings": {...}, "items": [...]}``
  with one entry per input (status ``ok``, ``skipped`` (already there, ``resume=True``),
  ``failed`` with the reason). It is the union of every run into ``out``: a run adds its
  entries and replaces those of the same key, keeping the others. An entry written with
  other settings than the top-level ``settings`` carries its own ``settings``. Each update
  is a read-modify-write under an exclusive lock on ``.manifest.lock`` (concurrent runs into
  one folder lose no entry), written atomically after every batch. A ``manifest.json`` that
  is not valid JSON or not one of ours is never replaced: the run stops before any work.

An interrupted run leaves only complete files; ``resume=True`` skips the inputs whose file
exists (after checking that everything that shapes its content matches: the settings record,
the model dtype, storage, output size and process), ``overwrite=True`` replaces them, and with
neither an existing file is an error. A ``KeyboardInterrupt`` (Ctrl-C, or a signal turned into
:class:`SignalInterrupt` by :func:`interrupt_on_signals`) saves the manifest with every file
completed so far and raises :class:`ExtractInterrupted`, which tells what was kept.

A process killed outright (``SIGKILL``, a power cut) may leave hidden temporary files
``.{name}.{32 hex digits}.tmp``. Every run holds a shared lock on ``.extract.lock`` in
``out`` while it works: a run that finds no other run holding it removes every such file of
ours (targets ``*.safetensors``, ``*.png``, ``manifest.json``) before it writes anything; a run
that shares the folder with a live one removes only those untouched for
:data:`STALE_TEMP_AGE_S` seconds (a file being written is modified continuously). The lock
files are removed by the last run that leaves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape

from ._io import (
    JSONFileError,
    atomic_write,
    atomic_write_text,
    exclusive_lock,
    read_json,
    remove_stale_temps,
    shared_lock,
)
from ._progress import progress_bar
from .cache import read_feature_file
from .config import Settings, SettingsError
from .datasets.images import ImageLoadError, iter_image_paths, load_image
from .pipeline import FeatureExtractor
from .sinks import DiskWriter

__all__ = [
    "MANIFEST_FORMAT",
    "ExtractInterrupted",
    "ExtractJob",
    "ManifestError",
    "SignalInterrupt",
    "interrupt_on_signals",
    "merge_manifest",
    "read_manifest",
    "read_prompts",
]

# Metadata that determines a file's content: a file made with other values is not resumed.
_CONTENT_FIELDS = ("settings", "model", "dtype", "storage", "output_size", "mode")

MANIFEST = "manifest.json"
MANIFEST_LOCK = ".manifest.lock"
RUN_LOCK = ".extract.lock"
MANIFEST_FORMAT = "hyperfeatures extract"
"""The ``format`` field of our manifests (older ones have none and are recognised by shape)."""
STALE_TEMP_AGE_S = 300.0
"""Temporary files untouched this long are removed even while another run shares ``out``."""
_STATUSES = ("ok", "skipped", "failed")
_FEATURES = ".safetensors"


class ManifestError(ValueError):
    """``manifest.json`` in the output folder is unreadable or belongs to something else."""


class SignalInterrupt(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` raised for a signal (``SIGINT``, ``SIGTERM``): ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class ExtractInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or a signal after saving its manifest.

    Attributes:
        summary: what :meth:`ExtractJob.run_images` would have returned for the part done
            (``written``, ``skipped``, ``failed``, ``total``, ``out``, ``manifest``...).
        signum: the signal (``signal.SIGINT`` for a plain ``KeyboardInterrupt``).
    """

    def __init__(self, summary: dict[str, Any], signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.summary = summary
        self.signum = int(signum)


@contextmanager
def interrupt_on_signals(
    signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[None]:
    """Turn ``signums`` into :class:`SignalInterrupt` in the block (main thread only).

    The first signal raises; later ones are ignored until the block ends, so the interrupted
    job saves its manifest undisturbed. The previous handlers are restored on exit. Outside
    the main thread (where Python cannot set handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}

    def handler(signum: int, _frame: FrameType | None) -> None:
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise SignalInterrupt(signum)

    for s in signums:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


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


# --------------------------------------------------------------------------- manifest
def _not_ours(path: Path, why: str) -> ManifestError:
    return ManifestError(
        f"{path} is not a manifest of `hyperfeatures extract` ({why}); it belongs to something "
        "else and is left untouched: choose another --out folder (or move that file away)"
    )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest at ``path`` (``None`` if there is none), checked to be one of ours.

    Raises:
        ManifestError: invalid JSON, or a JSON file of another shape (another tool's).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = read_json(path, what="manifest")
    except (JSONFileError, IsADirectoryError) as err:
        raise ManifestError(
            f"{err}; it cannot be updated: choose another --out folder, or delete it if it is "
            "a damaged manifest of an earlier run"
        ) from None
    if not isinstance(data, dict):
        raise _not_ours(path, f"a JSON {type(data).__name__}, not an object")
    fmt = data.get("format", MANIFEST_FORMAT)
    if fmt != MANIFEST_FORMAT:
        raise _not_ours(path, f"its format is {fmt!r}")
    if not isinstance(data.get("settings"), dict):
        raise _not_ours(path, "no 'settings' object")
    items = data.get("items")
    if not isinstance(items, list):
        raise _not_ours(path, "no 'items' list")
    for n, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("key"), str)
            or item.get("status") not in _STATUSES
        ):
            raise _not_ours(path, f"item {n} is not an entry with a 'key' and a 'status'")
    return data


def merge_manifest(
    existing: dict[str, Any] | None,
    settings: dict[str, Any],
    entries: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The union of an existing manifest and a run's ``entries``.

    Entries replace the existing item of the same key in place; new keys are appended in
    order. Existing items made with other settings than ``settings`` keep theirs in an item
    field ``settings`` (the top-level one describes every item without its own).
    """
    old_settings = existing["settings"] if existing else settings
    items: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    for old in existing["items"] if existing else []:
        item = dict(old)
        if "settings" not in item and old_settings != settings:
            item["settings"] = old_settings
        if item.get("settings") == settings:
            del item["settings"]
        index[item["key"]] = len(items)
        items.append(item)
    for entry in entries:
        if entry["key"] in index:
            items[index[entry["key"]]] = dict(entry)
        else:
            index[entry["key"]] = len(items)
            items.append(dict(entry))
    return {"format": MANIFEST_FORMAT, "settings": settings, "items": items}


# --------------------------------------------------------------------------- helpers
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


def _load(path: Path) -> Image.Image:
    """The image as viewers show it (EXIF orientation applied); every failure, decompression
    bombs included, is one :class:`ImageLoadError` naming the file."""
    try:
        return load_image(path, exif_transpose=True)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(
            f"refusing {path}: {err} Shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS "
            "if you trust it."
        ) from None


def _our_temp_target(name: str) -> bool:
    """Targets whose temporary files a killed run of ours may have left in ``out``."""
    return name.endswith((_FEATURES, ".png")) or name == MANIFEST


def _absolute(path: Path) -> str:
    """The input's absolute path (recorded in its feature file; ``--resume`` compares it)."""
    return str(Path(path).expanduser().resolve())


@dataclass
class ExtractJob:
    """One extraction run (the engine behind ``hyperfeatures extract``).

    Everything that can be checked without the model's weights (the output folder and its
    manifest, the inputs, existing files, the device and dtype, and for registry diffusion
    models the taps and the input size) is checked before the model is loaded.
    """

    out: Path
    settings: Settings = field(default_factory=Settings)
    model_path: str | None = None
    output_size: int | None = None
    batch_size: int = 4
    storage: str = "fp32"
    device: str = "cpu"
    dtype: str = "fp32"
    strict: bool = False
    recursive: bool = False
    resume: bool = False
    overwrite: bool = False
    console: Console | None = None
    extractor: FeatureExtractor | None = None
    _record: dict[str, Any] = field(default_factory=dict, init=False)
    _entries: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    _order: dict[str, int] = field(default_factory=dict, init=False)
    _pending: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict, init=False)
    _writer_in_use: DiskWriter | None = field(default=None, init=False)
    _total: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if self.storage not in ("fp32", "fp16"):
            raise ValueError(f"storage must be fp32 or fp16, got {self.storage!r}")

    # ------------------------------------------------------------------ checks
    def _check_out(self) -> None:
        """The output folder is a folder (or absent) and its manifest, if any, is ours."""
        for folder in (self.out, *self.out.parents):
            if folder.exists():
                if not folder.is_dir():
                    where = "" if folder == self.out else f": {folder}"
                    raise NotADirectoryError(
                        f"--out {self.out}{where} is a file, not a folder; give a folder path "
                        "(it is created if missing)"
                    )
                break
        read_manifest(self.out / MANIFEST)

    def _check_names(self, keys: Sequence[str]) -> None:
        """Existing feature files need ``resume`` or ``overwrite`` (checked before loading)."""
        if self.resume or self.overwrite:
            return
        for key in keys:
            path = self.out / f"{key}{_FEATURES}"
            if path.exists():
                raise FileExistsError(
                    f"{path} already exists; pass --resume to continue an interrupted run or "
                    "--overwrite to replace the files"
                )

    def _check_settings(self) -> None:
        """What can be checked without weights: device, dtype, taps and input size of
        registry diffusion models (their architecture is bundled)."""
        if self.extractor is not None:
            return
        from .sources.architectures import unet_architecture
        from .sources.base import resolve_device, resolve_dtype
        from .sources.registry import source_spec
        from .taps import resolve_taps

        resolve_device(self.device)
        resolve_dtype(self.dtype)
        spec = source_spec(self.settings.model)
        if spec is None or spec.kind != "diffusion" or self.model_path is not None:
            return
        resolve_taps(unet_architecture(spec.name), self.settings.taps, model=spec.name)
        size = self.settings.image_size
        if size is not None and size % 8:
            raise SettingsError(
                f"image_size {size} is not a multiple of the VAE factor 8 of {spec.name!r}; "
                f"use {size // 8 * 8 or 8} or {(size // 8 + 1) * 8}"
            )

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
        self._record = settings
        writer = DiskWriter(self.out, dtype=dtype, metadata=settings, output_size=self.output_size)
        self._writer_in_use = writer
        return writer

    def _existing(
        self,
        writer: DiskWriter,
        key: str,
        settings: dict[str, Any],
        identity: tuple[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """The metadata of the item's file if it exists and may be kept, else ``None``
        (raises on a conflict). ``identity`` is ``(metadata field, value)`` naming the input
        the file must come from (the image's absolute path, the prompt's text)."""
        path = writer.path_for(key)
        if not path.exists():
            return None
        if self.overwrite:
            return None
        if not self.resume:
            raise FileExistsError(
                f"{path} already exists; pass --resume to continue an interrupted run or "
                "--overwrite to replace the files"
            )
        try:
            _maps, meta = read_feature_file(path, steps=[], taps=[])
        except Exception as err:  # corrupt or foreign: safetensors raises its own types
            raise ValueError(
                f"--resume: {path} cannot be read ({type(err).__name__}: {err}); delete it or "
                "pass --overwrite"
            ) from None
        if identity is not None:
            field_name, value = identity
            old_value = meta.get(field_name)
            if old_value is not None and old_value != value:
                raise ValueError(
                    f"--resume: {path} holds the features of {old_value!r}, not of {value!r} "
                    "(two inputs with the same name?); use another --out folder or --overwrite"
                )
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
        return meta

    @contextmanager
    def _working(self) -> Iterator[None]:
        """Create ``out``, hold the shared run lock and remove stale temporary files."""
        self.out.mkdir(parents=True, exist_ok=True)
        removed: list[Path] = []

        def clean_all() -> None:  # no other run is writing here: every leftover is stale
            removed.extend(remove_stale_temps(self.out, targets=_our_temp_target))

        with shared_lock(self.out / RUN_LOCK, when_alone=clean_all) as alone:
            if not alone:
                removed.extend(
                    remove_stale_temps(self.out, min_age=STALE_TEMP_AGE_S, targets=_our_temp_target)
                )
            if removed and self.console is not None:
                self.console.print(
                    f"removed {len(removed)} temporary file(s) left by an interrupted run in "
                    f"{escape(str(self.out))}",
                    highlight=False,
                )
            yield

    # ------------------------------------------------------------------ bookkeeping
    def _start(self, total: int) -> None:
        self._record, self._entries, self._order, self._pending = {}, {}, {}, {}
        self._writer_in_use = None
        self._total = total

    def _add(self, index: int, entry: dict[str, Any]) -> None:
        self._entries[entry["key"]] = entry
        self._order[entry["key"]] = index

    def _collect_written(self, writer: DiskWriter) -> None:
        """Record the files of the current batch that are complete on disk."""
        for path in writer.batch_written:
            key = path.name.removesuffix(_FEATURES)
            if key in self._pending:
                self._add(*self._pending.pop(key))

    def _save_manifest(self) -> Path:
        """Merge this run's entries into ``manifest.json`` under the manifest lock."""
        path = self.out / MANIFEST
        entries = sorted(self._entries.values(), key=lambda e: self._order[e["key"]])
        with exclusive_lock(self.out / MANIFEST_LOCK):
            merged = merge_manifest(read_manifest(path), self._record, entries)
            atomic_write_text(path, json.dumps(merged, indent=2))
        return path

    def _summary(self) -> dict[str, Any]:
        items = list(self._entries.values())
        failed = [i for i in items if i["status"] == "failed"]
        return {
            "out": str(self.out),
            "manifest": str(self.out / MANIFEST),
            "total": self._total,
            "written": sum(i["status"] == "ok" for i in items),
            "skipped": sum(i["status"] == "skipped" for i in items),
            "failed": len(failed),
            "failed_inputs": [i["input"] for i in failed],
            "errors": [f"{i['input']}: {i['error']}" for i in failed],
        }

    def _interrupted(self, err: KeyboardInterrupt) -> ExtractInterrupted:
        """Save what was completed and describe it (called on ``KeyboardInterrupt``)."""
        if self._writer_in_use is not None:
            self._collect_written(self._writer_in_use)
        summary = self._summary()
        if self._entries and self._record:
            try:
                self._save_manifest()
            except (OSError, ValueError) as save_err:
                summary["manifest_error"] = str(save_err)
        else:
            summary["manifest"] = None
        return ExtractInterrupted(summary, getattr(err, "signum", signal.SIGINT))

    # ------------------------------------------------------------------ images
    def run_images(self, inputs: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
        """Invert every image and write its features. Returns a summary dict.

        Raises:
            ExtractInterrupted: on ``KeyboardInterrupt``, after saving the manifest.
        """
        self._start(0)
        try:
            return self._run_images(inputs)
        except ExtractInterrupted:
            raise
        except KeyboardInterrupt as err:
            raise self._interrupted(err) from None

    def _run_images(self, inputs: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
        self._check_out()
        paths = iter_image_paths(list(inputs), recursive=self.recursive)
        self._total = len(paths)
        keys = _keys_for(paths)
        self._check_names(keys)
        self._check_settings()
        if self.strict:  # check every image before writing anything
            for p in paths:
                _load(p)
        ex = self._extractor()
        with self._working():
            writer = self._writer(ex, "inversion")
            settings = writer.metadata
            todo: list[tuple[int, Path, str]] = []
            for i, (p, k) in enumerate(zip(paths, keys, strict=True)):
                meta = self._existing(writer, k, settings, ("source_path", _absolute(p)))
                if meta is None:
                    todo.append((i, p, k))
                    continue
                entry = {"input": str(p), "key": k, "file": f"{k}{_FEATURES}", "status": "skipped"}
                if "original_size" in meta:
                    entry["original_size"] = meta["original_size"]
                self._add(i, entry)
            with progress_bar(console=self.console) as bar:
                task = bar.add_task("extracting", total=len(todo))
                for start in range(0, len(todo), self.batch_size):
                    chunk = todo[start : start + self.batch_size]
                    self._run_image_chunk(ex, writer, chunk)
                    self._save_manifest()
                    bar.advance(task, len(chunk))
            self._save_manifest()
        return self._summary()

    def _run_image_chunk(
        self, ex: FeatureExtractor, writer: DiskWriter, chunk: Sequence[tuple[int, Path, str]]
    ) -> None:
        """Load a chunk's images (an unreadable one fails alone) and write their features."""
        ok: list[tuple[int, Path, str, Image.Image]] = []
        for i, p, k in chunk:
            try:
                img = _load(p)
            except ImageLoadError as err:
                if self.strict:
                    raise
                self._add(i, {"input": str(p), "key": k, "status": "failed", "error": str(err)})
                continue
            ok.append((i, p, k, img))
        # Posterior-sample seeds are seed + input index and run_images numbers its batch
        # from first_index: batch only runs of consecutive indices (a skipped or unreadable
        # input in between would shift the seeds of those after it).
        for run in _consecutive_runs(ok):
            self._pending = {
                k: (
                    i,
                    {
                        "input": str(p),
                        "key": k,
                        "file": f"{k}{_FEATURES}",
                        "status": "ok",
                        "original_size": list(img.size),
                    },
                )
                for i, p, k, img in run
            }
            writer.begin_batch(
                [k for _i, _p, k, _img in run],
                [
                    {"source": str(p), "source_path": _absolute(p), "original_size": list(img.size)}
                    for _i, p, _k, img in run
                ],
            )
            ex.run([img for *_, img in run], writer, first_index=run[0][0])
            writer.end_batch()
            self._collect_written(writer)

    # ------------------------------------------------------------------ prompts
    def run_prompts(self, prompts_file: str | os.PathLike[str]) -> dict[str, Any]:
        """Generate an image per prompt, write its features and the image.

        Raises:
            ExtractInterrupted: on ``KeyboardInterrupt``, after saving the manifest.
        """
        self._start(0)
        try:
            return self._run_prompts(prompts_file)
        except ExtractInterrupted:
            raise
        except KeyboardInterrupt as err:
            raise self._interrupted(err) from None

    def _run_prompts(self, prompts_file: str | os.PathLike[str]) -> dict[str, Any]:
        self._check_out()
        prompts = read_prompts(prompts_file)
        self._total = len(prompts)
        keys = [f"prompt_{i:05d}" for i in range(len(prompts))]
        self._check_names(keys)
        self._check_settings()
        ex = self._extractor()
        with self._working():
            writer = self._writer(ex, "generation")
            settings = writer.metadata
            todo = []
            for i, (prompt, k) in enumerate(zip(prompts, keys, strict=True)):
                meta = self._existing(writer, k, settings, ("prompt", prompt))
                if meta is not None and (self.out / f"{k}.png").exists():
                    entry = {
                        "input": prompt,
                        "key": k,
                        "file": f"{k}{_FEATURES}",
                        "image": f"{k}.png",
                        "status": "skipped",
                    }
                    self._add(i, entry)
                else:
                    todo.append((i, prompt, k))
            with progress_bar(console=self.console) as bar:
                task = bar.add_task("generating", total=len(todo))
                # noise seeds are seed + prompt index: batch only consecutive indices
                chunks = [
                    run[start : start + self.batch_size]
                    for run in _consecutive_runs(todo)
                    for start in range(0, len(run), self.batch_size)
                ]
                for chunk in chunks:
                    self._run_prompt_chunk(ex, writer, chunk)
                    self._save_manifest()
                    bar.advance(task, len(chunk))
            self._save_manifest()
        return self._summary()

    def _run_prompt_chunk(
        self, ex: FeatureExtractor, writer: DiskWriter, chunk: Sequence[tuple[int, str, str]]
    ) -> None:
        """Generate a chunk's images, write them, then their features."""
        self._pending = {}
        writer.begin_batch([k for _i, _p, k in chunk], [{"prompt": p} for _i, p, _k in chunk])
        images = ex.run_prompts([p for _i, p, _k in chunk], writer, first_index=chunk[0][0])
        for (_i, _prompt, k), img in zip(chunk, images, strict=True):
            arr = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            atomic_write(
                self.out / f"{k}.png",
                lambda f, a=arr: Image.fromarray(a).save(f, format="PNG"),
            )
        self._pending = {
            k: (
                i,
                {
                    "input": prompt,
                    "key": k,
                    "file": f"{k}{_FEATURES}",
                    "image": f"{k}.png",
                    "status": "ok",
                },
            )
            for i, prompt, k in chunk
        }
        writer.end_batch()
        self._collect_written(writer)
