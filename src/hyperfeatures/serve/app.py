"""The Gradio page of ``hyperfeatures serve`` on top of :class:`~hyperfeatures.serve.ServeSession`.

Needs the ``demo`` extra (``pip install "hyperfeatures[demo]"``). Import this module only
after ``GRADIO_TEMP_DIR`` and ``GRADIO_ANALYTICS_ENABLED`` are set (the command does): Gradio
reads them when it is imported.

The page: two images (a bundled sample or an upload each), a method and a model menu; a
click on the source image (its ``(x, y)`` pixel, from ``gr.SelectData.index``) shows the
match as a marker on the target, the similarity heat map over the target, and the match
coordinates and similarity as text. Errors (a bad upload, missing weights, an unknown
name) go to the status box, never a traceback.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from .session import (
    DEFAULT_MAX_SIDE,
    DEFAULT_MAX_UPLOAD_MB,
    PAGE_METHODS,
    ServeSession,
    compatible_model,
    draw_marker,
    load_sample,
    load_upload,
    model_choices,
    sample_names,
)

__all__ = [
    "build_app",
    "click_outputs",
    "launch",
    "method_outputs",
    "pick_outputs",
    "upload_outputs",
]

_INTRO = (
    "### hyperfeatures: dense correspondence\n"
    "Pick or upload a **source** and a **target** image, then **click a point on the source "
    "image**: the best match is marked on the target, with the cosine-similarity heat map of "
    "the clicked descriptor over the target."
)


def _accepted(func: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments ``func`` takes (Gradio 4, 5 and 6 moved some between calls)."""
    params = inspect.signature(func).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _theme() -> Any:
    """The default theme with system fonts only: the page loads nothing from the internet."""
    try:
        return gr.themes.Default(
            font=["ui-sans-serif", "system-ui", "sans-serif"],
            font_mono=["ui-monospace", "monospace"],
        )
    except Exception:  # an old or new Gradio without these arguments: its default theme
        return None


def _error(err: BaseException) -> str:
    if isinstance(err, ValueError | OSError):
        return f"error: {err}"
    return f"error: unexpected {type(err).__name__}: {err}"


def _image_outputs(image: Image.Image, name: str) -> tuple[Any, ...]:
    """(state, shown image, match, heat map, status) for a newly chosen image."""
    return image, image, None, None, f"{name}: {image.size[0]} x {image.size[1]} px"


def _unchanged(message: str) -> tuple[Any, ...]:
    return gr.update(), gr.update(), gr.update(), gr.update(), message


def pick_outputs(name: str | None, max_side: int) -> tuple[Any, ...]:
    """A sample chosen: ``(state, shown image, match, heat map, status)``; an unknown name
    leaves the images and says why in the status."""
    if not name:
        return _unchanged("")
    try:
        return _image_outputs(load_sample(name, max_side), name)
    except (ValueError, OSError) as err:
        return _unchanged(_error(err))


def upload_outputs(path: str | None, max_bytes: int, max_side: int) -> tuple[Any, ...]:
    """A file uploaded (in Gradio's temporary folder): ``(state, shown image, match, heat map,
    status)``; a file too large, not an image or corrupt leaves the images and says why."""
    if not path:
        return _unchanged("")
    name = Path(path).name
    try:
        image = load_upload(path, name=name, max_bytes=max_bytes, max_side=max_side)
    except Exception as err:  # never a traceback on the page
        return _unchanged(_error(err))
    return _image_outputs(image, name)


def method_outputs(chosen: str | None, current: str | None) -> tuple[Any, str]:
    """The method menu changed: ``(model menu update, status)``; a model of the other kind
    (a diffusion model for ``dinov2``) is swapped for a fitting one."""
    chosen, current = (chosen or "").strip(), (current or "").strip()
    if not chosen or not current:
        return gr.update(), ""
    new = compatible_model(chosen, current)
    if new != current:
        return gr.update(value=new), f"model {current} does not fit {chosen}: using {new}"
    return gr.update(), ""


def click_outputs(
    session: ServeSession,
    src: Image.Image | None,
    trg: Image.Image | None,
    method: str | None,
    model: str | None,
    index: Any,
) -> tuple[Any, ...]:
    """A click at ``index = (x, y)`` (pixels of the shown source image):
    ``(source with the click marked, target with the match marked, heat map, result text,
    status)``. Any error (missing weights, an unknown name) leaves the images and goes to
    the status as one ``error:`` line, followed by new warnings of the session."""
    start = len(session.notes)

    def status(text: str) -> str:
        return "\n".join([text, *(f"warning: {n}" for n in session.notes[start:])])

    keep = (gr.update(), gr.update(), gr.update())
    if src is None or trg is None:
        return (*keep, "", "pick or upload both images first")
    method, model = (method or "").strip(), (model or "").strip()
    try:
        x, y = (float(v) for v in list(index)[:2])
        result = session.click(src, trg, x, y, method, model)
    except Exception as err:  # the status box says what; the page goes on
        return (*keep, "", status(_error(err)))
    shown = draw_marker(src, *result.source_point, color=(40, 160, 255))
    px, py = result.point
    text = f"match: ({px:.1f}, {py:.1f}) px in the target; similarity {result.similarity:.3f}"
    return (
        shown,
        result.marked,
        result.heatmap,
        text,
        status(f"{method} on {model}: {result.text()}"),
    )


