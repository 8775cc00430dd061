"""Process tuning used by the command line."""

from __future__ import annotations

import ctypes.util

import pytest

from hyperfeatures.runtime import tune_glibc_malloc


def test_opt_out(monkeypatch):
    monkeypatch.setenv("HYPERFEATURES_DEFAULT_MALLOC", "1")
    assert tune_glibc_malloc() is False


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library found")
def test_tuning_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("HYPERFEATURES_DEFAULT_MALLOC", raising=False)
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert tune_glibc_malloc() is True
