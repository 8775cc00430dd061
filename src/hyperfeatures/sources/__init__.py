"""Feature sources: every model whose activations become features, behind one interface.

- :mod:`~hyperfeatures.sources.base`: :class:`FeatureSource` (``list_taps``, ``resolve_taps``,
  ``preprocess``, ``run(images, sink, settings)`` emitting ``(step, tap, map)`` events).
- :mod:`~hyperfeatures.sources.registry`: the one registry of names and :func:`load_source`.
- :mod:`~hyperfeatures.sources.backbones`: diffusion models (:class:`Backbone`), with
  :mod:`~hyperfeatures.sources.architectures` (bundled configs, tiny random models) and
  :mod:`~hyperfeatures.sources.diffusion` (DDIM inversion / generation, :func:`run_with_taps`).
- :mod:`~hyperfeatures.sources.vit`: DINO / DINOv2 (:class:`ViTSource`).
- :mod:`~hyperfeatures.sources.module`: any torch module plus tap paths (:class:`ModuleSource`).
- :mod:`~hyperfeatures.sources.hub`: where weights are found; :class:`WeightsNotFoundError`.

Names are imported lazily, so ``import hyperfeatures.sources`` loads neither diffusers nor
transformers.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS = {
    "FeatureSource": "base",
    "ImageInput": "base",
    "resolve_device": "base",
    "resolve_dtype": "base",
    "SOURCES": "registry",
    "SourceSpec": "registry",
    "list_sources": "registry",
    "load_source": "registry",
    "source_spec": "registry",
    "WeightsNotFoundError": "hub",
    "Backbone": "backbones",
    "Conditioning": "conditioning",
    "SPEEDS": "speed",
    "Speed": "speed",
    "set_speed": "speed",
    "load_backbone": "loading",
    "run_with_taps": "diffusion",
    "ViTSource": "vit",
    "ModuleSource": "module",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(__all__)
