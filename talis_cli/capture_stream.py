"""One side stream per GPU for CUDA-graph work: the eager run before a capture and the capture itself.

cuBLAS (the fp16 lm_head of every decode graph) gets a workspace per (cuBLAS handle, stream) pair from torch's
caching allocator, 32 MiB on Hopper, held until the process ends. `torch.cuda.Stream()` hands out the 32 streams
of a pool in turn, so a fresh side stream per capture ends up holding a workspace per stream it touched: 64 MiB
for the one capture of `talis bench` (its eager run's stream and torch's capture stream), up to 1 GiB for a
server that captures every batch and context bucket. Warm-up and capture on this one stream need one workspace,
allocated by the warm-up and reused by the capture (its graphs replay in order on the caller's stream, so no two
uses of it overlap).
"""
from __future__ import annotations

import torch

_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of CUDA device `device` (made on first use) for every warm-up and capture of talis' graphs."""
    device = torch.device(device)
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device=device)
    return stream
