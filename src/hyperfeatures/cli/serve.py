"""``serve``: the interactive correspondence page (Gradio, the ``demo`` extra).

Every flag is checked before Gradio is imported or a model is loaded; a user error is one
``error:`` line and exit code 2. The page binds to 127.0.0.1 unless ``--host`` says
otherwise (a warning for any non-loopback address), never creates a share link, sends no
analytics, and keeps uploads in a temporary folder the command creates and removes at exit.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from . import app, console, err_console, fail
from .benchmark import AggregatorOpt, MethodOpt, _check_method_options, _check_seed
from .options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    ImageSizeOpt,
    LoadSizeOpt,
    MatchSizeOpt,
    ModelOpt,
    ModelPathOpt,
    NumStepsOpt,
    PromptOpt,
    SeedOpt,
    StepsOpt,
    TapsOpt,
    check_int,
    check_settings_flags,
    settings_from,
)

INSTALL_HINT = 'pip install "hyperfeatures[demo]"'
MAX_CACHE_ITEMS = 10_000


def _require_gradio() -> None:
    """One ``error:`` line naming the install command when Gradio is missing."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail(f"`hyperfeatures serve` needs Gradio, which is not installed: {INSTALL_HINT}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost`` (only this machine can connect)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the OS picks one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_model(model: str) -> None:
    """An unknown model name (not in the registry, no folder, no hub id) fails before work."""
    from ..sources.hub import is_hub_id
    from ..sources.registry import source_spec, unknown_source_message

    known = source_spec(model) is not None or Path(model).expanduser().is_dir()
    if not known and not is_hub_id(model):
        raise ValueError(unknown_source_message(model))


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM ends like Ctrl-C: the server closes, the temp dir goes


@app.command("serve")
def serve_command(
    method: MethodOpt = "hyperfeatures",
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="Address to bind (default 127.0.0.1: this machine only). Another address "
            "exposes the page to the network (a warning says so).",
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0 = any free port).")] = 7860,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", help="Largest accepted upload, in MB.")
    ] = 20.0,
    max_side: Annotated[
        int,
        typer.Option(
            "--max-side", help="Images are downscaled to this long side (display and work)."
        ),
    ] = 768,
    cache_items: Annotated[
        int, typer.Option("--cache-items", help="Descriptor maps kept in memory (LRU).")
    ] = 32,
    cache_mb: Annotated[
        int, typer.Option("--cache-mb", help="Most MB of descriptor maps kept in memory.")
    ] = 1024,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            help="CPU threads of torch (0 = its default; fewer than the cores on a machine "
            "shared with other jobs).",
        ),
    ] = 0,
    aggregator: AggregatorOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    taps: TapsOpt = None,
    num_steps: NumStepsOpt = None,
    steps: StepsOpt = None,
    image_size: ImageSizeOpt = None,
    load_size: LoadSizeOpt = None,
    match_size: MatchSizeOpt = None,
    seed: SeedOpt = None,
    prompt: PromptOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
) -> None:
    """Serve an interactive correspondence page: click a point, see its match and heat map.

    Offline on the tiny random-weight model by default (tiny-sd at 128 px). Needs Gradio,
    the demo extra of the package.
    """
    from ..serve.session import default_model

    try:
        _check_method_options(method, **{"--aggregator": aggregator})
        check_settings_flags(locals())
        check_int(port, "--port", 0, 65535, " (0 = any free port)")
        check_int(cache_items, "--cache-items", 1, MAX_CACHE_ITEMS)
        check_int(cache_mb, "--cache-mb", 1, None)
        check_int(max_side, "--max-side", 16, 8192)
        check_int(threads, "--threads", 0, 1024, " (0 = torch's default)")
        if not 0 < max_upload_mb <= 4096:
            raise ValueError(f"--max-upload-mb must be in (0, 4096], got {max_upload_mb:g}")
        if device not in {"cpu", "cuda"} and not device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
        settings = settings_from(locals())
        _check_seed(settings, config)
        if method.strip() == "fusion":
            raise ValueError(
                "--method fusion fits each pair jointly and cannot run on the page; use "
                "`hyperfeatures match --method fusion`"
            )
        given = "model" in settings.model_fields_set
        if aggregator is not None and not given:
            raise ValueError(
                "--aggregator: give --model too, the model the network was trained on (sd15)"
            )
        start_model = settings.model if given else default_model(method.strip())
        _check_model(start_model)
        if not host.strip():
            raise ValueError("--host is empty; give an address such as 127.0.0.1")
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    _require_gradio()
    if threads:
        import torch

        torch.set_num_threads(threads)
    if not is_loopback(host):
        err_console.print(
            f"[yellow]warning:[/yellow] --host {escape(host)} is not a loopback address: anyone "
            "who can reach this machine can use the page (and its CPU / GPU); bind 127.0.0.1 "
            "unless you mean it",
            highlight=False,
        )
    try:
        if port == 0:
            port = free_port(host)
    except OSError as err:
        fail(f"--host {host}: cannot bind ({err})")
        return
    _serve(
        settings=settings,
        method=method.strip(),
        model=start_model,
        host=host,
        port=port,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_side=max_side,
        cache_items=cache_items,
        cache_bytes=cache_mb * 2**20,
        aggregator=aggregator,
        device=device,
        dtype=dtype,
        model_path=model_path,
    )


def _serve(
    *,
    settings: Any,
    method: str,
    model: str,
    host: str,
    port: int,
    max_upload_bytes: int,
    max_side: int,
    cache_items: int,
    cache_bytes: int,
    aggregator: str | None,
    device: str,
    dtype: str,
    model_path: Path | None,
) -> None:
    """Create the upload folder, set Gradio's environment, serve until Ctrl-C / SIGTERM, and
    remove the folder."""
    temp = tempfile.mkdtemp(prefix="hyperfeatures-serve-")
    old = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED")}
    os.environ["GRADIO_TEMP_DIR"] = temp
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (an in-process test): keep the handler
        previous = None
    try:
        from ..serve import app as page
        from ..serve.session import ServeSession

        session = ServeSession(
            settings,
            aggregator=aggregator,
            device=device,
            dtype=dtype,
            model_path=model_path,
            model_path_for=model,
            cache_items=cache_items,
            cache_bytes=cache_bytes,
        )
        shown = f"[{host}]" if ":" in host else host
        console.print(
            f"hyperfeatures serve: {escape(method)} on {escape(model)} at "
            f"http://{escape(shown)}:{port} (uploads in {escape(temp)}; Ctrl-C stops)",
            highlight=False,
        )
        page.launch(
            session,
            host=host,
            port=port,
            method=method,
            model=model,
            max_upload_bytes=max_upload_bytes,
            max_side=max_side,
            echo=lambda line: err_console.print(escape(line), highlight=False),
        )
    except KeyboardInterrupt:
        pass
    except (ValueError, OSError) as err:
        fail(str(err))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)