def _image_column(
    samples: list[str], value: str, start: Any, side: str, label: str
) -> tuple[Any, Any, Any]:
    """One side of the page: sample picker, upload box and the image (``side``: source or
    target; element ids ``hf-<side>-pick`` and ``hf-<side>``)."""
    pick = gr.Radio(samples, value=value, label=f"{side.title()} sample", elem_id=f"hf-{side}-pick")
    upload = gr.File(
        label=f"...or upload a {side} image", file_types=["image"], type="filepath", height=120
    )
    view = gr.Image(
        start, type="pil", format="png", interactive=False, label=label, elem_id=f"hf-{side}"
    )
    return pick, upload, view


def build_app(
    session: ServeSession,
    *,
    method: str,
    model: str,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20,
    max_side: int = DEFAULT_MAX_SIDE,
    source: str = "astronaut.jpg",
    target: str = "chelsea.jpg",
) -> gr.Blocks:
    """The page as a ``gr.Blocks`` (not launched).

    Args:
        session: owns the methods and the descriptor cache; shared by every visitor.
        method, model: chosen in the menus at start.
        max_upload_bytes, max_side: upload limits (see :func:`load_upload`).
        source, target: sample images shown at start.
    """
    samples = sample_names()
    methods = list(PAGE_METHODS) if method in PAGE_METHODS else [method, *PAGE_METHODS]
    models = model_choices()
    models = models if model in models else [model, *models]
    start_src = load_sample(source, max_side)
    start_trg = load_sample(target, max_side)

    def pick(name: str | None) -> tuple[Any, ...]:
        return pick_outputs(name, max_side)

    def upload(path: str | None) -> tuple[Any, ...]:
        return upload_outputs(path, max_upload_bytes, max_side)

    def method_changed(chosen: str, current: str) -> tuple[Any, str]:
        return method_outputs(chosen, current)

    def click(
        src: Image.Image | None,
        trg: Image.Image | None,
        chosen_method: str,
        chosen_model: str,
        evt: gr.SelectData,
    ) -> tuple[Any, ...]:
        return click_outputs(session, src, trg, chosen_method, chosen_model, evt.index)

    blocks = gr.Blocks(
        **_accepted(
            gr.Blocks.__init__,
            title="hyperfeatures serve",
            analytics_enabled=False,
            theme=_theme(),
        )
    )
    with blocks:
        gr.Markdown(_INTRO)
        if session.notes:  # e.g. an untrained aggregation network: say so on the page
            gr.Markdown("\n".join(f"*Note: {note}*" for note in session.notes))
        with gr.Row():
            method_box = gr.Dropdown(methods, value=method, label="Method", allow_custom_value=True)
            model_box = gr.Dropdown(models, value=model, label="Model", allow_custom_value=True)
        src_state = gr.State(start_src)
        trg_state = gr.State(start_trg)
        with gr.Row():
            with gr.Column():
                src_pick, src_file, src_view = _image_column(
                    samples, source, start_src, "source", "Source: click a point"
                )
            with gr.Column():
                trg_pick, trg_file, trg_view = _image_column(
                    samples, target, start_trg, "target", "Target"
                )
        with gr.Row():
            match_view = gr.Image(
                type="numpy",
                format="png",
                interactive=False,
                label="Match on the target",
                elem_id="hf-match",
            )
            heat_view = gr.Image(
                type="numpy",
                format="png",
                interactive=False,
                label="Similarity heat map",
                elem_id="hf-heatmap",
            )
        result_box = gr.Textbox(label="Result", interactive=False, elem_id="hf-result")
        status_box = gr.Textbox(label="Status", interactive=False, elem_id="hf-status")

        src_out = [src_state, src_view, match_view, heat_view, status_box]
        trg_out = [trg_state, trg_view, match_view, heat_view, status_box]
        src_pick.input(pick, src_pick, src_out)
        trg_pick.input(pick, trg_pick, trg_out)
        src_file.upload(upload, src_file, src_out)
        trg_file.upload(upload, trg_file, trg_out)
        method_box.input(method_changed, [method_box, model_box], [model_box, status_box])
        src_view.select(
            click,
            [src_state, trg_state, method_box, model_box],
            [src_view, match_view, heat_view, result_box, status_box],
        )
    return blocks


def launch(
    session: ServeSession,
    *,
    host: str,
    port: int,
    method: str,
    model: str,
    max_upload_bytes: int,
    max_side: int,
    echo: Callable[[str], None] = print,
) -> None:
    """Build the method of the start menus (a failure is shown, not fatal), build the page and
    serve it on ``host:port`` until interrupted (Ctrl-C). No share link, no analytics."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        session.method(method, model)
        for note in session.notes:
            echo(f"warning: {note}")
    except (ValueError, OSError) as err:
        echo(f"warning: {err} (the page shows this until another model is chosen)")
    blocks = build_app(
        session, method=method, model=model, max_upload_bytes=max_upload_bytes, max_side=max_side
    )
    theme = _theme()
    options = _accepted(
        blocks.launch,
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=True,
        max_file_size=max_upload_bytes,
        ssr_mode=False,
        theme=theme,
        quiet=False,
    )
    blocks.queue(default_concurrency_limit=1)
    blocks.launch(**options)
