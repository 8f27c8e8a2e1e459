"""What travels between a front end and the device owner.

Control messages are small pickled tuples, framed by a 4-byte length on a
Unix-domain socket. Arrays never go through pickle: `pack` writes each numpy
array of a message into a shared-memory arena (an mmap'd file under /dev/shm)
and pickles only its place in it (`persistent_id`); `unpack` reads it back from
there. Each front end has one arena file with two halves: the front end writes
its requests' inputs into the first, the owner its answers into the second.

An arena block is freed by its writer once the reader is done with it: a
request's inputs when its answer (or its refusal) comes back, an answer's arrays
when the front end has copied them out (it says so with a `free` message).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import io
import mmap
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HEADER = struct.Struct("<I")
# Each half of a front end's arena, at least (sparse: only pages written take memory).
ARENA_MIN_BYTES = 256 * 2**20
ALIGN = 64
# Arrays smaller than this go inline in the pickle: a copy costs less than a block.
INLINE_BYTES = 512


class ArenaFull(Exception):
    """A message larger than its whole half of the arena."""


class Allocator:
    """First-fit allocation of aligned blocks in [0, size), with coalescing frees."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = [0]  # free blocks, sorted by start
        self._sizes: dict[int, int] = {0: size}
        self._used: dict[int, int] = {}
        self._freed = asyncio.Event()

    @property
    def used(self) -> int:
        return sum(self._used.values())

    def alloc(self, nbytes: int) -> int | None:
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for k, start in enumerate(self._starts):
            size = self._sizes[start]
            if size >= need:
                del self._sizes[start]
                if size > need:
                    self._starts[k] = start + need
                    self._sizes[start + need] = size - need
                else:
                    del self._starts[k]
                self._used[start] = need
                return start
        return None

    def free(self, start: int) -> None:
        size = self._used.pop(start)
        k = bisect.bisect_left(self._starts, start)
        # Merged with the free block after it, then with the one before it.
        if k < len(self._starts) and self._starts[k] == start + size:
            size += self._sizes.pop(self._starts.pop(k))
        if k > 0 and self._starts[k - 1] + self._sizes[self._starts[k - 1]] == start:
            self._sizes[self._starts[k - 1]] += size
        else:
            self._starts.insert(k, start)
            self._sizes[start] = size
        self._freed.set()

    async def wait_freed(self) -> None:
        self._freed.clear()
        await self._freed.wait()


class Arena:
    """One front end's shared-memory file, mapped: halves `0` (front end → owner) and
    `1` (owner → front end) of `half` bytes each.
    """

    def __init__(self, path: Path, half: int, create: bool) -> None:
        self.path = path
        self.half = half
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, 2 * half)  # sparse: pages exist once written
            self._map = mmap.mmap(fd, 2 * half)
        finally:
            os.close(fd)
        self.buffer = memoryview(self._map)

    def view(self, side: int, offset: int, nbytes: int) -> memoryview:
        start = side * self.half + offset
        return self.buffer[start : start + nbytes]

    def close(self) -> None:
        # An array that still refers to it keeps it mapped until that array goes.
        with contextlib.suppress(BufferError):
            self.buffer.release()
            self._map.close()


def _inline(array: np.ndarray) -> bool:
    return array.nbytes < INLINE_BYTES or array.dtype.hasobject or array.dtype.kind == "V"


class _Packer(pickle.Pickler):
    def __init__(
        self, file: io.BytesIO, arena: Arena, side: int, allocator: Allocator, blocks: list[int]
    ) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.arena, self.side, self.allocator, self.blocks = arena, side, allocator, blocks

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not np.ndarray or _inline(obj):
            return None
        offset = self.allocator.alloc(obj.nbytes)
        if offset is None:
            raise _NoRoom(obj.nbytes)
        self.blocks.append(offset)
        target = np.ndarray(
            obj.shape, obj.dtype, buffer=self.arena.view(self.side, offset, obj.nbytes)
        )
        np.copyto(target, obj, casting="no")
        return (offset, obj.dtype.str, obj.shape)


class _NoRoom(Exception):
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def _array_bytes(obj: Any) -> int:
    """Bytes of the arrays a message would write to the arena (an upper bound)."""
    if isinstance(obj, np.ndarray):
        return 0 if _inline(obj) else obj.nbytes + ALIGN
    if isinstance(obj, dict):
        return sum(_array_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_array_bytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_array_bytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


async def pack(
    message: Any, arena: Arena, side: int, allocator: Allocator
) -> tuple[bytes, list[int]]:
    """The framed message, its arrays written into `side` of the arena; and the
    blocks they took (freed by the caller once the reader is done). Waits for room
    while other messages hold the arena; ArenaFull when the whole half is too small.
    """
    if _array_bytes(message) > allocator.size:
        raise ArenaFull(f"{_array_bytes(message)} bytes of tensors")
    while True:
        blocks: list[int] = []
        file = io.BytesIO()
        file.write(b"\0" * HEADER.size)
        try:
            _Packer(file, arena, side, allocator, blocks).dump(message)
        except _NoRoom:
            for block in blocks:
                allocator.free(block)
            await allocator.wait_freed()
            continue
        data = file.getbuffer()
        HEADER.pack_into(data, 0, len(data) - HEADER.size)
        return bytes(data), blocks


def frame(message: Any) -> bytes:
    """A message without arrays (or with only small ones), framed."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class _Unpacker(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arena: Arena, side: int, copy: bool) -> None:
        super().__init__(file)
        self.arena, self.side, self.copy = arena, side, copy
        self.blocks: list[int] = []

    def persistent_load(self, pid: Any) -> Any:
        offset, dtype, shape = pid
        dt = np.dtype(dtype)
        nbytes = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        self.blocks.append(offset)
        array = np.ndarray(shape, dt, buffer=self.arena.view(self.side, offset, nbytes))
        return array.copy() if self.copy else array


def unpack(data: bytes, arena: Arena, side: int, copy: bool) -> tuple[Any, list[int]]:
    """A message read back, its arrays from `side` of the arena (copies with `copy`,
    else views that stay valid until their blocks are freed); and those blocks.
    """
    unpacker = _Unpacker(io.BytesIO(data), arena, side, copy)
    return unpacker.load(), unpacker.blocks


async def read_message(reader: asyncio.StreamReader) -> bytes | None:
    """The next framed message's payload; None at the end of the stream."""
    try:
        header = await reader.readexactly(HEADER.size)
        (length,) = HEADER.unpack(header)
        return await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def loads(data: bytes) -> Any:
    return pickle.loads(data)


Send = Callable[[bytes], None]
