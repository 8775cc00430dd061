"""The output folder of an evaluation run: checks, staged writes, stale files, the manifest.

A run writes ``results.json``, ``per_category.csv``, ``predictions.json`` (:data:`RESULT_FILES`),
``figures/pair_XXX.png`` and, last, ``manifest.json`` (:data:`MANIFEST_FILE`: the list of files
the run wrote, which tells this tool's files from a user's).

An output folder is checked before any work (:func:`check_output_dir`): files of this tool's
names that it did not write are never replaced, the results of an earlier run are replaced
only on request, and then the earlier run's files this run does not rewrite (figures of more
pairs ...) are removed (:func:`remove_previous`). The files are written into a hidden folder
first and moved into place only when all of them succeeded (:func:`write_staged`).

This module imports nothing of :mod:`~hyperfeatures.evaluation.report`: the report imports it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._io import JSONFileError, atomic_write_text, read_json

__all__ = [
    "FIGURES_FOLDER",
    "MANIFEST_FILE",
    "RESULT_FILES",
    "OutputExistsError",
    "check_output_dir",
    "relative_name",
    "remove_previous",
    "write_manifest",
    "write_staged",
]

RESULT_FILES = ("results.json", "per_category.csv", "predictions.json")
"""Files of one run, besides the figures and the manifest."""

MANIFEST_FILE = "manifest.json"
"""The list of files a run wrote (written last): tells this tool's files from a user's."""

FIGURES_FOLDER = "figures"
_FIGURE_NAME = re.compile(r"pair_\d{3,}\.png")
_MANIFEST_TOOL = "hyperfeatures eval"
_MANIFEST_MAX_BYTES = 16 * 2**20

# how each result file of this tool begins (recognises files written before manifests existed)
_SIGNATURES = {
    "results.json": b'{\n  "hyperfeatures_version": ',
    "predictions.json": b'{"dataset": ',
    "per_category.csv": b"category,pairs,keypoints,",
}


class OutputExistsError(FileExistsError):
    """The output folder holds an earlier run's results (and replacing them was not asked for),
    or a file of this tool's names that this tool did not write."""


def _starts_with(path: Path, prefix: bytes) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(prefix)) == prefix
    except OSError:
        return False


def _manifest_files(path: Path) -> list[str] | None:
    """The files listed by this tool's manifest at ``path``; ``None`` if it is not ours."""
    try:
        if path.stat().st_size > _MANIFEST_MAX_BYTES:
            return None
        data = read_json(path, what="manifest")
    except (OSError, JSONFileError):
        return None
    if not isinstance(data, dict) or data.get("tool") != _MANIFEST_TOOL:
        return None
    files = data.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return [f for f in files if _is_result_name(f)]


def _is_result_name(rel: str) -> bool:
    """Whether ``rel`` (relative, ``/``-separated) is a name this tool writes."""
    if rel in RESULT_FILES:
        return True
    parts = rel.split("/")
    return len(parts) == 2 and parts[0] == FIGURES_FOLDER and bool(_FIGURE_NAME.fullmatch(parts[1]))


def relative_name(path: Path, out: Path) -> str:
    """``path`` relative to ``out``, ``/``-separated (as the manifest lists it)."""
    return path.relative_to(out).as_posix()


