"""Tensor parallelism: each of N ranks (one process per GPU, or N CPU processes over gloo) holds 1/N of every
decoder layer and the ranks sum their partial outputs twice per layer.

- shard.py: which slice of each weight a rank holds (q/k/v, gate/up by output columns; o_proj, down_proj by input
  rows, then an all-reduce), the checks that a model splits N ways, GPTQ groups and act-order g_idx per slice.
- comm.py: the process groups; the all-reduce (NCCL or gloo; a one-shot symmetric-memory path for decode-sized
  messages on GPUs).
- launch.py: spawning ranks 1..N-1 (or joining torchrun's), one message and exit 1 when any rank fails, no process
  left behind.
- mirror.py: rank 0 runs the Generator as usual; each model call is first sent to the other ranks.
- bench.py: `talis bench --tensor-parallel N --shape NAME`, random weights built on each rank.

`Engine.load(LoadSettings(..., tensor_parallel=N))` (or a device map with "tensor_parallel": N) returns rank 0's
engine, whose model and decode step drive every rank.
"""
from __future__ import annotations

import dataclasses

from ..errors import UsageError

MAP_KEY = "tensor_parallel"


def requested_size(flag: int | None, raw_map: dict | None = None, source: str = "device map") -> int:
    """The number of tensor-parallel ranks: --tensor-parallel, else the device map's "tensor_parallel", else 1.
    UsageError for a value that is not a positive integer."""
    if flag is not None:
        if not isinstance(flag, int) or isinstance(flag, bool) or flag < 1:
            raise UsageError(f"--tensor-parallel {flag!r} must be a positive integer (the number of GPUs)")
        return flag
    value = (raw_map or {}).get(MAP_KEY, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{source}: \"{MAP_KEY}\" must be a positive integer (the number of GPUs), not {value!r}")
    return value


def check_settings(settings, raw_map: dict, source: str) -> None:
    """UsageError for placement settings that mean nothing when every rank holds 1/N of every layer: a map's layer
    ranges or GPU split, --max-memory."""
    placed = sorted(set(raw_map) - {MAP_KEY, "device"})
    if placed or raw_map.get("device") not in (None, "auto", "cpu", "cuda"):
        what = ", ".join(placed) or f"device {raw_map.get('device')!r}"
        raise UsageError(f"{source} places layers ({what}); with tensor parallelism every GPU holds 1/N of every "
                         f"layer: use a map of only {{\"{MAP_KEY}\": N}} (\"device\": \"cpu\" for CPU processes)")
    if settings.max_memory:
        raise UsageError("--max-memory places the layers of a split model; with --tensor-parallel every GPU holds 1/N "
                         "of every layer: drop --max-memory")


def rank_devices(size: int, raw_map: dict) -> list[str] | None:
    """Devices of ranks 0..size-1 on this host: GPUs 0..N-1, or None for CPU processes (no GPU, or the map says
    "device": "cpu"). TalisError when there are GPUs but fewer than `size`."""
    import torch

    from ..errors import TalisError

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus or raw_map.get("device") == "cpu":
        return None
    if gpus < size:
        raise TalisError(f"--tensor-parallel {size} needs {size} GPUs but this machine has {gpus}; "
                         f"use --tensor-parallel {gpus} or fewer")
    return [f"cuda:{r}" for r in range(size)]


def load_engine(engine_cls, settings, raw_map: dict, size: int, progress=None):
    """Start (or join, under torchrun) the `size` ranks, load each rank's shard, and return rank 0's engine; on a
    rank other than 0 this serves rank 0 and then ends the process."""
    import atexit

    from . import launch
    from .mirror import Channel, MirroredDecode, MirroredModel, serve

    check_settings(settings, raw_map, "the device map")
    check_split(settings, size)  # before any process starts
    torchrun = launch.from_torchrun()
    if torchrun is not None:
        rank, world_size, local = torchrun
        if world_size != size:
            raise UsageError(f"--tensor-parallel {size} but torchrun started {world_size} processes; make them equal")
        devices = rank_devices(local + 1, raw_map)
        device = devices[local] if devices else "cpu"
        init_method = None
    else:
        rank, devices = 0, rank_devices(size, raw_map)
        device = devices[0] if devices else "cpu"
        init_method = f"tcp://127.0.0.1:{launch.free_port()}"
        children = launch.Children(_spawned_rank, lambda r: (settings, r, size, init_method,
                                                            devices[r] if devices else "cpu"), size)
    try:
        engine, world = load_rank(engine_cls, settings, rank, size, device, init_method, progress)
    except BaseException:
        if torchrun is None:
            children.quiet()  # rank 0's own error is the message
        raise
    if rank != 0:  # under torchrun
        try:
            serve(engine, world)
        except BaseException as exc:  # noqa: BLE001
            import os
            import sys

            sys.stderr.write(f"error: rank {rank}: {launch.error_line(exc)}\n")
            os._exit(1)
        import torch.distributed as dist

        dist.destroy_process_group()
        raise SystemExit(0)
    channel = Channel(world, children if torchrun is None else None)
    shard_model = engine.model
    engine.model = engine.generator.model = MirroredModel(shard_model, channel)
    engine.generator.fast_decode = MirroredDecode(shard_model, engine.generator.fast_decode, channel)
    atexit.register(channel.shutdown)  # before launch.Children.close (exit handlers run last-registered first)
    return engine


def check_split(settings, size: int) -> None:
    """TalisError when the model of `settings` does not split `size` ways (shard.Shard.check), from its config and
    tensor headers alone."""
    from pathlib import Path

    from ..engine import DEFAULT_MODEL_DIR
    from ..loaders import LoadRequest, pick_loader
    from ..loaders.base import read_model_args
    from .shard import Shard

    model_dir = Path(settings.model_dir) if settings.model_dir else DEFAULT_MODEL_DIR
    request = LoadRequest(model_dir, None, Path(settings.checkpoint) if settings.checkpoint else None,
                          settings.wbits, settings.groupsize, settings.allow_pickle)
    loader = pick_loader(request, settings.loader)
    args = read_model_args(model_dir)
    Shard(0, size).with_quant(loader.quant_settings(loader.tensor_shapes())).check(args)


def load_rank(engine_cls, settings, rank: int, size: int, device: str, init_method: str | None, progress=None):
    """Join the world as `rank` and load this rank's shard: (engine, comm.World)."""
    import torch

    from ..threads import default_threads
    from .comm import AllReduce, init_world
    from .shard import Shard

    world = init_world(rank, size, device, init_method)
    threads = settings.threads
    if threads is None and device == "cpu":  # the cores are shared by the ranks
        threads = max(1, default_threads() // size)
    all_reduce = AllReduce(world)
    graphs = all_reduce.prepare(torch.float16)  # GPU models compute in fp16
    shard = Shard(rank, size, device, all_reduce=all_reduce, graphs=graphs)
    engine = engine_cls.load(dataclasses.replace(settings, shard=shard, tensor_parallel=None, threads=threads),
                             progress if rank == 0 else None)
    engine.tensor_parallel = size
    return engine, world


def _spawned_rank(settings, rank: int, size: int, init_method: str, device: str, pipe) -> None:
    """A child process's life: rank `rank` loads its shard and serves rank 0 (launch.child_main)."""
    from . import launch

    def body():
        from ..engine import Engine
        from .mirror import serve

        engine, world = load_rank(Engine, settings, rank, size, device, init_method)
        serve(engine, world)
        import torch.distributed as dist

        dist.destroy_process_group()

    launch.child_main(body, pipe)
