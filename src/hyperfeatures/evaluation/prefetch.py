"""Decode the next pair's images while the model runs on this one (``evaluate``)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from PIL import Image

from ..datasets import load_image

__all__ = ["ImagePrefetcher"]


class ImagePrefetcher:
    """One loader thread that decodes images ahead of their use.

    :meth:`ahead` queues files (the next pair's); :meth:`load` returns a queued file's image,
    or decodes it now when it was not queued. An unreadable file raises the same error
    (naming the file) from :meth:`load` as :func:`~hyperfeatures.datasets.load_image` would.
    At most :data:`KEEP` images wait (those of this pair and the next); older ones that were
    never asked for (their descriptors came from the cache meanwhile) are dropped.
    """

    KEEP = 4

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hyperfeatures-loader")
        self._ahead: dict[Path, Future[Image.Image]] = {}

    def ahead(self, paths: list[Path], context: str) -> None:
        """Start decoding ``paths`` (``context`` names them in an error: the pair)."""
        for path in paths:
            if path not in self._ahead:
                self._ahead[path] = self._pool.submit(load_image, path, context=context)
        while len(self._ahead) > self.KEEP:
            self._ahead.pop(next(iter(self._ahead))).cancel()

    def load(self, path: Path, context: str) -> Image.Image:
        """The image of ``path``: decoded ahead, or now."""
        future = self._ahead.pop(Path(path), None)
        if future is None:
            return load_image(path, context=context)
        return future.result()

    def close(self) -> None:
        """Drop what was decoded ahead and stop the thread."""
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ImagePrefetcher:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
