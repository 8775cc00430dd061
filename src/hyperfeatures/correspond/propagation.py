"""Video propagation: carry a label mask or an RGBA edit from the first frame to later frames.

Conventions: see :mod:`hyperfeatures.correspond`: sizes are ``(W, H)``, coordinates ``(x, y)``,
flows ``(H, W, 2)`` int64 with ``-1`` for unmatched pixels. A *payload* is a ``(K, H, W)``
tensor on the propagation grid: ``K = 1`` integer labels (0 background) for a mask, ``K = 4``
uint8 RGBA for an edit layer. Unmatched pixels get 0 (background / transparent).

Modes (every frame index ``t`` is an index into the frames actually used, after stride):

- ``"first"``: frame ``t`` is matched to frame 0 and the frame-0 payload is warped backward
  along that flow (no drift, but large motions are harder);
- ``"chain"``: frame ``t`` is matched to frame ``t - 1`` and the payload *propagated to*
  ``t - 1`` is warped (small motions, but errors accumulate).

Video input and output use PyAV (``pip install av``), imported only when a video is read or
written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .dense import warp_image
from .warping import dense_warp

__all__ = [
    "MODES",
    "composite",
    "label_iou",
    "load_labels",
    "overlay_labels",
    "propagate",
    "read_video",
    "write_video",
]

MODES = ("first", "chain")
Mode = Literal["first", "chain"]
VIDEO_CODECS = ("h264", "mpeg4")
"""Codecs tried in order by :func:`write_video`."""

_PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
    ],
    dtype=np.uint8,
)


def propagate(
    describe: Callable[[int], torch.Tensor],
    n_frames: int,
    payload: torch.Tensor,
    *,
    mode: Mode = "first",
    chunk_rows: int | None = None,
) -> Iterator[torch.Tensor]:
    """Propagate a payload from frame 0 to frames ``0 .. n_frames - 1``, one frame at a time.

    Args:
        describe: ``describe(t)`` -> ``(C, h, w)`` descriptors of frame ``t`` (any resolution;
            they are bilinearly upsampled to the payload grid). Called once per frame, in
            order; frame 0's descriptors (``"first"``) or the previous frame's (``"chain"``)
            are kept, nothing else.
        n_frames: number of frames, >= 1.
        payload: ``(K, H, W)`` frame-0 payload on the propagation grid (integer labels or
            uint8 RGBA, see the module docstring).
        mode: ``"first"`` or ``"chain"``.
        chunk_rows: target rows per block of :func:`~hyperfeatures.correspond.warping.dense_warp`.

    Yields:
        ``(K, H, W)`` payload of frame ``t`` (dtype of ``payload``, on the CPU); frame 0's is
        the input payload itself.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if payload.ndim != 3:
        raise ValueError(f"payload must be (K, H, W), got {tuple(payload.shape)}")
    grid = (int(payload.shape[2]), int(payload.shape[1]))
    payload = payload.cpu()
    ref_desc = _as_chw(describe(0), 0)
    ref_payload = payload
    yield payload
    for t in range(1, n_frames):
        desc = _as_chw(describe(t), t)
        flow = dense_warp(ref_desc, desc, size=grid, chunk_rows=chunk_rows).flow.cpu()
        current = warp_image(ref_payload, flow, fill=0)
        if mode == "chain":
            ref_desc, ref_payload = desc, current
        yield current


def _as_chw(desc: torch.Tensor, t: int) -> torch.Tensor:
    if not isinstance(desc, torch.Tensor) or desc.ndim not in (3, 4):
        raise ValueError(f"describe({t}) must return (C, h, w) descriptors")
    if desc.ndim == 4:
        if desc.shape[0] != 1:
            raise ValueError(f"describe({t}) returned a batch of {desc.shape[0]}; expected 1")
        desc = desc[0]
    return desc.float()


# --------------------------------------------------------------------------- labels


