"""Feature files and the training feature cache.

- :mod:`~hyperfeatures.cache.files`: the on-disk format of extracted maps, one safetensors
  file per image (:func:`feature_key`, :func:`parse_feature_key`, :func:`write_feature_file`,
  :func:`read_feature_file`);
- :mod:`~hyperfeatures.cache.store`: :class:`FeatureCache`, the training cache of a frozen
  source's maps (layout, build, lookup), with :class:`CacheMissError`, :func:`cache_record`,
  :func:`cache_key`, :data:`STORAGE_DTYPE` and :class:`ExtractorLike`.

Every name is importable from :mod:`hyperfeatures.cache` itself.
"""

from __future__ import annotations

from .files import feature_key, parse_feature_key, read_feature_file, write_feature_file
from .store import (
    STORAGE_DTYPE,
    CacheMissError,
    ExtractorLike,
    FeatureCache,
    cache_key,
    cache_record,
)

__all__ = [
    "STORAGE_DTYPE",
    "CacheMissError",
    "ExtractorLike",
    "FeatureCache",
    "cache_key",
    "cache_record",
    "feature_key",
    "parse_feature_key",
    "read_feature_file",
    "write_feature_file",
]
