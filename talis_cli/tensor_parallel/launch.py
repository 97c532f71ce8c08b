"""Starting the tensor-parallel ranks, and ending them all together.

talis starts the ranks itself: the process the user started is rank 0 (it alone reads the terminal and writes
output) and ranks 1..N-1 are spawned children (torch.multiprocessing, "spawn"). Under torchrun (RANK, WORLD_SIZE,
MASTER_ADDR set) every process is already a rank and nothing is spawned.

Ending: a child that fails sends its one-line message up its pipe and exits 1; a watchdog thread in rank 0 sees the
child end, prints that line once (``error: rank R: ...``), ends the other children and exits rank 0 with 1. When
rank 0 ends, for any reason (an error, Ctrl-C: exit 130, a normal exit), its exit handler ends the children; a child
whose parent vanished without that (SIGKILL) sees its pipe from the parent close and exits. Children ignore SIGINT:
Ctrl-C on a terminal reaches the whole process group, and rank 0 alone decides.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
import time
import traceback

FAIL_ENV = "TALIS_TP_FAIL"  # "R": rank R (R > 0) raises at its first decode step; tests of the failure path
DEBUG_ENV = "TALIS_TP_DEBUG"  # "1": children keep their stdout/stderr (tracebacks included)


def from_torchrun() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from a torchrun environment, None outside one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return rank, size, int(os.environ.get("LOCAL_RANK", rank))
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(exc: BaseException) -> str:
    """One line for an exception on a rank: a TalisError's own message, else its type and first line."""
    from ..errors import TalisError

    if isinstance(exc, TalisError):
        return str(exc)
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    if type(exc).__name__ == "OutOfMemoryError":
        return f"out of GPU memory: {text}; lower --max-seq-len or use more GPUs"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Children:
    """Ranks 1..N-1 spawned by rank 0, watched: the first to fail ends everything with its message."""

    def __init__(self, target, args_of_rank, size: int):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.closing = False
        self.lock = threading.Lock()
        self.procs, self.pipes = [], []
        for rank in range(1, size):
            # both ways: the child's error line to rank 0; EOF to the child when rank 0 is gone, whatever the cause
            ours, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=target, args=(*args_of_rank(rank), theirs), daemon=True,
                               name=f"talis-rank-{rank}")
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.pipes.append(ours)
        atexit.register(self.close)
        threading.Thread(target=self._watch, name="talis-tp-watchdog", daemon=True).start()

    def _watch(self) -> None:
        from multiprocessing.connection import wait

        pending = list(range(len(self.procs)))
        while pending:
            ended = wait([self.procs[i].sentinel for i in pending])
            for i in [i for i in pending if self.procs[i].sentinel in ended]:
                pending.remove(i)
                self.procs[i].join()
                if self.procs[i].exitcode == 0:
                    continue  # a rank that finished its work (a bench) or was told to stop
                with self.lock:
                    if self.closing:
                        return
                    self._fail(i)

    def _fail(self, index: int) -> None:
        """Child `index` ended on its own: report its line once and end every rank (called holding the lock)."""
        proc, pipe = self.procs[index], self.pipes[index]
        line = None
        try:
            if pipe.poll(1.0):
                line = pipe.recv()
        except (EOFError, OSError):
            pass
        if line is None:
            line = f"the process ended unexpectedly (exit code {proc.exitcode})"
        self.closing = True
        try:  # what rank 0 already generated reaches the pipe before the hard exit
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        sys.stderr.write(f"error: rank {index + 1}: {line}\n")
        sys.stderr.flush()
        self._end_all()
        os._exit(1)

    def await_failure(self, timeout: float = 10.0) -> None:
        """Rank 0's collective failed: if a child is ending, give the watchdog time to report it and end the process
        (it does not return then); return when every child stays alive for `timeout` seconds."""
        from multiprocessing.connection import wait

        if wait([p.sentinel for p in self.procs], timeout):
            time.sleep(timeout)  # the watchdog holds the report and exits the process

    def quiet(self) -> None:
        """Rank 0 is failing itself: no child's message after its own."""
        with self.lock:
            self.closing = True

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds in all for every child to end; whether they all did."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        return not any(proc.is_alive() for proc in self.procs)

    def close(self) -> None:
        """End every child (rank 0 is exiting)."""
        with self.lock:
            self.closing = True
        self._end_all()

    def _end_all(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def child_main(body, pipe) -> None:
    """Run `body()` as a spawned rank: quiet, deaf to SIGINT, gone with its parent; an exception becomes one line
    sent on `pipe` (to rank 0) and exit code 1."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get(DEBUG_ENV) != "1":
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)

    def watch_parent():
        try:
            while True:
                pipe.recv()  # rank 0 sends nothing: this returns only with EOF, when it is gone
        except (EOFError, OSError):
            os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    try:
        body()
    except BaseException as exc:  # noqa: BLE001  (every failure becomes the one line rank 0 prints)
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
        try:
            pipe.send(error_line(exc))
        except OSError:
            pass
        os._exit(1)
    os._exit(0)


def maybe_fail(rank: int) -> None:
    """The failure a test injects on rank `rank` (TALIS_TP_FAIL=R)."""
    from ..errors import TalisError

    if rank and os.environ.get(FAIL_ENV) == str(rank):
        raise TalisError(f"injected failure ({FAIL_ENV}={rank})")
