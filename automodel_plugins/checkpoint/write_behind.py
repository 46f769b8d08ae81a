"""Writes done on one background thread, so that reading, dequantizing and encoding the next chunk overlap with
``pwrite`` of the last one (both release the GIL).

At most ``depth`` writes are in flight: their chunks are the only memory this adds. Every write of a save goes
through the same thread, so the writers' byte counts are only ever touched there. A failed write (a full disk)
is raised in the caller's thread by the next :meth:`WriteBehind.write` or by :meth:`WriteBehind.drain`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from automodel_plugins.checkpoint.writer import SafetensorsWriter

__all__ = ["WriteBehind"]


class WriteBehind:
    """``with WriteBehind() as writes: writes.write(writer, name, data, region) ...; writes.drain()``.

    Leaving the block waits for the writes still in flight (their errors are dropped when the block already
    failed), so nothing writes into a file after its writer is closed or its directory removed.
    """

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="automodel-plugins-write")
        self._pending: deque[Future[int]] = deque()

    def write(
        self,
        writer: SafetensorsWriter,
        name: str,
        data: memoryview | bytes,
        region: Sequence[slice] | None = None,
    ) -> None:
        """Queue :meth:`SafetensorsWriter.write`; ``data`` must not change until it is written."""
        self._pending.append(self._pool.submit(writer.write, name, data, region))
        while len(self._pending) > self.depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        """Wait for every queued write; raise the first one's error."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is None:
                self.drain()
            else:
                for future in self._pending:
                    future.exception()  # wait; the block's own error is the one that matters
                self._pending.clear()
        finally:
            self._pool.shutdown(wait=True)
