"""Reader for the IDX format of MNIST-style datasets (gzipped or not).

Layout: two zero bytes, a type byte, a byte with the number of dimensions, one big-endian
uint32 per dimension, then the data in C order, big-endian.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Union

import numpy as np

from lit_ft.errors import UserError

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an IDX file (gzip detected from the content, not the name).

    Args:
        path: ``*-idx3-ubyte`` (images) or ``*-idx1-ubyte`` (labels) file, optionally gzipped.

    Returns:
        The array, with the file's shape and a native-endian dtype (uint8 for MNIST data).

    Raises:
        UserError: the file is not IDX, or is shorter or longer than its header says.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise _corrupt(path, f"bad gzip data ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise _corrupt(path, "not an IDX file (bad magic number)")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, "header cut short")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise _corrupt(path, f"{len(raw) - header} data bytes, header says {expected} for shape {shape}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False) if dtype.byteorder == ">" else data


def write_idx(path: Union[str, Path], array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (gzipped with ``compress``); the inverse of :func:`read_idx`."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("=").str: k for k, v in _DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    body = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body += np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    Path(path).write_bytes(gzip.compress(body, compresslevel=1) if compress else body)


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"cannot read IDX file {path}: {why}", "delete it and download or install the dataset again")
