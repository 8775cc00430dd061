"""Where weights are found: local folders, the Hugging Face cache, the hub (one helper).

Every source (diffusion models, ViTs) looks weights up the same way and fails with the same
error when they are absent:

1. a local folder (``--model-path DIR`` / ``model_path=``, or the name itself when it is one);
2. the Hugging Face cache: ``HF_HUB_CACHE`` (or ``HUGGINGFACE_HUB_CACHE``), else
   ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
   ``~/.cache/huggingface/hub``;
3. the hub, unless ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``).

Both environment variables are read at call time, so tests and users may set them late.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "WeightsNotFoundError",
    "hf_cache_dir",
    "is_hub_id",
    "offline",
    "weights_not_found",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class WeightsNotFoundError(FileNotFoundError):
    """A model's weights are neither in a local folder nor in the Hugging Face cache (and the
    hub could not be reached or was not asked). The message says where it looked and how to
    provide them."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "on", "yes", "true"}


def offline() -> bool:
    """Whether Hugging Face offline mode is on (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, resolved from the environment now."""

    def expand(value: str) -> Path:  # as huggingface_hub does: $VARS, then ~
        return Path(os.path.expanduser(os.path.expandvars(value)))

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return expand(os.environ[var])
    home = os.environ.get("HF_HOME")
    if not home:
        home = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return expand(home) / "hub"


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub repository id (``owner/name``)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def weights_not_found(
    name: str,
    *,
    hub_id: str | None,
    local: Path | None,
    cause: BaseException,
    what: str = "weights",
    needs: str = "config.json and the weights",
) -> WeightsNotFoundError:
    """The one error users see when weights are missing: where it looked, how to fix it.

    Args:
        name: what the user asked for (registry name, hub id or folder).
        hub_id: the hub repository looked up (``None`` for a local folder only).
        local: the local folder looked in (``None`` if none was given).
        cause: the loader's exception (its first line is quoted).
        what: the kind of weights, e.g. ``"diffusion model weights"``.
        needs: what a local folder must hold.
    """
    lines = [f"could not load the {what} of {name!r}. Looked in:"]
    if local is not None:
        state = "missing" if not local.exists() else f"no loadable {needs} there"
        lines.append(f"  - local folder: {local} ({state})")
    else:
        lines.append("  - local folder: none given (--model-path DIR, model_path=DIR)")
    if hub_id is not None:
        repo_dir = hf_cache_dir() / ("models--" + hub_id.replace("/", "--"))
        state = "present but incomplete" if repo_dir.exists() else "not found"
        lines.append(f"  - Hugging Face cache: {repo_dir} ({state})")
        if offline():
            lines.append("  - the hub: not tried (HF_HUB_OFFLINE=1 is set)")
        else:
            lines.append("  - the hub: tried, it failed (no network?)")
    lines.append("To provide them:")
    if hub_id is not None:
        lines.append(
            f"  - on a machine with internet: `huggingface-cli download {hub_id}` fills the "
            "cache; copy the cache folder here and point HF_HOME (or HF_HUB_CACHE) at it;"
        )
    lines.append(
        f"  - or pass a local folder holding {needs}: `--model-path DIR` on the command line, "
        "`model_path=DIR` in Python;"
    )
    lines.append(
        "  - set HF_HUB_OFFLINE=1 to skip network look-ups"
        + ("; unset it to allow a download." if offline() else ".")
    )
    lines.append(
        "  - for tests and demos without weights use the tiny models (tiny-sd, tiny-sdxl, "
        "tiny-dino, tiny-dinov2) or random_weights=True for a real architecture."
    )
    lines.append(f"Cause: {_first_line(cause)}")
    return WeightsNotFoundError("\n".join(lines))
