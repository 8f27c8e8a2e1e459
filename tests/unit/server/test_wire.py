"""What travels between a front end and the device owner (`procs.wire`): arrays go
through the shared-memory arena, never through pickle, and come back equal; the
arena's blocks are reused once freed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from salience_server.explain.options import ExplainOptions
from salience_server.procs import wire

HALF = 1 << 20


def test_arrays_travel_through_the_arena_not_the_pickle(tmp_path: Path) -> None:
    writer = wire.Arena(tmp_path / "arena", HALF, create=True)
    reader = wire.Arena(tmp_path / "arena", HALF, create=False)
    allocator = wire.Allocator(HALF)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = np.arange(1000, dtype=np.int64)[::2]  # not contiguous
    small = np.float32([1.5])
    message = ("explain", 7, "m", 0, {"x": image, "ids": ids, "s": small}, ExplainOptions(), None)
    data, blocks = asyncio.run(wire.pack(message, writer, 0, allocator))
    # The pickle holds the arrays' places, not their bytes.
    assert len(data) < 1024 < image.nbytes
    assert len(blocks) == 2  # the small one travels inline
    got, read_blocks = wire.unpack(data[wire.HEADER.size :], reader, 0, copy=True)
    assert sorted(read_blocks) == sorted(blocks)
    assert got[:4] == ("explain", 7, "m", 0)
    assert got[5] == ExplainOptions()
    assert got[6] is None
    for name, array in {"x": image, "ids": ids, "s": small}.items():
        np.testing.assert_array_equal(got[4][name], array)
        assert got[4][name].dtype == array.dtype
    # Views (the owner's reading) see the same bytes without a copy.
    viewed, _ = wire.unpack(data[wire.HEADER.size :], reader, 0, copy=False)
    assert not viewed[4]["x"].flags.owndata
    np.testing.assert_array_equal(viewed[4]["x"], image)
    del viewed
    writer.close()
    reader.close()


def test_freed_blocks_are_merged_and_reused() -> None:
    allocator = wire.Allocator(1024)
    a, b, c = (allocator.alloc(256) for _ in range(3))
    assert (a, b, c) == (0, 256, 512)
    assert allocator.alloc(512) is None  # 256 left
    allocator.free(b)
    allocator.free(a)
    assert allocator.alloc(512) == 0  # a and b merged
    allocator.free(c)
    allocator.free(0)
    assert allocator.used == 0
    assert allocator.alloc(1024) == 0


def test_a_message_larger_than_the_arena_is_refused(tmp_path: Path) -> None:
    arena = wire.Arena(tmp_path / "arena", HALF, create=True)
    big = np.zeros(HALF, np.uint8)
    with pytest.raises(wire.ArenaFull):
        asyncio.run(wire.pack(("ok", 1, 1, [big, big]), arena, 1, wire.Allocator(HALF)))
    arena.close()


def test_a_full_arena_waits_for_a_free(tmp_path: Path) -> None:
    arena = wire.Arena(tmp_path / "arena", HALF, create=True)

    async def scenario() -> list[int]:
        allocator = wire.Allocator(HALF)
        first = np.ones(HALF // 2 + 64, np.uint8)
        _, held = await wire.pack(("a", first), arena, 0, allocator)
        waiting = asyncio.create_task(wire.pack(("b", first), arena, 0, allocator))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # no room until the first is freed
        for block in held:
            allocator.free(block)
        _, blocks = await asyncio.wait_for(waiting, 10)
        return blocks

    assert asyncio.run(scenario()) == [0]
    arena.close()
