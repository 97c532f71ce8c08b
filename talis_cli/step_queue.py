"""Decode steps queued one ahead of the host, so the GPU never idles while a token is streamed.

A GPU step of a 7B model takes ~2 ms; reading its token on the host, waking up, streaming it and launching the
next step took another ~60 us, during which the GPU had nothing queued (H100, BENCHMARKS.md). A `QueuedStep`
launches a step and the copy of its drawn tokens into pinned host memory, and waits for nothing: the caller
queues the next step (its input is the device tensor `tokens`) before it reads this one's ids. On a CPU the
step runs while it is queued, and reading first is then no faster, so callers queue ahead on CUDA only.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch


def to_device(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 [len(values)] on `device` without waiting for the work queued there: on CUDA through pinned memory and
    an asynchronous copy (a plain host-to-device copy waits for the stream, a step queued ahead included)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def host_buffers(device: torch.device, batch: int) -> list[torch.Tensor]:
    """Two pinned int64 [batch] buffers for the token copies of a CUDA device, used in turn: while one step's ids
    wait to be read, the next step's copy goes to the other. Empty for a CPU."""
    if device.type != "cuda":
        return []
    return [torch.empty(batch, dtype=torch.long, pin_memory=True) for _ in range(2)]


class QueuedStep:
    """`run()` (queues a decode step and draw, returns the drawn tokens int64 [B] on its device) launched now.

    `tokens` are the drawn tokens on the device, for the next step's input. `ids()` waits for this step only
    and returns the tokens as a list; `seconds` (valid after `ids()`) is the step's device time: on CUDA between
    events around it, so time the GPU spent waiting for the host before the step does not count.
    `buffer`: one of `host_buffers` on CUDA (not the one a step still unread uses), None on a CPU; `device`: where
    `run` leaves the tokens.
    """

    def __init__(self, run: Callable[[], torch.Tensor], buffer: torch.Tensor | None, device: torch.device):
        self._buffer = buffer
        if buffer is None:
            began = time.perf_counter()
            self.tokens = run()
            self.seconds = time.perf_counter() - began
            return
        # both events on the stream of `device` (where the tokens are drawn, the last GPU of a split model)
        stream = torch.cuda.current_stream(device)
        self._begin, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._begin.record(stream)
        self.tokens = run()
        with torch.cuda.device(device):
            buffer.copy_(self.tokens, non_blocking=True)
        self._end.record(stream)
        self.seconds = 0.0

    def ids(self) -> list[int]:
        if self._buffer is None:
            return self.tokens.tolist()
        self._end.synchronize()  # this step's copy, not what was queued after it
        self.seconds = self._begin.elapsed_time(self._end) / 1000
        return self._buffer.tolist()


def greedy_decode(step: Callable[[torch.Tensor, int], torch.Tensor], token: torch.Tensor, positions: range,
                  device: torch.device) -> None:
    """Greedy steps at cache slots `positions` from `token` (int64 [B]), each drawn token fed back and read on the
    host once, after the next step is queued, as the Generator streams on CUDA (benchmarks time this loop).
    `step(tokens [B, 1], pos)` returns logits [B, vocab] on `device`."""
    buffers = host_buffers(device, token.shape[0])
    queued = None
    for i, pos in enumerate(positions):
        feed = token if queued is None else queued.tokens
        current = QueuedStep(lambda: step(feed[:, None], pos).argmax(-1), buffers[i % 2] if buffers else None, device)
        if queued is not None:
            queued.ids()
        queued = current
    if queued is not None:
        queued.ids()
