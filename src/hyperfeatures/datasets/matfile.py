"""A minimal MATLAB v5 / v7 MAT-file reader (numeric arrays only; no SciPy needed).

Used for the PF-PASCAL annotations (``Annotations/<class>/<image>.mat``). Every problem with a
file (wrong format, truncation, corruption, a compressed element inflating beyond
:data:`MAX_MAT_ELEMENT_BYTES`) is one :class:`~hyperfeatures.datasets.fields.AnnotationError`
naming the file.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .fields import AnnotationError

__all__ = ["MAX_MAT_ELEMENT_BYTES", "read_mat_arrays"]

#: Largest decompressed size of one compressed MAT-file element (annotation files are a few
#: kilobytes; this stops a small forged file from inflating to gigabytes).
MAX_MAT_ELEMENT_BYTES = 64 << 20

_MI_DTYPES = {
    1: "i1",
    2: "u1",
    3: "i2",
    4: "u2",
    5: "i4",
    6: "u4",
    7: "f4",
    9: "f8",
    12: "i8",
    13: "u8",
}
_MI_MATRIX = 14
_MI_COMPRESSED = 15
#: mxClassID -> numpy dtype for the numeric classes (double, single, int8 ... uint64).
_MX_DTYPES = {
    6: "f8",
    7: "f4",
    8: "i1",
    9: "u1",
    10: "i2",
    11: "u2",
    12: "i4",
    13: "u4",
    14: "i8",
    15: "u8",
}
_FLAG_COMPLEX = 1 << 11
_FLAG_LOGICAL = 1 << 9


def _element(buf: bytes, pos: int, endian: str, path: Path) -> tuple[int, bytes, int]:
    """One data element at ``pos``: ``(type, payload, position of the next element)``."""
    if pos + 8 > len(buf):
        raise AnnotationError(f"{path}: truncated MAT-file (element header at byte {pos}).")
    (word,) = struct.unpack_from(endian + "I", buf, pos)
    if word >> 16:  # small data element: type and size share the first 4 bytes
        size = word >> 16
        if size > 4:
            raise AnnotationError(f"{path}: corrupt MAT-file (small element of {size} bytes).")
        return word & 0xFFFF, buf[pos + 4 : pos + 4 + size], pos + 8
    mtype, size = struct.unpack_from(endian + "II", buf, pos)
    start, end = pos + 8, pos + 8 + size
    if end > len(buf):
        raise AnnotationError(f"{path}: truncated MAT-file (element of {size} bytes at {pos}).")
    following = end if mtype == _MI_COMPRESSED else start + (size + 7) // 8 * 8
    return mtype, buf[start:end], following


def _numbers(mtype: int, payload: bytes, endian: str, path: Path, name: str) -> np.ndarray:
    if mtype not in _MI_DTYPES:
        raise AnnotationError(f"{path}: variable {name!r} stores data of unknown type {mtype}.")
    dtype = np.dtype(_MI_DTYPES[mtype]).newbyteorder(endian)
    if len(payload) % dtype.itemsize:
        raise AnnotationError(f"{path}: variable {name!r} has a partial value ({len(payload)} B).")
    return np.frombuffer(payload, dtype=dtype)


def _matrix(payload: bytes, endian: str, path: Path) -> tuple[str, np.ndarray | None]:
    mtype, flags_raw, pos = _element(payload, 0, endian, path)
    if len(flags_raw) < 4:
        raise AnnotationError(f"{path}: corrupt MAT-file (array flags).")
    (flags,) = struct.unpack_from(endian + "I", flags_raw, 0)
    mx_class = flags & 0xFF
    _, dims_raw, pos = _element(payload, pos, endian, path)
    dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=np.dtype("i4").newbyteorder(endian)))
    _, name_raw, pos = _element(payload, pos, endian, path)
    name = name_raw.decode("latin-1")
    if mx_class not in _MX_DTYPES:
        return name, None  # cell, struct, char, sparse, object: not needed here
    mtype, real_raw, pos = _element(payload, pos, endian, path)
    values = _numbers(mtype, real_raw, endian, path, name).astype(_MX_DTYPES[mx_class])
    if flags & _FLAG_COMPLEX:
        mtype, imag_raw, pos = _element(payload, pos, endian, path)
        values = values + 1j * _numbers(mtype, imag_raw, endian, path, name)
    if flags & _FLAG_LOGICAL:
        values = values.astype(bool)
    if values.size != math.prod(dims):
        raise AnnotationError(
            f"{path}: variable {name!r} holds {values.size} values for dimensions {dims}."
        )
    return name, values.reshape(dims, order="F")


def _inflate(payload: bytes, path: Path) -> bytes:
    """Decompress one element, refusing more than :data:`MAX_MAT_ELEMENT_BYTES`."""
    inflater = zlib.decompressobj()
    try:
        inner = inflater.decompress(payload, MAX_MAT_ELEMENT_BYTES)
    except zlib.error as exc:
        raise AnnotationError(f"{path}: corrupt compressed MAT-file element ({exc}).") from exc
    if inflater.unconsumed_tail:
        raise AnnotationError(
            f"{path}: a compressed MAT-file element inflates to more than "
            f"{MAX_MAT_ELEMENT_BYTES >> 20} MiB; not an annotation file (corrupt or forged)."
        )
    return inner


def read_mat_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read the numeric variables of a MATLAB v5 / v7 MAT-file (compressed or not).

    Only top-level numeric (and logical) arrays are returned; cells, structs, strings and
    sparse matrices are skipped. MAT v7.3 files (HDF5) are not supported.

    Returns:
        ``{variable name: array}`` with MATLAB's shape (2-D at least) and element type.

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationError: not a v5 MAT-file, or a corrupt one (names the file).
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 128:
        raise AnnotationError(f"{path}: too short for a MAT-file ({len(data)} bytes).")
    if data[126:128] == b"IM":
        endian = "<"
    elif data[126:128] == b"MI":
        endian = ">"
    else:
        raise AnnotationError(f"{path}: not a MATLAB v5 MAT-file (no endian mark at byte 126).")
    (version,) = struct.unpack_from(endian + "H", data, 124)
    if version != 0x0100:
        raise AnnotationError(
            f"{path}: MAT-file version 0x{version:04x} is not supported (v7.3/HDF5?); "
            "re-save it in MATLAB with save(..., '-v7')."
        )
    arrays: dict[str, np.ndarray] = {}
    pos = 128
    try:
        while pos + 8 <= len(data):
            mtype, payload, pos = _element(data, pos, endian, path)
            if mtype == _MI_COMPRESSED:
                mtype, payload, _ = _element(_inflate(payload, path), 0, endian, path)
            if mtype != _MI_MATRIX:
                continue
            name, array = _matrix(payload, endian, path)
            if array is not None:
                arrays[name] = array
    except AnnotationError:
        raise
    except (ValueError, TypeError, IndexError, OverflowError, MemoryError, struct.error) as exc:
        raise AnnotationError(f"{path}: corrupt MAT-file ({type(exc).__name__}: {exc}).") from exc
    return arrays
