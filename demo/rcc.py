"""A reader for Qt binary resource bundles (``.rcc``), enough to list and extract their files.

Layout (Qt's rcc.cpp / qresource.cpp), all integers big-endian:
    header   b"qres", u32 version (1-3), u32 tree offset, u32 data offset, u32 names offset,
             u32 flags (version >= 3 only)
    tree     nodes of 14 bytes (version 1) or 22 bytes (version >= 2, an u64 modification time appended):
             u32 name offset, u16 flags, then
               directory (flags & 2): u32 child count, u32 index of the first child node
               file:                  u16 country, u16 language, u32 data offset
    names    u16 length (UTF-16 code units), u32 hash, the name in UTF-16BE
    data     u32 length, the bytes; with flags & 1 they are qCompress'ed: u32 uncompressed size + zlib
Node 0 is the root directory. Zstandard-compressed entries (flags & 4) are reported, not decoded.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterator

MAGIC = b"qres"
HEADER = struct.Struct(">4sIIII")  # magic, version, tree, data, names
FLAG_ZLIB, FLAG_DIRECTORY, FLAG_ZSTD = 1, 2, 4
NODE_SIZE_V1 = 14
NODE_SIZE_V2 = 22  # + u64 last-modified (milliseconds since the epoch)
NODE_HEAD = struct.Struct(">IH")  # name offset, flags
DIR_TAIL = struct.Struct(">II")  # child count, first child index
FILE_TAIL = struct.Struct(">HHI")  # country, language, data offset


class RccError(ValueError):
    """Not a Qt resource bundle, or a damaged one."""


class RccBundle:
    """The files in one ``.rcc`` bundle: ``names()`` lists their paths, ``read(path)`` returns bytes."""

    def __init__(self, blob: bytes, label: str = "<rcc>"):
        if len(blob) < HEADER.size or blob[:4] != MAGIC:
            raise RccError(f"{label}: not a Qt resource bundle (no 'qres' magic)")
        _, self.version, self._tree, self._data, self._names = HEADER.unpack_from(blob)
        if self.version not in (1, 2, 3):
            raise RccError(f"{label}: unsupported rcc format version {self.version}")
        self._blob, self._label = blob, label
        self._node_size = NODE_SIZE_V1 if self.version == 1 else NODE_SIZE_V2
        self._files = dict(self._walk(0, ""))

    @classmethod
    def open(cls, path: str | Path) -> "RccBundle":
        return cls(Path(path).read_bytes(), str(path))

    def names(self) -> list[str]:
        return sorted(self._files)

    def read(self, name: str) -> bytes:
        if name not in self._files:
            raise KeyError(f"{self._label}: no file {name!r}")
        flags, offset = self._files[name]
        (length,) = struct.unpack_from(">I", self._blob, self._data + offset)
        start = self._data + offset + 4
        payload = self._blob[start:start + length]
        if len(payload) != length:
            raise RccError(f"{self._label}: {name} is cut short")
        if flags & FLAG_ZSTD:
            raise RccError(f"{self._label}: {name} is zstd-compressed, which this reader does not decode")
        if flags & FLAG_ZLIB:
            (size,) = struct.unpack_from(">I", payload)
            data = zlib.decompress(payload[4:])
            if len(data) != size:
                raise RccError(f"{self._label}: {name} decompresses to {len(data)} bytes, not {size}")
            return data
        return payload

    def _node(self, index: int) -> tuple[str, int, int, int]:
        """(name, flags, a, b): a, b = child count and first child, or 0 and the data offset of a file."""
        at = self._tree + index * self._node_size
        if at + self._node_size > len(self._blob):
            raise RccError(f"{self._label}: tree node {index} lies past the end of the file")
        name_offset, flags = NODE_HEAD.unpack_from(self._blob, at)
        if flags & FLAG_DIRECTORY:
            a, b = DIR_TAIL.unpack_from(self._blob, at + NODE_HEAD.size)
        else:
            _, _, b = FILE_TAIL.unpack_from(self._blob, at + NODE_HEAD.size)
            a = 0
        return self._name(name_offset) if index else "", flags, a, b

    def _name(self, offset: int) -> str:
        (length,) = struct.unpack_from(">H", self._blob, self._names + offset)
        start = self._names + offset + 2 + 4  # skip the length and the hash
        return self._blob[start:start + 2 * length].decode("utf-16-be")

    def _walk(self, index: int, prefix: str) -> Iterator[tuple[str, tuple[int, int]]]:
        name, flags, a, b = self._node(index)
        path = f"{prefix}/{name}" if prefix else name
        if flags & FLAG_DIRECTORY:
            for child in range(b, b + a):
                yield from self._walk(child, path)
        else:
            yield path, (flags, b)
