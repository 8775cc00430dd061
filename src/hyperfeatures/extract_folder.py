"""The output folder of ``hyperfeatures extract``: checks, existing files, run lock, leftovers.

- :func:`check_out_folder`: ``out`` is a folder (or absent) and its manifest, if any, is ours.
- :func:`check_new_names` / :func:`existing_metadata`: an existing feature file is an error
  unless ``resume`` (it is kept after checking that everything that shapes its content
  matches: the settings record, the model dtype, storage, output size and process, and the
  input it comes from) or ``overwrite`` (it is replaced).
- :func:`working_folder`: the run lock and the removal of temporary files left by killed runs.

A process killed outright (``SIGKILL``, a power cut) may leave hidden temporary files
``.{name}.{32 hex digits}.tmp``. Every run holds a shared lock on ``.extract.lock`` in ``out``
while it works: a run that finds no other run holding it removes every such file of ours
(targets ``*.safetensors``, ``*.png``, ``manifest.json``) before it writes anything; a run that
shares the folder with a live one removes only those untouched for :data:`STALE_TEMP_AGE_S`
seconds (a file being written is modified continuously). The lock files are removed by the last
run that leaves.

This module imports nothing of the job (:mod:`hyperfeatures.extract`): the job imports it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from ._io import remove_stale_temps, shared_lock
from .cache import read_feature_file
from .extract_manifest import MANIFEST, read_manifest

__all__ = [
    "CONTENT_FIELDS",
    "FEATURES_SUFFIX",
    "RUN_LOCK",
    "STALE_TEMP_AGE_S",
    "check_new_names",
    "check_out_folder",
    "existing_metadata",
    "working_folder",
]

FEATURES_SUFFIX = ".safetensors"
"""The suffix of a feature file: ``<key>.safetensors``."""
CONTENT_FIELDS = ("settings", "model", "dtype", "storage", "output_size", "mode")
"""Metadata that determines a file's content: a file made with other values is not resumed."""
RUN_LOCK = ".extract.lock"
STALE_TEMP_AGE_S = 300.0
"""Temporary files untouched this long are removed even while another run shares ``out``."""


def _our_temp_target(name: str) -> bool:
    """Targets whose temporary files a killed run of ours may have left in ``out``."""
    return name.endswith((FEATURES_SUFFIX, ".png")) or name == MANIFEST


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(
        f"{path} already exists; pass --resume to continue an interrupted run or "
        "--overwrite to replace the files"
    )


def check_out_folder(out: Path) -> None:
    """The output folder is a folder (or absent) and its manifest, if any, is ours.

    Raises:
        NotADirectoryError: ``out`` or one of its parents is a file.
        ~hyperfeatures.extract_manifest.ManifestError: a manifest that is not ours.
    """
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "" if folder == out else f": {folder}"
                raise NotADirectoryError(
                    f"--out {out}{where} is a file, not a folder; give a folder path "
                    "(it is created if missing)"
                )
            break
    read_manifest(out / MANIFEST)


def check_new_names(out: Path, keys: Sequence[str]) -> None:
    """No feature file of ``keys`` exists in ``out`` (checked before loading the model).

    Raises:
        FileExistsError: one exists (``resume`` or ``overwrite`` is needed).
    """
    for key in keys:
        path = out / f"{key}{FEATURES_SUFFIX}"
        if path.exists():
            raise _exists_error(path)


def existing_metadata(
    path: Path,
    settings: dict[str, Any],
    identity: tuple[str, str] | None = None,
    *,
    resume: bool,
    overwrite: bool,
) -> dict[str, Any] | None:
    """The metadata of the feature file ``path`` if it exists and may be kept, else ``None``
    (raises on a conflict). ``identity`` is ``(metadata field, value)`` naming the input
    the file must come from (the image's absolute path, the prompt's text)."""
    if not path.exists():
        return None
    if overwrite:
        return None
    if not resume:
        raise _exists_error(path)
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
    diffs = [k for k in CONTENT_FIELDS if meta.get(k) != settings.get(k)]
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
def working_folder(out: Path, console: Console | None = None) -> Iterator[None]:
    """Create ``out``, hold the shared run lock and remove stale temporary files (told on
    ``console``, if any)."""
    out.mkdir(parents=True, exist_ok=True)
    removed: list[Path] = []

    def clean_all() -> None:  # no other run is writing here: every leftover is stale
        removed.extend(remove_stale_temps(out, targets=_our_temp_target))

    with shared_lock(out / RUN_LOCK, when_alone=clean_all) as alone:
        if not alone:
            removed.extend(
                remove_stale_temps(out, min_age=STALE_TEMP_AGE_S, targets=_our_temp_target)
            )
        if removed and console is not None:
            console.print(
                f"removed {len(removed)} temporary file(s) left by an interrupted run in "
                f"{escape(str(out))}",
                highlight=False,
            )
        yield
