"""``checkpoint.write_behind.WriteBehind``: writes run on one background thread, in order, bounded, and a
failure reaches the caller; leaving the block waits for what is in flight."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from automodel_plugins.checkpoint.write_behind import WriteBehind
from automodel_plugins.checkpoint.writer import FileLayout, SafetensorsWriter, TensorSpec, tensor_bytes


class RecordingWriter:
    """Stands in for a ``SafetensorsWriter``: records each write and the thread that made it."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.delay, self.fail_on = delay, fail_on
        self.written: list[str] = []
        self.threads: set[str] = set()
        self.in_flight = 0
        self.most_in_flight = 0

    def write(self, name: str, data: bytes, region: object = None) -> int:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay)
        self.threads.add(threading.current_thread().name)
        self.in_flight -= 1
        if name == self.fail_on:
            raise OSError(28, "No space left on device")
        self.written.append(name)
        return len(data)


def test_writes_happen_in_order_on_one_background_thread() -> None:
    writer = RecordingWriter(delay=0.001)
    with WriteBehind(depth=2) as writes:
        for index in range(20):
            writes.write(writer, f"t{index}", b"x")  # type: ignore[arg-type]
        writes.drain()
    assert writer.written == [f"t{index}" for index in range(20)]
    assert len(writer.threads) == 1 and threading.current_thread().name not in writer.threads
    assert writer.most_in_flight == 1


def test_a_failed_write_is_raised_in_the_caller() -> None:
    writer = RecordingWriter(fail_on="t3")
    with pytest.raises(OSError, match="No space left"), WriteBehind(depth=1) as writes:
        for index in range(10):
            writes.write(writer, f"t{index}", b"x")  # type: ignore[arg-type]
        writes.drain()
    assert "t9" not in writer.written  # the caller stopped at the failure, one or two writes later


def test_leaving_a_failed_block_waits_for_the_writes_in_flight() -> None:
    writer = RecordingWriter(delay=0.05)
    with pytest.raises(RuntimeError, match="encoding failed"), WriteBehind(depth=4) as writes:
        for index in range(3):
            writes.write(writer, f"t{index}", b"x")  # type: ignore[arg-type]
        raise RuntimeError("encoding failed")
    assert writer.written == ["t0", "t1", "t2"] and writer.in_flight == 0


def test_a_file_written_behind_equals_save_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {f"w{i}": torch.randn(64, 48).to(torch.bfloat16) for i in range(6)}
    save_file(tensors, tmp_path / "expected.safetensors", metadata={"format": "pt"})
    specs = [TensorSpec(name, value.dtype, tuple(value.shape)) for name, value in tensors.items()]
    layout = FileLayout.plan(specs, {"format": "pt"})
    path = tmp_path / "written.safetensors"
    SafetensorsWriter.create(path, layout).close(sync=False)
    writer = SafetensorsWriter.attach(path, layout)
    with WriteBehind() as writes:
        for name, value in reversed(tensors.items()):
            for row in range(0, 64, 16):  # row chunks, each queued while the next is made
                chunk = value[row : row + 16].clone()
                writes.write(writer, name, tensor_bytes(chunk), (slice(row, row + 16), slice(0, 48)))
        writes.drain()
    writer.close(sync=False)
    assert path.read_bytes() == (tmp_path / "expected.safetensors").read_bytes()
    assert all(torch.equal(load_file(path)[name], value) for name, value in tensors.items())
    assert writer.bytes_written == sum(v.numel() * 2 for v in tensors.values())
