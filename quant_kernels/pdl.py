"""Programmatic dependent launch (PDL, Hopper and later): a kernel may start while the kernel before it on the
stream still runs, do the work that does not depend on it (load its weights), then wait for it.

At batch 1 each decode kernel is short, and without PDL the memory system idles while one kernel drains and the
next one launches and issues its first loads. Every Triton kernel of the decode step keeps one protocol:
- `allow_next_kernel()` first: the next kernel may be scheduled once all programs of this one have started;
- whatever an earlier kernel may write is read only after `wait_for_previous_kernel()`, and nothing is written
  before it; weights (never written while decoding) may be read before.
As every kernel waits before it ends, a kernel past its wait knows that every earlier kernel on the stream has
finished, not only the one just before it. Kernels launched without PDL (torch's, cuBLAS) start after the
previous kernel ends, as usual. TALIS_PDL=0 turns PDL off (for comparisons).
"""
import os

import torch
import triton
import triton.language as tl

from .autotune_cache import interpreting


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA GPU of compute capability 9 or later."""
    return (device.type == "cuda" and not interpreting() and os.environ.get("TALIS_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_args(device: torch.device) -> dict:
    """The launch keywords of a kernel that takes a `PDL: tl.constexpr` parameter and keeps the protocol."""
    on = enabled(device)
    return dict(PDL=on, launch_pdl=on)


@triton.jit
def allow_next_kernel(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
