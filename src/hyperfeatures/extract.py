"""``hyperfeatures extract``: batch feature extraction to disk (the :class:`ExtractJob`).

Writes into ``out``:

- ``<key>.safetensors`` per image or prompt (the format of :mod:`hyperfeatures.cache`):
  tensors ``step_{k}/{tap}`` of shape ``(C, h, w)`` and metadata: the effective settings
  record (taps resolved, input size filled in), the model, its dtype, the storage dtype, the
  output size, the process (``inversion`` / ``generation``), the source file and original
  size (after the EXIF orientation is applied, as image viewers show the photo) or the
  prompt. Each file appears only once complete (temp file, then rename).
- ``<key>.png`` per prompt: the generated image.
- ``manifest.json``: one entry per input of every run into ``out``, updated after every
  batch (:mod:`hyperfeatures.extract_manifest`). A ``manifest.json`` that is not one of ours
  is never replaced: the run stops before any work.

An interrupted run leaves only complete files; ``resume=True`` skips the inputs whose file
exists (after checking that everything that shapes its content matches), ``overwrite=True``
replaces them, and with neither an existing file is an error
(:mod:`hyperfeatures.extract_folder`, which also removes the temporary files of killed runs).
A ``KeyboardInterrupt`` (Ctrl-C, or a signal turned into :class:`SignalInterrupt` by
:func:`interrupt_on_signals`) saves the manifest with every file completed so far and raises
:class:`ExtractInterrupted`, which tells what was kept (:mod:`hyperfeatures.extract_interrupt`).

Modules: this one holds the job; :mod:`~hyperfeatures.extract_inputs` (prompt files, output
names, image loading), :mod:`~hyperfeatures.extract_manifest`,
:mod:`~hyperfeatures.extract_folder` and :mod:`~hyperfeatures.extract_interrupt` hold the
parts below it and import nothing of it. Their public names are importable from here too.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console

from ._io import atomic_write
from ._progress import progress_bar
from .config import Settings, SettingsError
from .datasets.images import ImageLoadError, iter_image_paths
from .extract_folder import (
    FEATURES_SUFFIX,
    check_new_names,
    check_out_folder,
    existing_metadata,
    working_folder,
)
from .extract_folder import RUN_LOCK as RUN_LOCK
from .extract_folder import STALE_TEMP_AGE_S as STALE_TEMP_AGE_S
from .extract_inputs import absolute_path, consecutive_runs, keys_for, load_input, read_prompts
from .extract_interrupt import ExtractInterrupted, SignalInterrupt, interrupt_on_signals
from .extract_manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    ManifestError,
    merge_manifest,
    read_manifest,
    save_manifest,
)
from .extract_manifest import MANIFEST_LOCK as MANIFEST_LOCK
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
    speed: str | None = None
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
    _seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if self.storage not in ("fp32", "fp16"):
            raise ValueError(f"storage must be fp32 or fp16, got {self.storage!r}")
        if self.speed is not None:
            from .sources.speed import resolve_speed

            resolve_speed(self.speed)  # an unknown mode fails before anything is loaded

    # ------------------------------------------------------------------ checks
    def _check_out(self) -> None:
        """The output folder is a folder (or absent) and its manifest, if any, is ours."""
        check_out_folder(self.out)

    def _check_names(self, keys: Sequence[str]) -> None:
        """Existing feature files need ``resume`` or ``overwrite`` (checked before loading)."""
        if self.resume or self.overwrite:
            return
        check_new_names(self.out, keys)

    def _check_settings(self) -> None:
        """What can be checked without weights: device, dtype, taps and input size of
        registry diffusion models (their architecture is bundled)."""
        if self.extractor is not None:
            return
        from .sources.architectures import unet_architecture
        from .sources.base import resolve_device, resolve_dtype
        from .sources.prompts import real_image_prompt
        from .sources.registry import source_spec
        from .taps import resolve_taps

        resolve_device(self.device)
        resolve_dtype(self.dtype)
        real_image_prompt(self.settings)  # a {category} template has no category here
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
                self.settings,
                device=self.device,
                dtype=self.dtype,
                model_path=self.model_path,
                speed=self.speed,
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
        writer = DiskWriter(
            self.out,
            dtype=dtype,
            metadata=settings,
            output_size=self.output_size,
            background=mode != "generation",
        )
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
        return existing_metadata(
            writer.path_for(key),
            settings,
            identity,
            resume=self.resume,
            overwrite=self.overwrite,
        )

    # ------------------------------------------------------------------ bookkeeping
    def _start(self, total: int) -> None:
        self._record, self._entries, self._order, self._pending = {}, {}, {}, {}
        self._writer_in_use = None
        self._total = total

    def _add(self, index: int, entry: dict[str, Any]) -> None:
        self._entries[entry["key"]] = entry
        self._order[entry["key"]] = index

    def _collect_written(self, writer: DiskWriter) -> None:
        """Record the files of the last batch that are complete on disk (waiting for a batch
        that is being written in the background)."""
        try:
            writer.wait()
        finally:
            written = list(writer.batch_written)
        for path in written:
            key = path.name.removesuffix(FEATURES_SUFFIX)
            if key in self._pending:
                self._add(*self._pending.pop(key))

    def _save_manifest(self) -> Path:
        """Merge this run's entries into ``manifest.json`` under the manifest lock."""
        entries = sorted(self._entries.values(), key=lambda e: self._order[e["key"]])
        return save_manifest(self.out, self._record, entries)

    def _summary(self) -> dict[str, Any]:
        items = list(self._entries.values())
        failed = [i for i in items if i["status"] == "failed"]
        written = sum(i["status"] == "ok" for i in items)
        return {
            "out": str(self.out),
            "manifest": str(self.out / MANIFEST),
            "total": self._total,
            "written": written,
            "skipped": sum(i["status"] == "skipped" for i in items),
            "failed": len(failed),
            "failed_inputs": [i["input"] for i in failed],
            "errors": [f"{i['input']}: {i['error']}" for i in failed],
            "seconds": round(self._seconds, 3),
            "items_per_second": written / self._seconds if written and self._seconds > 0 else None,
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
        keys = keys_for(paths)
        self._check_names(keys)
        self._check_settings()
        if self.strict:  # check every image before writing anything
            for p in paths:
                load_input(p)
        ex = self._extractor()
        with working_folder(self.out, self.console):
            writer = self._writer(ex, ex.settings.process)
            settings = writer.metadata
            todo: list[tuple[int, Path, str]] = []
            for i, (p, k) in enumerate(zip(paths, keys, strict=True)):
                meta = self._existing(writer, k, settings, ("source_path", absolute_path(p)))
                if meta is None:
                    todo.append((i, p, k))
                    continue
                entry = {
                    "input": str(p),
                    "key": k,
                    "file": f"{k}{FEATURES_SUFFIX}",
                    "status": "skipped",
                }
                if "original_size" in meta:
                    entry["original_size"] = meta["original_size"]
                self._add(i, entry)
            started = time.perf_counter()
            chunks = [todo[s : s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
            # The next chunk's images are decoded in a background thread while the model runs
            # on this one, and each batch is written by the writer's thread while the model
            # runs on the next: the model waits for neither.
            with (
                progress_bar(console=self.console) as bar,
                ThreadPoolExecutor(1, thread_name_prefix="hyperfeatures-loader") as loader,
            ):
                task = bar.add_task("extracting", total=len(todo))
                ahead = loader.submit(self._load_chunk, chunks[0]) if chunks else None
                try:
                    for n, chunk in enumerate(chunks):
                        assert ahead is not None
                        loaded = ahead.result()
                        if n + 1 < len(chunks):
                            ahead = loader.submit(self._load_chunk, chunks[n + 1])
                        self._run_image_chunk(ex, writer, loaded)
                        self._save_manifest()
                        bar.advance(task, len(chunk))
                    self._collect_written(writer)
                finally:
                    writer.close()
            self._seconds += time.perf_counter() - started
            self._save_manifest()
        return self._summary()

    def _load_chunk(
        self, chunk: Sequence[tuple[int, Path, str]]
    ) -> list[tuple[int, Path, str, Image.Image | ImageLoadError]]:
        """Decode a chunk's images (runs in the loader thread); an unreadable image gives its
        error in place of the image."""
        out: list[tuple[int, Path, str, Image.Image | ImageLoadError]] = []
        for i, p, k in chunk:
            try:
                out.append((i, p, k, load_input(p)))
            except ImageLoadError as err:
                out.append((i, p, k, err))
        return out

    def _run_image_chunk(
        self,
        ex: FeatureExtractor,
        writer: DiskWriter,
        chunk: Sequence[tuple[int, Path, str, Image.Image | ImageLoadError]],
    ) -> None:
        """Run a chunk's decoded images (an unreadable one fails alone) and hand their
        features to the writer; the files of the previous batch are recorded meanwhile."""
        ok: list[tuple[int, Path, str, Image.Image]] = []
        for i, p, k, img in chunk:
            if isinstance(img, ImageLoadError):
                if self.strict:
                    raise img
                self._add(i, {"input": str(p), "key": k, "status": "failed", "error": str(img)})
                continue
            ok.append((i, p, k, img))
        # Posterior-sample seeds are seed + input index and run_images numbers its batch
        # from first_index: batch only runs of consecutive indices (a skipped or unreadable
        # input in between would shift the seeds of those after it).
        for run in consecutive_runs(ok):
            pending = {
                k: (
                    i,
                    {
                        "input": str(p),
                        "key": k,
                        "file": f"{k}{FEATURES_SUFFIX}",
                        "status": "ok",
                        "original_size": list(img.size),
                    },
                )
                for i, p, k, img in run
            }
            writer.begin_batch(
                [k for _i, _p, k, _img in run],
                [
                    {
                        "source": str(p),
                        "source_path": absolute_path(p),
                        "original_size": list(img.size),
                    }
                    for _i, p, _k, img in run
                ],
            )
            ex.run([img for *_, img in run], writer, first_index=run[0][0])
            self._collect_written(writer)  # the previous batch's files
            self._pending.update(pending)
            writer.end_batch()  # this batch: written while the model runs the next one

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
        with working_folder(self.out, self.console):
            writer = self._writer(ex, "generation")
            settings = writer.metadata
            todo = []
            for i, (prompt, k) in enumerate(zip(prompts, keys, strict=True)):
                meta = self._existing(writer, k, settings, ("prompt", prompt))
                if meta is not None and (self.out / f"{k}.png").exists():
                    entry = {
                        "input": prompt,
                        "key": k,
                        "file": f"{k}{FEATURES_SUFFIX}",
                        "image": f"{k}.png",
                        "status": "skipped",
                    }
                    self._add(i, entry)
                else:
                    todo.append((i, prompt, k))
            started = time.perf_counter()
            with progress_bar(console=self.console) as bar:
                task = bar.add_task("generating", total=len(todo))
                # noise seeds are seed + prompt index: batch only consecutive indices
                chunks = [
                    run[start : start + self.batch_size]
                    for run in consecutive_runs(todo)
                    for start in range(0, len(run), self.batch_size)
                ]
                for chunk in chunks:
                    self._run_prompt_chunk(ex, writer, chunk)
                    self._save_manifest()
                    bar.advance(task, len(chunk))
            self._seconds += time.perf_counter() - started
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
                    "file": f"{k}{FEATURES_SUFFIX}",
                    "image": f"{k}.png",
                    "status": "ok",
                },
            )
            for i, prompt, k in chunk
        }
        writer.end_batch()
        self._collect_written(writer)
