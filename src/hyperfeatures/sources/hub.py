"""Where weights are found: local folders, the Hugging Face cache, the hub (one helper).

Every source (diffusion models, ViTs) looks weights up the same way and fails with the same
error when they are absent:

1. a local folder (``--model-path DIR`` / ``model_path=``, or the name itself when it is one);
2. the Hugging Face cache: ``HF_HUB_CACHE`` (or ``HUGGINGFACE_HUB_CACHE``), else
   ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
   ``~/.cache/huggingface/hub``;
3. the hub, unless ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) or the hub endpoint
   cannot be reached (probed once per process, :func:`hub_reachable`).

Both environment variables are read at call time, so tests and users may set them late.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "WeightsNotFoundError",
    "hf_cache_dir",
    "hub_endpoint",
    "hub_reachable",
    "is_hub_id",
    "local_files_only",
    "offline",
    "quiet_hub_warnings",
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


#: Seconds the reachability probe of the hub waits for a TCP connection.
HUB_PROBE_TIMEOUT_S = 3.0

_REACHABLE: dict[str, bool] = {}
_PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


def hub_endpoint() -> str:
    """The hub's base URL (``HF_ENDPOINT``, default ``https://huggingface.co``)."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def hub_reachable() -> bool:
    """Whether a TCP connection to the hub endpoint opens within :data:`HUB_PROBE_TIMEOUT_S`.

    Probed once per process and endpoint. Without it, a machine with no network waits for
    the Hugging Face client's retries (about 30 s) before every missing-weights error. With a
    proxy configured (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``) the hub counts as
    reachable: the client goes through the proxy, which a direct probe cannot judge.
    """
    endpoint = hub_endpoint()
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return True  # a proxy carries the traffic: a direct connection says nothing
    if endpoint not in _REACHABLE:
        url = urlsplit(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname or "", port), HUB_PROBE_TIMEOUT_S):
                _REACHABLE[endpoint] = True
        except (OSError, ValueError):
            _REACHABLE[endpoint] = False
    return _REACHABLE[endpoint]


def local_files_only() -> bool:
    """Whether loaders must stay off the network: offline mode, or the hub is unreachable.

    Weights already in the Hugging Face cache load either way.
    """
    return offline() or not hub_reachable()


@contextmanager
def quiet_hub_warnings() -> Iterator[None]:
    """Silence the deprecation warning that diffusers' config loader triggers in
    ``huggingface_hub`` on every look-up (it passes ``local_dir_use_symlinks``, which the
    client ignores). Other warnings pass through."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


def _hub_state() -> str:
    if offline():
        return "not asked: HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) is set"
    if not hub_reachable():
        return f"not reachable from this machine ({hub_endpoint()})"
    return "asked, and it did not provide them (see the cause below)"


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

    Every suggestion names something that exists: the ``hf download`` command of the current
    ``huggingface_hub``, the ``--model-path`` flag, the environment variables.

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
        lines.append(f"  - the hub: {_hub_state()}")
    lines.append("To provide them:")
    if hub_id is not None:
        lines.append(
            f"  - on a machine with internet: `hf download {hub_id}` fills the cache; copy "
            "the cache folder here and point HF_HOME (or HF_HUB_CACHE) at it;"
        )
        if offline():
            lines.append("  - or unset HF_HUB_OFFLINE to let this machine download them;")
        if "/" in name and not Path(name).expanduser().exists() and name == hub_id:
            lines.append(
                f"  - if {name!r} is meant as a local folder: it does not exist (relative "
                f"paths start from {Path.cwd()});"
            )
    lines.append(
        f"  - or pass a local folder holding {needs}: `--model-path DIR` on the command line, "
        "`model_path=DIR` in Python;"
    )
    lines.append(
        "  - without weights: the tiny models (tiny-sd, tiny-sdxl, tiny-dino, tiny-dinov2) "
        "run everything offline; in Python, load_source(NAME, random_weights=True) builds a "
        "registry diffusion architecture with random weights (for timing only)."
    )
    lines.append(f"Cause: {_first_line(cause)}")
    return WeightsNotFoundError("\n".join(lines))
