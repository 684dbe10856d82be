"""A GGUF file's header read in one pass: its metadata and its tensors' descriptions, the data memory-mapped.

gguf.GGUFReader builds a numpy view for every part of every value: Gemma 3's vocabulary (262144 strings, their
scores and types) becomes about 800,000 small arrays, which takes 8 of the 10 seconds that loading the 270M takes
on a laptop core, and 600 MB while they live. This reader parses the same format (GGUF v2 and v3, little-endian;
the spec is ggml's docs/gguf.md) with `struct` over a memory map and keeps a string array as a list of bytes, so
the header of that file reads in a fraction of a second. Its surface is the part of GGUFReader's that we use:
`fields` (name -> a field with `types` and `contents()`, the `GGUF.*` pseudo-fields included) and `tensors` (name,
tensor_type, shape in GGUF order, n_elements, n_bytes, data_offset, and `data`, a read-only view of the file shaped
as GGUFReader shapes it). The type codes and block sizes come from the gguf package.

A truncated or malformed header raises ValueError (the caller turns it into one line naming the file).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUFValueType codes -> struct format of a scalar.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# Tensor types stored as plain numbers: data is a typed array of the tensor's shape. Others are bytes of blocks.
_PLAIN = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64}  # fmt: skip


@dataclass
class Field:
    """One metadata value: `types` as GGUFReader lists them ([type], or [ARRAY, element type]), the value itself."""

    name: str
    types: list
    value: Any  # a number, bytes (a string), or a list / numpy array (an array)

    def contents(self) -> Any:
        """The value as GGUFReader.contents() gives it: strings decoded, arrays as lists."""
        return _plain(self.value)

    @property
    def data(self) -> range:
        """One index per element of an array (GGUFReader's `data`), so `len(field.data)` counts them."""
        return range(len(self.value) if isinstance(self.value, list | np.ndarray) else 1)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass
class Tensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF order: ne[0] (a row's length) first
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray = field(repr=False)


class GGUFFile:
    """The header of a GGUF file and its tensors' data as views of a read-only memory map."""

    def __init__(self, path: str | Path):
        import gguf

        self.data = np.memmap(path, mode="r")  # `.filename` names the file, as GGUFReader's does
        self._buf = memoryview(self.data)
        self._types = gguf.GGUFValueType
        self._pos = 0
        if self._bytes(4) != _MAGIC:
            raise ValueError("GGUF magic invalid")
        version = self._scalar(4)
        if version not in _VERSIONS:
            if version & 0xFFFF == 0:
                raise ValueError("a big-endian GGUF file, which this reader does not read")
            raise ValueError(f"GGUF version {version}, which this reader does not read (it reads 2 and 3)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        self.fields: dict[str, Field] = {}
        U32, U64 = self._types.UINT32, self._types.UINT64
        for name, value, kind in (("GGUF.version", version, U32), ("GGUF.tensor_count", n_tensors, U64),
                                  ("GGUF.kv_count", n_kv, U64)):  # fmt: skip
            self.fields[name] = Field(name, [kind], value)
        for _ in range(n_kv):
            self._field()
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.fields.get("general.alignment")
        align = _DEFAULT_ALIGNMENT
        if alignment is not None:
            if alignment.types != [U32]:
                raise ValueError("Bad type for general.alignment field")
            align = alignment.value
            if align == 0 or align & (align - 1):
                raise ValueError("Invalid alignment: must be a non-zero power of two")
        self.data_offset = -(-self._pos // align) * align
        self.tensors: list[Tensor] = []
        names: set[str] = set()
        for info in infos:
            if info[0] in names:
                raise ValueError(f"duplicate tensor name {info[0]!r}")
            names.add(info[0])
            self.tensors.append(self._tensor(*info, gguf))

    # ---- the header, read forward ----

    def _bytes(self, n: int) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise ValueError(f"the header ends early (at byte {len(self._buf)}, reading {n} bytes at {self._pos})")
        out = bytes(self._buf[self._pos : end])
        self._pos = end
        return out

    def _scalar(self, kind: int) -> Any:
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise ValueError(f"unknown GGUF value type {kind}")
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._buf):
            raise ValueError(f"the header ends early (at byte {len(self._buf)})")
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return value

    def _string(self) -> bytes:
        return self._bytes(self._scalar(10))

    def _value(self, kind: int) -> tuple[list, Any]:
        """(types, value) of one value of type `kind` at the read position."""
        if kind == _STRING:
            return [self._types.STRING], self._string()
        if kind == _ARRAY:
            element, n = self._scalar(4), self._scalar(10)
            if element in _NUMPY:
                dtype = np.dtype(_NUMPY[element])
                size = n * dtype.itemsize
                if self._pos + size > len(self._buf):
                    raise ValueError(f"the header ends early (an array of {n} values at byte {self._pos})")
                values = np.frombuffer(self._buf, dtype, n, self._pos)
                self._pos += size
                return [self._types.ARRAY, self._types(element)], values
            if element == _STRING:
                return [self._types.ARRAY, self._types.STRING], self._strings(n)
            if element == _ARRAY:
                items = [self._value(_ARRAY) for _ in range(n)]
                inner = items[0][0] if items else [self._types.ARRAY]
                return [self._types.ARRAY, *inner], [v for _, v in items]
            raise ValueError(f"unknown GGUF value type {element}")
        return [self._types(kind)] if kind in _SCALARS else [], self._scalar(kind)

    def _strings(self, n: int) -> list[bytes]:
        buf, pos, end, out = self._buf, self._pos, len(self._buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(n):
            if pos + 8 > end:
                raise ValueError(f"the header ends early (a string array at byte {pos})")
            (length,) = unpack(buf, pos)
            pos += 8
            if pos + length > end:
                raise ValueError(f"the header ends early (a string of {length} bytes at byte {pos})")
            out.append(bytes(buf[pos : pos + length]))
            pos += length
        self._pos = pos
        return out

    def _field(self) -> None:
        name = self._string().decode("utf-8")
        kind = self._scalar(4)
        types, value = self._value(kind)
        if name in self.fields:
            raise ValueError(f"duplicate metadata key {name!r}")
        self.fields[name] = Field(name, types, value)

    def _tensor_info(self) -> tuple[str, np.ndarray, int, int]:
        name = self._string().decode("utf-8")
        n_dims = self._scalar(4)
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        dims = np.array([self._scalar(10) for _ in range(n_dims)], dtype=np.uint64)
        return name, dims, self._scalar(4), self._scalar(10)

    def _tensor(self, name: str, dims: np.ndarray, code: int, offset: int, gguf) -> Tensor:
        kind = gguf.GGMLQuantizationType(code)
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        n_elements = int(np.prod(dims, dtype=np.uint64)) if len(dims) else 1
        n_bytes = n_elements * type_size // block
        start = self.data_offset + offset
        if start + n_bytes > len(self._buf):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        shape = tuple(int(d) for d in reversed(dims.tolist()))
        raw = self.data[start : start + n_bytes]
        if kind.name in _PLAIN:
            data = raw.view(_PLAIN[kind.name]).reshape(shape)
        else:
            data = raw.reshape(gguf.quant_shape_to_byte_shape(shape, kind))
        return Tensor(name, kind, dims, n_elements, n_bytes, start, data)


__all__ = ["GGUFFile", "Field", "Tensor"]
