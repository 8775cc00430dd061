"""Any torch module as a feature source: module paths are taps, one forward is one step.

:class:`ModuleSource` wraps a module that takes a ``(B, 3, S, S)`` float image batch (a CNN,
your own ViT ...). Its activations then go to the same sinks, aggregation network and
evaluator as diffusion features; a run has one step (0), so settings need ``num_steps=1``.

Taps are module paths as ``module.named_modules()`` prints them (``"layer3.1"``,
``"blocks.5"``); the tap's value is the module's output (a tensor, or the first tensor of a
tuple, list or dict). An output is a map when it is

- ``(B, C, h, w)``: used as it is (channels first is assumed);
- tokens ``(B, N, C)`` with ``N - prefix_tokens = h * h`` a square number: the first
  ``prefix_tokens`` tokens (CLS, registers) are dropped and the rest is read row-major, token
  ``y * w + x`` -> pixel ``(y, x)``, giving ``(B, C, h, w)``.

Anything else (pooled vectors, logits, non-square token counts) is not a tap. A module that
runs more than once per forward is tapped at its first call.

Example::

    src = ModuleSource(torchvision.models.resnet50(weights=...), name="resnet50",
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                       presets={"stages": ["layer1", "layer2", "layer3", "layer4"]})
    src.list_taps()                                   # TapInfo per map-shaped module
    sink = KeepAll()
    src.run(images, sink, Settings(taps="stages", num_steps=1, steps=[0]))
    sink.maps[0]["layer3"]                            # (B, 1024, 14, 14)
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import Settings
from ..taps import TapError, TapInfo
from .base import EventSink, FeatureSource, ImageInput, resolve_device, resolve_dtype

__all__ = ["ModuleSource"]

_ACCEPTED = "a map (B, C, h, w) or tokens (B, N, C) with N - prefix_tokens a square number h * h"

# name -> (module class, (C, h, w) of the map or None, what the output was)
_Probe = dict[str, tuple[str, tuple[int, int, int] | None, str]]


class _StopForward(Exception):
    """Raised by the hook of the last tap to fire; ends the forward early (caught in run)."""


def _inspect(output: Any, prefix: int, batch: int) -> tuple[Any, tuple[int, int, int] | None]:
    """``(tensor, (C, h, w))`` of a module output: the output itself if a tensor, else the
    first tensor of a tuple / list / dict; the shape is None when it is not a map."""
    t = list(output.values()) if isinstance(output, Mapping) else output
    if isinstance(t, tuple | list):
        t = next((o for o in t if isinstance(o, torch.Tensor)), output)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim not in (3, 4):
        return t, None
    if t.shape[0] != batch:
        return t, None
    if t.ndim == 4:
        c, h, w = (int(s) for s in t.shape[1:])
        return t, (c, h, w) if min(c, h, w) > 0 else None
    n, c = int(t.shape[1]) - prefix, int(t.shape[2])
    side = math.isqrt(max(n, 0))
    return t, (c, side, side) if n > 0 and c > 0 and side * side == n else None


def _what(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return f"no tensor (a {type(t).__name__})"
    kind = "" if t.is_floating_point() else f"{str(t.dtype).removeprefix('torch.')} "
    return f"a {kind}tensor of shape {tuple(t.shape)}"


def _three(label: str, value: Sequence[float] | None) -> tuple[float, ...] | None:
    values = None if value is None else tuple(float(v) for v in value)
    if values is not None and (len(values) != 3 or not all(map(math.isfinite, values))):
        raise ValueError(f"{label} must be 3 finite floats (R, G, B), got {value!r}")
    return values


class ModuleSource(FeatureSource):
    """A torch module whose named submodules are taps (see the module docstring).

    Args:
        module: takes a ``(B, 3, S, S)`` float tensor; put in eval mode here, run without grad.
        name: a label stored with the features (``describe()["model"]``).
        image_size: default input side S (``settings.image_size`` overrides it).
        mean, std: 3 floats each; inputs in [0, 1] become ``(x - mean) / std`` (each
            optional: default 0 and 1).
        prefix_tokens: tokens dropped before token outputs become maps (1 for a CLS token).
        presets: ``{preset name: [tap names]}`` accepted by :meth:`resolve_taps`.
    """

    kind = "module"

    def __init__(
        self,
        module: nn.Module,
        *,
        name: str = "module",
        image_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        prefix_tokens: int = 0,
        presets: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        checks = {"image_size": (image_size, 1), "prefix_tokens": (prefix_tokens, 0)}
        for label, (value, low) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        self.module = module.eval()
        self.name = str(name)
        self._image_size = image_size
        self.prefix_tokens = prefix_tokens
        self.mean = _three("mean", mean) or (0.0, 0.0, 0.0)
        self.std = _three("std", std) or (1.0, 1.0, 1.0)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {list(self.std)}")
        self._presets: dict[str, list[str]] = {}
        for key, taps in (presets or {}).items():
            if isinstance(taps, str) or not taps or not all(isinstance(t, str) for t in taps):
                raise ValueError(f"preset {key!r} must be a non-empty list of tap names")
            self._presets[str(key)] = list(taps)
        self._probes: dict[int, _Probe] = {}

    def to(
        self,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> ModuleSource:
        """Move the module to ``device`` and / or cast it to ``dtype`` (in place); returns
        self."""
        self.module.to(
            resolve_device(device) if device is not None else None,
            resolve_dtype(dtype) if dtype is not None else None,
        )
        return self

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        """Device of the module's first parameter or buffer (cpu without any)."""
        first = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the module's first floating parameter or buffer (float32 without any)."""
        states = itertools.chain(self.module.parameters(), self.module.buffers())
        return next((t.dtype for t in states if t.is_floating_point()), torch.float32)

    @property
    def default_image_size(self) -> int:
        """The ``image_size`` given to the constructor."""
        return self._image_size

    def presets(self) -> dict[str, str]:
        """``{preset name: "taps: a, b, ..."}`` of the presets given to the constructor."""
        return {k: "taps: " + ", ".join(v) for k, v in self._presets.items()}

    # ------------------------------------------------------------------ taps
    def _probe(self, size: int) -> _Probe:
        """Output of every named module (root excluded) for a zero ``(1, 3, size, size)``
        image, in firing order; cached per size."""
        if size in self._probes:
            return self._probes[size]
        records: _Probe = {}

        def make(path: str) -> Any:
            def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
                if path not in records:
                    t, shape = _inspect(output, self.prefix_tokens, 1)
                    records[path] = (type(module).__name__, shape, _what(t))

            return hook

        handles = []
        try:
            for path, sub in self.module.named_modules():
                if path:
                    handles.append(sub.register_forward_hook(make(path)))
            x = torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)
            with torch.no_grad():
                self.module(x)
        finally:
            for handle in handles:
                handle.remove()
        self._probes[size] = records
        return records

    def list_taps(self, image_size: int | None = None) -> list[TapInfo]:
        """Every module whose output is a map for a ``(1, 3, S, S)`` input, in firing order.

        ``S = image_size`` (default :attr:`default_image_size`); found by one forward of a zero
        image with hooks on every module (cached per size). ``kind`` is the module's class
        name, ``size`` the map's ``(h, w)``, ``stride = S // h``.
        """
        size = self.default_image_size if image_size is None else int(image_size)
        return [
            TapInfo(path, cls, shape[0], (shape[1], shape[2]), size // shape[1])
            for path, (cls, shape, _what) in self._probe(size).items()
            if shape is not None
        ]

    def resolve_taps(self, taps: str | Sequence[str]) -> list[str]:
        """Tap names (presets expanded in place, duplicates dropped), in the order given.

        Raises:
            TapError: an unknown name (with close matches), a module whose output is not a
                map (with the shape it produced) or a module that did not run.
        """
        return self._resolve(taps, self.default_image_size)

    def _resolve(self, taps: str | Sequence[str], size: int) -> list[str]:
        names = [taps] if isinstance(taps, str) else list(taps)
        if not names:
            raise TapError("no taps given; call `source.list_taps()` to list the valid ones")
        probe = self._probe(size)
        resolved: list[str] = []
        for name in names:
            if not isinstance(name, str):
                raise TapError(f"tap names must be strings, got {name!r}")
            expanded = (
                self._presets[name] if name in self._presets and name not in probe else [name]
            )
            for tap in expanded:
                self._check_tap(tap, probe, size)
                if tap not in resolved:
                    resolved.append(tap)
        return resolved

    def _check_tap(self, tap: str, probe: _Probe, size: int) -> None:
        record = probe.get(tap)
        if record is not None and record[1] is not None:
            return
        where = f"{type(self.module).__name__} ({self.name!r})"
        if record is not None:
            raise TapError(
                f"tap {tap!r} ({record[0]}) is not a map: it produced {record[2]} for a "
                f"(1, 3, {size}, {size}) input; a tap must output {_ACCEPTED} "
                f"(prefix_tokens={self.prefix_tokens}). Call `source.list_taps()` for the "
                "modules that do."
            )
        if tap and tap in dict(self.module.named_modules()):
            raise TapError(
                f"module {tap!r} of {where} did not run in a forward of a (1, 3, {size}, "
                f"{size}) image, so it has no output to tap"
            )
        valid = [p for p, rec in probe.items() if rec[1] is not None]
        close = difflib.get_close_matches(tap, valid + list(self._presets), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        presets = f" Presets: {', '.join(self._presets)}." if self._presets else ""
        raise TapError(
            f"tap {tap!r} is not a module of {where}.{hint}{presets} Taps are module paths "
            "as `module.named_modules()` prints them; call `source.list_taps()` to list them."
        )

    # ------------------------------------------------------------------ running
    def preprocess(self, images: ImageInput, settings: Settings) -> torch.Tensor:
        """Images -> model input ``(B, 3, S, S)``, ``S = image_size(settings)``.

        Args:
            images: a PIL image or list of PIL images (any sizes, converted to RGB), a float
                tensor ``(B, 3, H, W)`` / ``(3, H, W)`` in [0, 1], or a list of ``(3, H, W)``
                float tensors. ``settings.load_size`` is not used: images are resized once,
                straight to S (bilinear, antialiased, ``align_corners=False``).
            settings: only ``image_size`` is read.

        Returns:
            ``(B, 3, S, S)`` pixels ``(x - mean) / std`` (default mean 0, std 1), on
            :attr:`device` in :attr:`dtype`.

        Raises:
            ValueError: a wrong type, shape, dtype or value range (the message says which).
        """
        size = self.image_size(settings)
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        if isinstance(images, torch.Tensor):
            parts = [self._check_tensor(images, "images")]
        else:
            seq = [images] if isinstance(images, Image.Image) else images
            if not isinstance(seq, Sequence) or isinstance(seq, str | bytes):
                raise ValueError(
                    f"images must be PIL images or float tensors in [0, 1], got "
                    f"{type(images).__name__}"
                )
            if not seq:
                raise ValueError("no images given (an empty list)")
            parts = []
            for i, img in enumerate(seq):
                if isinstance(img, Image.Image):
                    arr = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
                    parts.append(torch.from_numpy(arr).permute(2, 0, 1)[None].to(work) / 255.0)
                elif isinstance(img, torch.Tensor) and img.ndim == 3:
                    parts.append(self._check_tensor(img, f"images[{i}]"))
                else:
                    got = type(img).__name__
                    got += f" of shape {tuple(img.shape)}" if isinstance(img, torch.Tensor) else ""
                    raise ValueError(
                        f"images[{i}] is a {got}; expected a PIL image or a (3, H, W) float "
                        "tensor in [0, 1]"
                    )
        resized = []
        for part in parts:
            x = part.to(device=self.device, dtype=work).clamp(0.0, 1.0)
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(
                    x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
                )
            resized.append(x)
        x = torch.cat(resized)
        mean = torch.tensor(self.mean, device=x.device, dtype=work).view(1, 3, 1, 1)
        return ((x - mean) / mean.new_tensor(self.std).view(1, 3, 1, 1)).to(self.dtype)

    @staticmethod
    def _check_tensor(t: torch.Tensor, label: str) -> torch.Tensor:
        """A checked ``(B, 3, H, W)`` float tensor in [0, 1] from a 3- or 4-d tensor."""
        x = t[None] if t.ndim == 3 else t
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0 or min(x.shape[2:]) == 0:
            raise ValueError(
                f"{label} has shape {tuple(t.shape)}; expected (B, 3, H, W) or (3, H, W) RGB"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"{label} is a {x.dtype} tensor; expected floats in [0, 1] (e.g. "
                "`uint8_tensor.float() / 255`)"
            )
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"{label} has values in [{lo:.3g}, {hi:.3g}]; expected RGB in [0, 1] (not "
                "0..255, not already normalised: pass mean/std to ModuleSource instead)"
            )
        return x

    def run(
        self,
        images: ImageInput,
        sink: EventSink,
        settings: Settings,
        *,
        first_index: int = 0,
    ) -> None:
        """One forward; send ``sink(0, tap, map)`` for every tap of ``settings.taps``.

        Maps are detached ``(B, C, h, w)`` copies in :attr:`dtype`, sent in the order the
        modules fire. The forward stops as soon as the last tap has fired (later modules do
        not run). ``first_index`` is unused (nothing is random).

        Raises:
            SettingsError: ``num_steps != 1`` or ``steps != [0]``.
            TapError: an invalid tap, a tap whose output is not a map for this batch, or a
                tap that did not fire.
        """
        self.check_settings(settings)
        size = self.image_size(settings)
        taps = self._resolve(settings.taps, size)
        x = self.preprocess(images, settings)
        batch, modules, fired = x.shape[0], dict(self.module.named_modules()), set()

        def make(tap: str) -> Any:
            def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
                if tap in fired:
                    return
                t, shape = _inspect(output, self.prefix_tokens, batch)
                if shape is None:
                    raise TapError(
                        f"tap {tap!r} ({type(module).__name__}) produced {_what(t)} "
                        f"for a {tuple(x.shape)} input; a tap must output {_ACCEPTED} "
                        f"(prefix_tokens={self.prefix_tokens})"
                    )
                fmap = t.detach()
                if t.ndim == 3:
                    fmap = fmap[:, self.prefix_tokens :].transpose(1, 2).reshape(batch, *shape)
                if fmap.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                    fmap = fmap.clone(memory_format=torch.contiguous_format)  # in-place safe
                fired.add(tap)
                sink(0, tap, fmap)
                if len(fired) == len(taps):
                    raise _StopForward

            return hook

        handles = []
        try:
            for tap in taps:
                handles.append(modules[tap].register_forward_hook(make(tap)))
            with torch.no_grad():
                self.module(x)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [t for t in taps if t not in fired]
        if missing:
            raise TapError(
                f"taps {missing} did not fire during the forward of {self.name!r} on a "
                f"{tuple(x.shape)} input (modules not called for this input)"
            )

    def describe(self) -> dict[str, Any]:
        """Base record plus ``image_size`` (default), ``prefix_tokens``, ``mean``, ``std``."""
        return {
            **super().describe(),
            "image_size": self.default_image_size,
            "prefix_tokens": self.prefix_tokens,
            "mean": list(self.mean),
            "std": list(self.std),
        }
