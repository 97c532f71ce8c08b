"""The collectives of tensor parallelism: the process groups of the ranks and the all-reduce of row-parallel layers.

On GPUs the sums go through NCCL, except decode-sized messages, which take a one-shot all-reduce over peer memory
(torch's symmetric memory: each rank copies its part into a buffer every rank can read, then reads all parts and
adds them; no NVLink multicast needed). NCCL's all-reduce of a 16 KB vector costs ~24 us inside a CUDA graph, most of
it protocol; the one-shot path is one kernel. TALIS_TP_ALLREDUCE=nccl sends every message through NCCL (A/B runs;
also the fallback when symmetric memory cannot be set up). On CPUs everything goes through gloo.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

ALLREDUCE_ENV = "TALIS_TP_ALLREDUCE"  # "nccl": NCCL for every message; "auto" (default): one-shot for small ones
ONE_SHOT_MAX_BYTES = 512 * 1024  # messages up to this size take the one-shot path (decode: [rows, dim] fp16)
TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting this long for a rank that is gone fails


@dataclass
class World:
    """This process's place among the tensor-parallel ranks.

    group: the default process group (NCCL on GPUs, gloo on CPUs) the layers reduce over; control: a gloo group
    for the small host-side messages rank 0 sends the others (what to run next).
    """

    rank: int
    size: int
    device: str  # "cuda:R" or "cpu"
    group: object
    control: object

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


def init_world(rank: int, size: int, device: str, init_method: str | None = None) -> World:
    """Join the process group of `size` ranks as `rank` (init_method "tcp://ADDR:PORT", or None: torchrun's
    environment: MASTER_ADDR, MASTER_PORT). NCCL on a GPU (its communicator made now, outside any CUDA graph
    capture), gloo on the CPU; plus a gloo group for control messages."""
    on_gpu = device.startswith("cuda")
    kwargs = dict(rank=rank, world_size=size, timeout=TIMEOUT, init_method=init_method or "env://")
    if on_gpu:
        torch.cuda.set_device(torch.device(device))
        kwargs["device_id"] = torch.device(device)  # eager NCCL init: a lazy one cannot happen inside a capture
    dist.init_process_group("nccl" if on_gpu else "gloo", **kwargs)
    control = dist.new_group(backend="gloo") if on_gpu else dist.group.WORLD
    world = World(rank, size, device, dist.group.WORLD, control)
    warm = torch.ones(1, device=device)
    dist.all_reduce(warm)  # every rank is up and the communicator works
    return world


class AllReduce:
    """In-place-or-new sum over the ranks of a [..., n] tensor: `all_reduce(y) -> sum of y over the ranks`.

    Callable inside CUDA-graph capture (NCCL's all-reduce and the one-shot kernel both capture); the one-shot
    buffer is set up at the first small message, which is an eager call (fast_decode runs every step once before
    capturing it), on every rank at the same point.
    """

    def __init__(self, world: World):
        self.world = world
        self.mode = os.environ.get(ALLREDUCE_ENV, "auto").lower()
        self.one_shot: OneShot | None = None
        self.one_shot_error: str | None = None  # why the small-message path is off, for the bench report
        self.capture_error: str | None = None  # why NCCL's all-reduce did not capture, when it did not

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        nbytes = y.numel() * y.element_size()
        # the one-shot kernel reads 16-byte vectors: other sizes (never a decode row of a LLaMA) take NCCL
        if self.world.on_gpu and self.mode != "nccl" and nbytes <= ONE_SHOT_MAX_BYTES and nbytes % 16 == 0:
            one_shot = self._one_shot(y.dtype)
            if one_shot is not None:
                return one_shot(y)
        y = y.contiguous()
        dist.all_reduce(y, group=self.world.group)
        return y

    def _one_shot(self, dtype) -> "OneShot | None":
        if self.one_shot is None and self.one_shot_error is None:
            one_shot = None
            try:
                one_shot = OneShot(self.world, dtype)
            except Exception as e:  # an older torch, no peer access, no capture: NCCL for every message
                self.one_shot_error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            # every rank must take the same path: the one-shot path only where it works on all of them
            works = torch.tensor([int(one_shot is not None)])
            dist.all_reduce(works, op=dist.ReduceOp.MIN, group=self.world.control)
            if works.item():
                self.one_shot = one_shot
            elif self.one_shot_error is None:
                self.one_shot_error = "the one-shot all-reduce failed on another rank"
        if self.one_shot is not None and self.one_shot.dtype != dtype:
            return None
        return self.one_shot

    def prepare(self, dtype) -> bool:
        """On GPUs, before any CUDA graph: set up the one-shot path for `dtype` activations and say whether the
        decode step may be captured: yes with the one-shot path (decode messages are small), else only where NCCL's
        all-reduce captures on every rank (checked here). True on CPUs (no graphs there anyway). Every rank must
        call this at the same point."""
        if not self.world.on_gpu:
            return True
        if self.mode != "nccl" and self._one_shot(dtype) is not None:
            return True
        device = torch.device(self.world.device)
        y = torch.ones(8, dtype=dtype, device=device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                dist.all_reduce(y, group=self.world.group)
            captured = 1
        except Exception as e:  # noqa: BLE001
            captured, self.capture_error = 0, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        works = torch.tensor([captured])
        dist.all_reduce(works, op=dist.ReduceOp.MIN, group=self.world.control)  # replay only where all captured
        if not works.item():
            return False
        y.fill_(1)
        graph.replay()
        return bool(torch.all(y == self.world.size).item())

    @property
    def path(self) -> str:
        """Which all-reduce small messages take: "one-shot", "nccl" or "gloo"."""
        if not self.world.on_gpu:
            return "gloo"
        return "one-shot" if self.one_shot is not None else "nccl"


class OneShot:
    """torch's symmetric-memory one-shot all-reduce of messages up to ONE_SHOT_MAX_BYTES of `dtype`.

    A symmetric buffer (same size on every rank, mapped into every peer) is made and exchanged once (a collective:
    every rank constructs this at the same point). Each call: copy y into this rank's buffer, signal the peers, read
    every rank's buffer and sum them in rank order (the same sum on every rank), into a new tensor.
    """

    def __init__(self, world: World, dtype: torch.dtype):
        import torch.distributed._symmetric_memory as symm_mem

        self.dtype = dtype
        self.group_name = world.group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed before torch 2.9; a no-op (or a deprecation warning) after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(self.group_name)
        numel = ONE_SHOT_MAX_BYTES // torch.tensor([], dtype=dtype).element_size()
        self.buffer = symm_mem.empty(numel, dtype=dtype, device=torch.device(world.device))
        symm_mem.rendezvous(self.buffer, self.group_name)
        ops = torch.ops.symm_mem
        self.copy_out = getattr(ops, "one_shot_all_reduce_copy_out", None)
        self.reduce_out = ops.one_shot_all_reduce_out
        # check it eagerly and inside a CUDA graph: a path that fails here fails before any decode graph holds it
        probe = torch.full((8,), float(world.rank + 1), dtype=dtype, device=torch.device(world.device))
        want = world.size * (world.size + 1) / 2
        self._check(self(probe), want)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            total = self(probe)
        graph.replay()
        self._check(total, want)

    @staticmethod
    def _check(total: torch.Tensor, want: float) -> None:
        if not torch.all(total == want).item():
            raise RuntimeError(f"one-shot all-reduce probe gave {total[0].item()}, expected {want}")

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """y [..., n] (this rank's part) -> a new tensor of y's shape: the sum over the ranks."""
        flat = y.reshape(-1)
        view = self.buffer[: flat.numel()]
        out = torch.empty_like(flat)
        if self.copy_out is not None:
            self.copy_out(view, flat, "sum", self.group_name, out)
        else:
            view.copy_(flat)
            self.reduce_out(view, "sum", self.group_name, out)
        return out.view(y.shape)