def load_labels(path: Path, size: tuple[int, int] | None, flag: str) -> np.ndarray:
    """A label PNG as an ``(H, W)`` int64 array: 0 background, other values labels.

    Palette (DAVIS), grey and integer images give their stored values; an RGB(A) image gives
    one label per distinct non-black colour (1, 2, ... in sorted colour order).

    Args:
        path: the PNG.
        size: required ``(W, H)``, or ``None`` for any size.
        flag: option or file role named in error messages, e.g. ``"--mask"``.

    Raises:
        ValueError: unreadable file or wrong size; the message names ``flag`` and the file.
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode, im_size = img.mode, img.size
            arr = np.asarray(img)
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {path}: cannot read the label image ({err})") from None
    if size is not None and im_size != tuple(size):
        raise ValueError(
            f"{flag} {path}: mask is {im_size[0]}x{im_size[1]} but the first frame is "
            f"{size[0]}x{size[1]} (W x H); give a mask of the frame's size"
        )
    if mode in ("RGB", "RGBA", "LA", "PA") and arr.ndim == 3:
        rgb = arr[..., :3] if mode != "LA" else arr[..., :1]
        colours, inverse = np.unique(rgb.reshape(-1, rgb.shape[-1]), axis=0, return_inverse=True)
        black = np.all(colours == 0, axis=1)
        ids = np.cumsum(~black) * ~black
        return ids[inverse.reshape(-1)].reshape(arr.shape[:2]).astype(np.int64)
    return arr.astype(np.int64)


def label_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean IoU over the labels (> 0) present in ``pred`` or ``gt``, both ``(H, W)`` ints.

    A binary mask gives the plain foreground IoU (DAVIS J); no label in either map gives 1.0.
    """
    labels = np.union1d(np.unique(pred), np.unique(gt))
    labels = labels[labels > 0]
    if labels.size == 0:
        return 1.0
    scores = []
    for label in labels:
        p, g = pred == label, gt == label
        scores.append(float((p & g).sum()) / float((p | g).sum()))
    return float(np.mean(scores))


def overlay_labels(frame: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8 frame with the labels (> 0) of an ``(H, W)`` map blended in colour."""
    colours = _PALETTE[(labels - 1) % len(_PALETTE)]
    inside = (labels > 0)[..., None]
    mixed = frame * (1 - alpha) + colours * alpha
    return np.where(inside, mixed, frame).round().astype(np.uint8)


def composite(frame: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Alpha-composite an ``(H, W, 4)`` uint8 RGBA layer over an ``(H, W, 3)`` uint8 frame."""
    alpha = layer[..., 3:4].astype(np.float32) / 255.0
    out = frame.astype(np.float32) * (1 - alpha) + layer[..., :3].astype(np.float32) * alpha
    return out.round().clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- video


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise ValueError("reading or writing video needs PyAV: pip install av") from None
    return av


def read_video(
    path: Path, *, max_frames: int | None = None, stride: int = 1
) -> tuple[list[Image.Image], list[int], int, float]:
    """Decode a video with PyAV, keeping every ``stride``-th frame (at most ``max_frames``).

    Returns:
        ``(frames, indices, total, fps)``: RGB frames, their indices in the video, the number
        of frames in the video (all are decoded to count them) and the frame rate (25 if the
        file does not say).

    Raises:
        ValueError: PyAV missing, or the file is not a readable video / has no frame.
    """
    av = _import_av()
    frames: list[Image.Image] = []
    indices: list[int] = []
    total, fps = 0, 25.0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            if stream.average_rate:
                fps = float(stream.average_rate)
            for frame in container.decode(stream):
                if total % stride == 0 and (max_frames is None or len(frames) < max_frames):
                    frames.append(frame.to_image().convert("RGB"))
                    indices.append(total)
                total += 1
    except ValueError:
        raise
    except Exception as err:  # PyAV raises its own FFmpegError family
        raise ValueError(f"{path}: cannot read the video ({type(err).__name__}: {err})") from None
    if not frames:
        raise ValueError(f"{path}: the video has no frame")
    return frames, indices, total, fps


def write_video(frames: list[np.ndarray], path: Path, fps: float = 10.0) -> str:
    """Write ``(H, W, 3)`` uint8 frames to an mp4 with PyAV; returns the codec used.

    h264 if this FFmpeg build has an encoder for it, else mpeg4. Odd widths/heights are
    padded by one black row/column (yuv420p needs even sizes).
    """
    av = _import_av()
    h, w = frames[0].shape[:2]
    eh, ew = h + h % 2, w + w % 2
    last: Exception | None = None
    for codec in VIDEO_CODECS:
        try:
            with av.open(str(path), "w") as container:
                stream = container.add_stream(codec, rate=max(1, round(fps)))
                stream.width, stream.height, stream.pix_fmt = ew, eh, "yuv420p"
                for arr in frames:
                    padded = np.zeros((eh, ew, 3), dtype=np.uint8)
                    padded[:h, :w] = arr
                    frame = av.VideoFrame.from_ndarray(padded, format="rgb24")
                    container.mux(stream.encode(frame))
                container.mux(stream.encode(None))
            return codec
        except Exception as err:  # no encoder for this codec: try the next one
            last = err
            Path(path).unlink(missing_ok=True)
    raise ValueError(f"{path}: no video encoder among {VIDEO_CODECS} worked ({last})")
