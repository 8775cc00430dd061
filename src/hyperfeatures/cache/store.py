"""The training feature cache: a frozen source runs once per image, training reads the maps.

:class:`FeatureCache` stores the maps as feature files (:mod:`hyperfeatures.cache.files`).
Layout of ``root/<key>/`` (``key``: 16 hex digits of the SHA-256 of the canonical JSON of the
record, i.e. of everything that determines the maps)::

    manifest.json            {"format", "key", "record": {"settings", "kind", "dtype",
                              "storage"}, "source", "taps": [{"name", "channels", "size"}],
                              "bytes_per_image", "images": {path: {"file", "original_size"}},
                              "failed": {path: {"error"}}}  (merged view of every part)
    parts/shard-R-of-W.json  the entries written by process R of W ("images", "failed")
    <name>.safetensors       one per image: fp16 maps ``step_{k}/{tap}`` (C, h, w) at native
                             size, metadata ``cache`` = {key, image, original_size, record}

Image paths are stored absolute (``~`` expanded, symlinks resolved); file names are the
sanitised parent and stem of the path plus 12 hex digits of its hash, so every process of a
sharded build names an image alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .._io import atomic_write_text
from .._progress import progress_bar
from ..config import Settings
from .files import feature_key, read_feature_file, write_feature_file

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "STORAGE_DTYPE",
    "CacheMissError",
    "ExtractorLike",
    "FeatureCache",
    "cache_key",
    "cache_record",
]

STORAGE_DTYPE = "float16"
"""Dtype of the maps in a :class:`FeatureCache` (half the bytes of float32)."""

_HEADER_BYTES = 4096  # allowance per file: safetensors header (names, offsets) and metadata
_ANY = object()  # a field a bare Settings leaves open (tap preset, default size, source dtype)


class CacheMissError(KeyError):
    """An image the cache does not hold; the message names it and says how to build it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "image not in the feature cache"


class ExtractorLike(Protocol):
    """What the cache uses of a :class:`~hyperfeatures.pipeline.FeatureExtractor`: the
    effective ``settings``, ``source.describe()`` (``kind``, ``dtype``), ``run(images, sink,
    first_index=)`` and ``tap_info()`` (items with ``name``, ``channels``, ``size = (h, w)``)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def source(self) -> Any: ...
    def run(
        self, images: Any, sink: Callable[[int, str, torch.Tensor], Any], *, first_index: int = 0
    ) -> Any: ...
    def tap_info(self) -> Sequence[Any]: ...


def cache_record(extractor: ExtractorLike) -> dict[str, Any]:
    """What determines the cached maps: the effective settings, the source kind and dtype, and
    the storage dtype (device and batch size change maps only within float rounding)."""
    facts = extractor.source.describe()
    return {
        "settings": extractor.settings.to_dict(),
        "kind": facts.get("kind"),
        "dtype": facts.get("dtype"),
        "storage": STORAGE_DTYPE,
    }


def cache_key(record: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the record's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _flat(record: Mapping[str, Any]) -> dict[str, Any]:
    """The settings fields and ``kind`` / ``dtype`` / ``storage`` in one mapping."""
    return {**record["settings"], **{k: record.get(k, _ANY) for k in ("kind", "dtype", "storage")}}


def _wanted(spec: ExtractorLike | Settings) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(fields to compare, full record or None)`` of what :meth:`FeatureCache.open` is asked
    for. A bare :class:`Settings` leaves open a tap preset name, ``image_size=None`` and the
    source's kind and dtype."""
    if not isinstance(spec, Settings):
        record = cache_record(spec)
        return _flat(record), record
    flat = _flat({"settings": spec.to_dict(), "storage": STORAGE_DTYPE})
    if isinstance(spec.taps, str):
        flat["taps"] = _ANY
    if spec.image_size is None:
        flat["image_size"] = _ANY
    return flat, None


def _differences(want: Mapping[str, Any], have: Mapping[str, Any]) -> list[str]:
    """``"field: requested != cached"`` for every fixed field that differs."""
    return [
        f"{k}: {v!r} != {have.get(k)!r}" for k, v in want.items() if v not in (_ANY, have.get(k))
    ]


def _normalise(image: str | os.PathLike[str]) -> str:
    """The key of an image: its absolute path (``~`` expanded, symlinks resolved)."""
    return str(Path(os.fspath(image)).expanduser().resolve())


