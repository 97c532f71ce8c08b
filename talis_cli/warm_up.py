"""Compile, tune and capture ahead of need what prefills and decode steps will run, so no reply waits for it.

On a GPU the first use of a prompt length's kernel tile compiles (and, without a tuned table, times) Triton
kernels, and a prefill or decode bucket's first uses run eagerly and then capture a CUDA graph: a chat reply that
happened to be the first of its length waited up to seconds for its first token. `warm_prefill` does that work
up front (the server's Scheduler.warm_up calls it at start); `BackgroundWarmUp` does it for `talis chat` on a
thread while the user types the first message. Both write only throwaway keys and values into a cache row no
request holds yet. On a CPU (no fast prefill, no graphs) there is nothing to do.
"""

from __future__ import annotations

import sys
import threading
import time

# Prompt lengths warmed: for each tile height of the quantized product (triton_backend.quantized_product: the GEMV
# up to 2 rows, tiles of 16, 32, 64 and 128 rows, then dequantize + cuBLAS) a length that is a multiple of 16 and
# one that is not, as Triton compiles a kernel apart for each.
WARM_PREFILL_LENGTHS = (2, 3, 16, 17, 32, 33, 64, 65, 128, 129)


def warm_prefill(generator, row: int, most: int, packed_row: int | None = None) -> None:
    """Through `generator`'s fast prefill (GPUs): capture in cache row `row` the CUDA graph (where it replays
    graphs) of each bucket a forward of at most `most` tokens reaches, then prefill into `row` a prompt of each
    WARM_PREFILL_LENGTHS length within the context and one continuing a cached prefix; with `packed_row`, also
    two prompts in one forward (rows `row` and `packed_row`), as the scheduler packs newcomers. Every cache row
    written holds throwaway keys and values afterwards. Nothing without a fast prefill (a CPU)."""
    runner = getattr(generator, "prefill", None)
    if runner is None:  # no fast prefill (a CPU): plain torch, nothing compiles or tunes on first use
        return
    import torch

    from .fast_prefill import buckets_up_to  # imports Triton, which a CPU-only install may lack

    capture = getattr(runner, "capture", None)
    for bucket in buckets_up_to(most) if capture is not None else ():
        capture(bucket, row)
    model = generator.model
    device = model.model.embed_tokens.weight.device
    vocab = model.args.vocab_size
    lengths = [n for n in WARM_PREFILL_LENGTHS if n < generator.max_seq_len]
    for n in lengths:
        runner(torch.tensor([[t % vocab for t in range(1, n + 1)]], device=device), start_pos=0, last_only=True,
               cache_row=row)
    if lengths and lengths[0] + 2 <= generator.max_seq_len:  # a prompt continuing what the row holds
        runner(torch.tensor([[1, 2]], device=device), start_pos=lengths[0], last_only=True, cache_row=row)
    packed = getattr(runner, "prefill_segments", None)
    if packed_row is not None and packed is not None and len(lengths) > 1:
        packed([(list(range(1, lengths[1] + 1)), 0, row), ([1, 2], 0, packed_row)])


class BackgroundWarmUp:
    """Warm a Generator of one row (talis chat) on a thread: its prefill buckets and lengths (`warm_prefill`, into
    row 0, which holds nothing yet) and its CUDA-graph decode step at every context bucket. `wait()` before the
    generator's first use: the model is the thread's until then. A failure (an out-of-memory, say) ends the
    warm-up with one line on stderr; what it did not reach compiles and captures on first use, as without it.
    """

    def __init__(self, generator):
        self.generator = generator
        self.seconds = 0.0  # how long the warm-up ran
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def needed(self) -> bool:
        """Whether there is anything to warm: a fast prefill or a CUDA-graph decode step (a GPU)."""
        gen = self.generator
        return getattr(gen, "prefill", None) is not None or gen.fast_decode is not None

    def start(self) -> "BackgroundWarmUp":
        if self.needed and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="talis-warm-up", daemon=True)
            self._thread.start()
        return self

    def wait(self) -> float:
        """Block until the warm-up is over; the seconds waited (0.0 once it is)."""
        if self._thread is None:
            return 0.0
        began = time.perf_counter()
        self._thread.join()
        self._thread = None
        return time.perf_counter() - began

    def _run(self) -> None:
        import torch

        began = time.perf_counter()
        gen = self.generator
        try:
            with torch.inference_mode():
                gen._ensure_cache(1)
                warm_prefill(gen, 0, min(gen.max_seq_len, 512))
                capture = getattr(gen.fast_decode, "capture_first", None)
                if capture is not None:
                    capture(1, every=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # its work is done when wait() returns
        except Exception as exc:  # the lazy path still works: say so in one line
            self.error = f"{type(exc).__name__}: {exc}"
            print(f"talis: the warm-up stopped ({self.error}); kernels compile and graphs are captured on first "
                  "use instead", file=sys.stderr)
        finally:
            gen._in_cache = None  # row 0 holds throwaway keys and values now
            self.seconds = time.perf_counter() - began