def check_output_dir(
    out_dir: str | os.PathLike[str], *, overwrite: bool, flags: bool = False
) -> list[Path]:
    """Check an output folder before any work; returns the earlier run's files in it.

    Nothing is written. A missing folder (whose parents can be created) or one without
    results is fine. Files of this tool's names (:data:`RESULT_FILES`, :data:`MANIFEST_FILE`,
    ``figures/pair_XXX.png``) are this tool's when the manifest lists them or their content
    starts like this tool's files; such files are an earlier run's results.

    Args:
        out_dir: the output folder.
        overwrite: whether an earlier run's results may be replaced.
        flags: word messages with the ``eval`` command's flags (``--out``, ``--overwrite``)
            instead of the Python keywords.

    Returns:
        The earlier run's files (this tool's; only with ``overwrite``).

    Raises:
        OutputExistsError: results of an earlier run without ``overwrite``; a file of this
            tool's names that it did not write (always: move it away or choose another folder).
        NotADirectoryError: ``out_dir`` (or a parent) is a file.
    """
    from ..viz._common import check_creatable_parent

    out = Path(out_dir).expanduser()
    label = f"--out {out}" if flags else f"output folder {out}"
    again = "choose another --out" if flags else "choose another output folder"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{label} is a file; give a folder for the results")
    check_creatable_parent(out, what="--out" if flags else "output folder")
    if not out.is_dir():
        return []
    figures = out / FIGURES_FOLDER
    if figures.exists() and not figures.is_dir():
        raise OutputExistsError(
            f"{label}: {figures} is a file, but the figures go into a folder of that name; "
            f"move it away or {again}"
        )

    def foreign(path: Path) -> OutputExistsError:
        return OutputExistsError(
            f"{label}: {path} was not written by `hyperfeatures eval` (it has the name of one "
            f"of its result files); move it away or {again}"
        )

    ours: list[Path] = []
    manifest = out / MANIFEST_FILE
    listed: set[str] = set()
    if manifest.exists():
        files = _manifest_files(manifest)
        if files is None:
            raise foreign(manifest)
        listed = set(files)
    for name in RESULT_FILES:
        path = out / name
        if not path.exists():
            continue
        if name not in listed and not (path.is_file() and _starts_with(path, _SIGNATURES[name])):
            raise foreign(path)
        ours.append(path)
    if figures.is_dir():
        results_are_ours = (out / "results.json") in ours
        for path in sorted(figures.iterdir()):
            if not _FIGURE_NAME.fullmatch(path.name):
                continue  # a user's file: never touched
            if not path.is_file() or (
                relative_name(path, out) not in listed and not results_are_ours
            ):
                raise foreign(path)
            ours.append(path)
    if manifest.exists():
        ours.append(manifest)
    if ours and not overwrite:
        names = ", ".join(relative_name(p, out) for p in ours[:3]) + (
            ", ..." if len(ours) > 3 else ""
        )
        how = "pass --overwrite to replace them" if flags else "pass overwrite=True"
        raise OutputExistsError(
            f"{label} already holds the results of an earlier run ({names}); {how}, or {again}"
        )
    return ours


def write_staged(out: Path, write: Callable[[Path], list[str]]) -> list[str]:
    """Run ``write`` on a hidden folder inside ``out`` (created) and move the files it names
    (relative paths, its return value) into ``out``; returns those names.

    A failure removes the hidden folder, and ``out`` too if this call created it and it is
    empty: ``out`` is left as it was.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".hyperfeatures-eval-{uuid.uuid4().hex}.tmp"
    try:
        staging.mkdir()
        names = write(staging)
        for rel in names:
            final = out / rel
            final.parent.mkdir(exist_ok=True)
            os.replace(staging / rel, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed first run leaves no empty folder behind
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return names


def remove_previous(out: Path, previous: Sequence[Path], names: Sequence[str]) -> None:
    """Remove the earlier run's files (``previous``, from :func:`check_output_dir`) that
    this run did not rewrite (``names``, relative to ``out``), and the figures folder if
    that emptied it. The manifest is left to be replaced."""
    fresh = {out / rel for rel in names}
    for path in previous:
        if path not in fresh and path.name != MANIFEST_FILE:
            path.unlink(missing_ok=True)
    figures_dir = out / FIGURES_FOLDER
    had_figures = any(path.parent == figures_dir for path in previous)
    if had_figures and figures_dir.is_dir() and not any(figures_dir.iterdir()):
        figures_dir.rmdir()  # emptied of an earlier run's figures


def write_manifest(out: Path, names: Sequence[str], figures: dict[str, Any]) -> Path:
    """Write ``out/manifest.json`` (atomically): the files of the run (``names``) and the
    ``figures`` record (drawn, pairs, keypoint bound); its path."""
    manifest = {
        "tool": _MANIFEST_TOOL,
        "hyperfeatures_version": _version(),
        "files": names,
        "figures": figures,
    }
    return atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def _version() -> str:
    from .. import __version__

    return __version__
