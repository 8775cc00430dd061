"""``hyperfeatures serve``: an interactive correspondence page.

* :mod:`~hyperfeatures.serve.session` (no Gradio): :class:`ServeSession` owns the descriptor
  methods (built lazily per (method, model), bounded), the descriptor cache (an LRU keyed by
  image content, method, model and settings) and :meth:`ServeSession.click`, which matches
  one clicked source point and draws the similarity heat map over the target image;
  :func:`load_upload` checks an uploaded file (bytes, pixels, decodable) and downscales it.
* :mod:`~hyperfeatures.serve.app` (needs the ``demo`` extra: ``pip install
  "hyperfeatures[demo]"``): the Gradio page on top of the session, and its launcher.

Coordinates are ``(x, y)`` pixels of the image as shown on the page (x the column, y the
row), which is the image the descriptors are computed from.
"""

from __future__ import annotations

from .session import (
    DEFAULT_MAX_SIDE,
    DEFAULT_MAX_UPLOAD_MB,
    ClickResult,
    ServeSession,
    UploadError,
    default_model,
    load_sample,
    load_upload,
    sample_names,
)

__all__ = [
    "DEFAULT_MAX_SIDE",
    "DEFAULT_MAX_UPLOAD_MB",
    "ClickResult",
    "ServeSession",
    "UploadError",
    "default_model",
    "load_sample",
    "load_upload",
    "sample_names",
]
