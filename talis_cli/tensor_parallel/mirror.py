"""Rank 0 drives, the other ranks follow: every call into the model on rank 0 is first sent to the other ranks,
which make the same call on their shards, so the collectives inside the layers meet.

Rank 0 alone tokenizes, samples and writes output; the others only ever see what the model is given: the prompt
tokens of a prefill, the token drawn last for a decode step (broadcast from rank 0, so every rank steps with the
same token), cache set-ups. A small header goes first over a gloo group (kind, rows, cache slot, padding flag);
decode tokens follow over the ranks' own group (NCCL on GPUs: the broadcast is queued on the stream, rank 0's host
never waits for it); other calls are pickled (`broadcast_object_list`).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist

from .launch import maybe_fail

STOP, DECODE, CALL = 0, 1, 2
NOT_MIRRORED = frozenset({"rotary"})  # Transformer methods that change nothing on a rank


class Channel:
    """Rank 0's messages to the others (`world`: comm.World)."""

    def __init__(self, world, children=None):
        self.world = world
        self.children = children  # launch.Children when rank 0 spawned the others
        self.busy = False  # inside a call: the ranks may be mid-collective
        self.broken = False  # a call failed or was interrupted: the ranks are out of step
        self.header = torch.zeros(4, dtype=torch.long)  # kind, rows, cache slot, has padding

    def _send_header(self, kind: int, rows: int = 0, pos: int = 0, padded: bool = False) -> None:
        self.header.copy_(torch.tensor([kind, rows, pos, int(padded)]))
        dist.broadcast(self.header, 0, group=self.world.control)

    def recv_header(self) -> tuple[int, int, int, bool]:
        dist.broadcast(self.header, 0, group=self.world.control)
        kind, rows, pos, padded = self.header.tolist()
        return kind, rows, pos, bool(padded)

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, 0, group=self.world.group)
        return t

    # rank 0
    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on rank 0; when it fails because another rank has gone, that rank's message wins
        (launch.Children reports it and ends the process)."""
        self.busy = True
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.broken = True
            if self.children is not None and isinstance(exc, Exception):
                self.children.await_failure(3.0)
            raise
        self.busy = False
        return result

    def send_decode(self, tokens: torch.Tensor, pos: int, pad_lens: torch.Tensor | None) -> None:
        """tokens int64 [B, 1] on rank 0's device; pad_lens int64 [B] or None."""
        self._send_header(DECODE, tokens.shape[0], pos, pad_lens is not None)
        self._broadcast(tokens.contiguous())
        if pad_lens is not None:
            self._broadcast(pad_lens.contiguous())

    def send_call(self, name: str, args: tuple, kwargs: dict) -> None:
        self._send_header(CALL)
        dist.broadcast_object_list([(name, _to_cpu(args), _to_cpu(kwargs))], 0, group=self.world.control)

    def send_stop(self) -> None:
        self._send_header(STOP)

    def shutdown(self, timeout: float = 10.0) -> None:
        """At rank 0's exit: when the ranks are in step, tell them to stop, wait for them, and take the process group
        down in order (NCCL warns otherwise); else leave them to be ended (launch.Children.close, or torchrun)."""
        import threading

        if self.broken or self.busy:
            return
        if self.children is not None:
            with self.children.lock:
                self.children.closing = True  # their exits from now on are expected
        stop = threading.Thread(target=self.send_stop, daemon=True)  # a rank already gone must not hold the exit
        stop.start()
        stop.join(timeout)
        if stop.is_alive() or (self.children is not None and not self.children.join(timeout)):
            return
        dist.destroy_process_group()

    # ranks > 0
    def recv_decode(self, rows: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.world.device
        tokens = self._broadcast(torch.empty(rows, 1, dtype=torch.long, device=device))
        pad_lens = self._broadcast(torch.empty(rows, dtype=torch.long, device=device)) if padded else None
        return tokens, pad_lens

    def recv_call(self) -> tuple[str, tuple, dict]:
        box = [None]
        dist.broadcast_object_list(box, 0, group=self.world.control)
        return box[0]


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu().clone()  # compact: a pickled view would carry its whole storage
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def mirrored_methods(model) -> frozenset[str]:
    """The model's own methods (those its class defines, e.g. forward, setup_cache, clear_cache) that every rank
    must call together; attributes, properties and nn.Module's methods are read from rank 0's shard alone."""
    return frozenset(name for name, value in vars(type(model)).items()
                     if inspect.isfunction(value) and not name.startswith("_") and name not in NOT_MIRRORED)


class MirroredModel:
    """Rank 0's model under tensor parallelism: the Transformer interface, each of its own methods sent to the
    other ranks before it runs here (`mirrored_methods`); anything else is rank 0's shard's."""

    def __init__(self, model, channel: Channel):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_mirrored", mirrored_methods(model))

    def _call(self, name: str, *args, **kwargs):
        self._channel.run(self._channel.send_call, name, args, kwargs)
        return self._channel.run(getattr(self._model, name), *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._call("forward", *args, **kwargs)

    def __getattr__(self, name):
        if name in self._mirrored:
            return functools.partial(self._call, name)
        return getattr(self._model, name)

    def __setattr__(self, name, value):
        setattr(self._model, name, value)

    @property
    def shard(self):
        """Rank 0's own part of the model (a talis_cli.model.Transformer)."""
        return self._model


class MirroredDecode:
    """The decode step on rank 0: (tokens int64 [B, 1], cache slot, pad_lens) sent to the other ranks, then this
    rank's step (`runner`: the CUDA-graph runner, or None: the model's plain forward) -> float32 logits [B, vocab]."""

    def __init__(self, model, runner, channel: Channel):
        self.model, self.runner, self.channel = model, runner, channel

    def __call__(self, tokens: torch.Tensor, pos: int, pad_lens: torch.Tensor | None = None) -> torch.Tensor:
        self.channel.run(self.channel.send_decode, tokens, pos, pad_lens)
        return self.channel.run(decode_step, self.model, self.runner, tokens, pos, pad_lens)


def decode_step(model, runner, tokens, pos: int, pad_lens):
    if runner is not None:
        return runner(tokens, pos, pad_lens)
    return model(tokens, start_pos=pos, pad_lens=pad_lens)[:, -1]


def serve(engine, world) -> None:
    """On a rank > 0: make rank 0's calls on this rank's shard until it says stop."""
    channel = Channel(world)
    model, runner = engine.model, engine.generator.fast_decode
    steps = 0
    with torch.inference_mode():
        while True:
            kind, rows, pos, padded = channel.recv_header()
            if kind == STOP:
                return
            if kind == DECODE:
                tokens, pad_lens = channel.recv_decode(rows, padded)
                steps += 1
                if steps == 1:
                    maybe_fail(world.rank)
                decode_step(model, runner, tokens, pos, pad_lens)
            else:
                name, args, kwargs = channel.recv_call()
                getattr(model, name)(*args, **kwargs)
