"""Dynamic batching: requests that arrive while the model is busy, or within a few milliseconds
of each other, are completed together in one batched generate.

On a CPU a decoding step of a small model costs nearly the same for 1 row as for 16 (the time
goes to per-step overhead and to reading the weights), so batching multiplies throughput.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Callable

from domaintune.serve.generation import Row, Token

END = None  # put on a job's queue after a row's last token

RunBatch = Callable[[list[Row], Callable[[int, Token], None]], None]


class Batcher:
    """Queue of rows for one model, drained by a task that runs ``run_batch(rows, on_token)`` in
    ``executor`` on up to ``max_batch`` rows, waiting at most ``max_wait_s`` for company.

    ``submit`` returns an asyncio queue that receives ``(row_index, item)`` pairs: each row's
    tokens, then ``END`` for that row, or the exception its batch raised. The rows of one call
    usually share a batch; more than ``max_batch`` of them are split across batches.
    """

    def __init__(self, run_batch: RunBatch, executor: Executor, *, max_batch: int = 16, max_wait_s: float = 0.005,
                 on_batch: Callable[[int], None] | None = None):
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._pending: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, rows: list[Row]) -> asyncio.Queue:
        """Queue ``rows``; read their tokens from the returned queue."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._pending = loop, asyncio.Queue()
            self._task = loop.create_task(self._drain())
        out: asyncio.Queue = asyncio.Queue()
        for i, row in enumerate(rows):
            self._pending.put_nowait((row, out, i))
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def stop_soon(self) -> None:
        """Stop the draining task; callable from any thread."""
        if self._task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._pending.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._pending.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._pending.get(), left))
                except TimeoutError:
                    break
            running = []
            for row, out, index in batch:
                if row.cancelled():
                    out.put_nowait((index, END))
                else:
                    running.append((row, out, index))
            if running:
                await self._run(loop, running)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Row, asyncio.Queue, int]]) -> None:
        def on_token(i: int, token: Token) -> None:
            _, out, index = batch[i]
            loop.call_soon_threadsafe(out.put_nowait, (index, token))

        if self.on_batch:
            self.on_batch(len(batch))
        try:
            await loop.run_in_executor(self.executor, self.run_batch, [row for row, _, _ in batch], on_token)
            result = END
        except Exception as exc:  # every waiting client hears of it; the batcher goes on
            result = exc
        for _, out, index in batch:
            out.put_nowait((index, result))