def _file_name(image: str) -> str:
    """Unique, filesystem-safe file name of a normalised image path: parent and stem, made
    safe, plus 12 hex digits of the path's hash."""
    path = Path(image)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{path.parent.name}_{path.stem}").strip("._-")
    digest = hashlib.sha256(image.encode("utf-8")).hexdigest()[:12]
    return f"{stem[:80] or 'image'}-{digest}.safetensors"


def _estimate(infos: Sequence[Any], num_steps: int) -> int:
    """Bytes of one image's file: 2 x (sum over taps of C*h*w) x steps + a header allowance."""
    if any(not i.size for i in infos):
        raise ValueError("the source gives no map sizes for its taps; cannot size the cache")
    return 2 * num_steps * sum(i.channels * i.size[0] * i.size[1] for i in infos) + _HEADER_BYTES


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


class FeatureCache:
    """The training feature cache: fp16 maps of every image, computed once by a frozen source.

    Build with :meth:`build` (or ``hyperfeatures cache build CONFIG.yaml``), find with
    :meth:`open`, read with :meth:`maps`; the layout is in the module docstring. Example::

        cache = FeatureCache.build("cache/", extractor, image_paths)
        maps = cache.maps(image_paths[0])      # maps[step][tap]: (C, h, w) float16, CPU

    Attributes:
        directory: ``root/<key>``; key: the folder name (hash of :attr:`record`).
        record: ``{"settings", "kind", "dtype", "storage"}``: what determines the maps.
    """

    def __init__(self, directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.key = self.directory.name
        self._manifest = dict(manifest)
        self.record: dict[str, Any] = dict(manifest["record"])
        self.refresh()

    @property
    def settings(self) -> Settings:
        """The effective settings record of the maps (taps resolved, input size set)."""
        return Settings.from_dict(self.record["settings"], source=f"feature cache {self.key}")

    @property
    def bytes_per_image(self) -> int:
        """Estimated bytes of one image's file (see :meth:`build`)."""
        return int(self._manifest.get("bytes_per_image", 0))

    @property
    def taps(self) -> list[dict[str, Any]]:
        """``[{"name", "channels", "size": [h, w]}]`` in tap order (sizes a network without
        loading the source)."""
        return [dict(t) for t in self._manifest.get("taps", [])]

    @property
    def images(self) -> list[str]:
        """The cached image paths (normalised), sorted."""
        return sorted(self._images)

    @property
    def failed(self) -> dict[str, str]:
        """Unreadable images: ``{path: reason}``."""
        return dict(self._failed)

    def __contains__(self, image: object) -> bool:
        return isinstance(image, str | os.PathLike) and _normalise(image) in self._images

    def __len__(self) -> int:
        return len(self._images)

    # ------------------------------------------------------------------ reading
    def path_for(self, image: str | os.PathLike[str]) -> Path:
        """The feature file of ``image``; :class:`CacheMissError` when absent or gone."""
        entry = self._images.get(_normalise(image))
        path = self.directory / entry["file"] if entry else None
        if path is None or not path.is_file():
            why = "is not in" if path is None else "has lost its file in"
            raise CacheMissError(
                f"image {image} {why} the feature cache {self.directory}; build the cache for "
                "these images (`hyperfeatures cache build CONFIG.yaml`)"
            )
        return path

    def maps(
        self,
        image: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        steps: Iterable[int] | None = None,
        taps: Iterable[str] | None = None,
    ) -> dict[int, dict[str, torch.Tensor]]:
        """The stored maps of ``image``: ``maps[step][tap] -> (C, h, w)`` at native size, on
        ``device``, as stored (float16) unless ``dtype``; only ``steps`` / ``taps`` if given.

        Raises:
            CacheMissError: the image is not cached (a ``KeyError``).
        """
        maps, _meta = read_feature_file(self.path_for(image), steps=steps, taps=taps, device=device)
        if dtype is not None:
            maps = {s: {t: x.to(dtype) for t, x in m.items()} for s, m in maps.items()}
        return maps

    def refresh(self) -> FeatureCache:
        """Re-read the entries: ``manifest.json`` merged with every shard's part file."""
        images: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        parts = sorted((self.directory / "parts").glob("*.json"))
        for data in [self._manifest, _read_json(self.directory / "manifest.json")] + [
            _read_json(p) for p in parts
        ]:
            images.update(data.get("images") or {})
            failed.update({k: v.get("error", "") for k, v in (data.get("failed") or {}).items()})
        self._images = images
        self._failed = {k: v for k, v in failed.items() if k not in images}
        return self

    def write_manifest(self) -> Path:
        """Write ``manifest.json`` (atomic): the record and the merged entries of all parts."""
        self.refresh()
        self._manifest.update(
            images={k: self._images[k] for k in sorted(self._images)},
            failed={k: {"error": self._failed[k]} for k in sorted(self._failed)},
        )
        text = json.dumps(self._manifest, indent=1)
        return atomic_write_text(self.directory / "manifest.json", text)

    # ------------------------------------------------------------------ finding
    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        spec: ExtractorLike | Settings,
        *,
        must_exist: bool = False,
    ) -> FeatureCache:
        """The cache of ``spec`` under ``root`` (``$VARS``, ``~`` expanded; one folder per record).

        Args:
            spec: a :class:`~hyperfeatures.pipeline.FeatureExtractor` (the exact record), or a
                :class:`Settings` (a tap preset name, ``image_size=None`` and the source
                dtype match any cache; exactly one must match).
            must_exist: raise when no cache matches; else return a new, empty cache in a new
                key folder (needs an extractor).

        Raises:
            FileNotFoundError: no cache under ``root`` (``must_exist``).
            ValueError: only caches of other records (``must_exist``; the message names the
                differing fields, ``"field: requested != cached"``), or several match.
        """
        root = Path(os.path.expandvars(os.fspath(root))).expanduser()
        want, record = _wanted(spec)
        found = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            manifest = _read_json(folder / "manifest.json")
            if isinstance(manifest.get("record"), dict):
                found.append((folder, manifest, _differences(want, _flat(manifest["record"]))))
        matches = [(folder, manifest) for folder, manifest, diffs in found if not diffs]
        if len(matches) > 1:
            keys = ", ".join(f.name for f, _ in matches)
            raise ValueError(
                f"several feature caches under {root} match ({keys}); open with the extractor"
            )
        if matches:
            return cls(*matches[0])
        if must_exist or record is None:
            build = f"build it with `hyperfeatures cache build CONFIG.yaml --root {root}`"
            if not found:
                raise FileNotFoundError(f"no feature cache under {root}; {build}")
            lines = " / ".join(f"cache {f.name}: {'; '.join(d)}" for f, _m, d in found)
            raise ValueError(
                f"the feature caches under {root} hold other settings (requested != cached): "
                f"{lines}; {build}"
            )
        infos = list(spec.tap_info())  # type: ignore[union-attr]
        per_image = _estimate(infos, len(record["settings"]["steps"]))  # checks the sizes
        manifest = {
            "format": "hyperfeatures-cache/1",
            "key": cache_key(record),
            "record": record,
            "source": spec.source.describe(),  # type: ignore[union-attr]
            "taps": [{"name": i.name, "channels": i.channels, "size": list(i.size)} for i in infos],
            "bytes_per_image": per_image,
        }
        return cls(root / manifest["key"], manifest)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        root: str | os.PathLike[str],
        extractor: ExtractorLike,
        image_paths: Sequence[str | os.PathLike[str]],
        *,
        batch_size: int = 4,
        max_gb: float | None = None,
        shard: tuple[int, int] = (0, 1),
        progress: bool = True,
        console: Console | None = None,
    ) -> FeatureCache:
        """Compute and store the maps of every image not cached yet (resumable, shardable).

        Prints one line first: images to compute, bytes per image (2 bytes x sum over taps of
        C*h*w x steps, plus a header allowance), total and free disk. Images already in the
        manifest whose file exists are skipped; unreadable ones are reported by path and
        listed as failed (retried by the next build). Files are written atomically.

        Args:
            root: the cache root (the cache goes to ``root/<key>``).
            extractor: the source and effective settings.
            image_paths: the images (duplicates count once).
            batch_size: images per source run (with ``posterior="sample"``: one, seeded with
                ``seed`` + a hash of the path, so a map depends on neither list nor shard).
            max_gb: refuse, before any work, when the files to write need more (1 GB = 1e9 B).
            shard: ``(rank, world)``: process images ``i % world == rank`` of the deduplicated
                list; entries go to ``parts/shard-<rank>-of-<world>.json``, merged on reading.
            progress: show a progress bar.
            console: for the estimate, skipped images and the bar (default: stderr).

        Raises:
            ValueError: bad arguments, or the estimate exceeds ``max_gb`` or the free disk.
        """
        from rich.console import Console as RichConsole

        rank, world = shard
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        console = console or RichConsole(stderr=True)
        cache = cls.open(root, extractor)
        paths = list(dict.fromkeys(_normalise(p) for p in image_paths))
        mine = [(i, p) for i, p in enumerate(paths) if i % world == rank]
        done = {p: cache._images[p] for _i, p in mine if p in cache._images}
        done = {p: e for p, e in done.items() if (cache.directory / e["file"]).is_file()}
        todo = [(i, p) for i, p in mine if p not in done]
        total = cache.bytes_per_image * len(todo)
        anchor = next(p for p in (cache.directory, *cache.directory.parents) if p.exists())
        free = shutil.disk_usage(anchor).free
        console.print(
            f"feature cache {cache.directory}: {len(todo)} images to compute ({len(done)} "
            f"cached, shard {rank}/{world}), {_human(cache.bytes_per_image)} per image, total "
            f"{_human(total)}; free disk {_human(free)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        if max_gb is not None and total > max_gb * 1e9:
            raise ValueError(
                f"the feature cache needs {_human(total)} for {len(todo)} images, more than "
                f"max_gb={max_gb:g} GB allows; raise --max-gb or cache fewer taps or steps"
            )
        if total > free:
            raise ValueError(
                f"the feature cache needs {_human(total)} but {anchor} has {_human(free)} free; "
                "choose another --root or cache fewer taps or steps"
            )
        cache.directory.mkdir(parents=True, exist_ok=True)
        if not (cache.directory / "manifest.json").exists():
            cache.write_manifest()
        part: dict[str, Any] = {"images": done, "failed": {}}
        part_path = cache.directory / "parts" / f"shard-{rank}-of-{world}.json"
        atomic_write_text(part_path, json.dumps(part, indent=1))
        cache._run(extractor, todo, part, part_path, batch_size, progress, console)
        cache.write_manifest()
        return cache

    def _run(
        self,
        extractor: ExtractorLike,
        todo: list[tuple[int, str]],
        part: dict[str, Any],
        part_path: Path,
        batch_size: int,
        progress: bool,
        console: Console,
    ) -> None:
        """Run the source on ``todo`` (``(index, path)``), one file per image; ``part`` (the
        shard's entries) is rewritten after each batch."""
        from ..datasets.images import ImageLoadError, load_image

        settings = self.record["settings"]
        expected = {feature_key(s, t) for s in settings["steps"] for t in settings["taps"]}
        sampled = settings.get("posterior") == "sample"
        size = 1 if sampled else batch_size
        with progress_bar(console=console, enabled=progress) as bar:
            task = bar.add_task("caching features", total=len(todo))
            for start in range(0, len(todo), size):
                chunk, batch = todo[start : start + size], []
                for index, path in chunk:
                    try:
                        batch.append((index, path, load_image(path)))
                    except (ImageLoadError, OSError) as err:
                        part["failed"][path] = {"error": str(err)}
                        console.print(
                            f"skipped unreadable image {path}: {err}", markup=False, soft_wrap=True
                        )
                buffer: dict[str, torch.Tensor] = {}

                def sink(step: int, tap: str, x: torch.Tensor, buf: dict = buffer) -> None:
                    buf[feature_key(step, tap)] = x.detach().to(torch.float16).cpu()

                if batch:
                    seed_index = int(hashlib.sha256(batch[0][1].encode()).hexdigest()[:7], 16)
                    with torch.no_grad():
                        extractor.run(
                            [img for *_, img in batch],
                            sink,
                            first_index=seed_index if sampled else batch[0][0],
                        )
                    if set(buffer) != expected:
                        missing = sorted(expected - set(buffer))[:3]
                        raise RuntimeError(f"the source sent no map for {missing} (step/tap)")
                for j, (_index, path, img) in enumerate(batch):
                    entry = {"file": _file_name(path), "original_size": list(img.size)}
                    # One metadata key: safetensors writes several keys in a random order; one
                    # keeps a file's bytes independent of the process that wrote it.
                    meta = {
                        "cache": {"key": self.key, "image": path, **entry, "record": self.record}
                    }
                    tensors = {k: x[j] for k, x in buffer.items()}
                    write_feature_file(self.directory / entry["file"], tensors, meta)
                    part["images"][path] = entry
                    part["failed"].pop(path, None)
                atomic_write_text(part_path, json.dumps(part, indent=1))
                bar.advance(task, len(chunk))
