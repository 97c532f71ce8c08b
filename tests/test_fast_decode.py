"""Fusion of q/k/v and gate/up, and the fast decode step, against the plain model.

On CPU the decode step runs eagerly with its Triton ops under TRITON_INTERPRET=1; the tests marked gpu replay it
as CUDA graphs and compare greedy tokens with the plain path.
"""
import pytest
import torch

from quant_kernels import gptq_format
from quant_kernels.fuse import fuse_linears, fuse_model
from quant_kernels.quant_linear import QuantLinear
from talis_cli.config import ModelArgs
from talis_cli.fast_decode import CudaGraphDecoder, buckets, segments
from talis_cli.model import Transformer

from tests.tiny_models import tiny_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_quant(in_features, out_features, bits, group_size, g_idx, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = g_idx.max().item() + 1
    q = torch.randint(0, 2**bits, (in_features, out_features), generator=gen)
    zeros = torch.randint(0, 2**bits - 1, (groups, out_features), generator=gen)
    scales = (torch.rand(groups, out_features, generator=gen) * 0.02 + 0.002).half()
    return QuantLinear.from_quantized(gptq_format.pack_rows(q, bits), gptq_format.pack_cols(zeros, bits), scales,
                                      g_idx, bits, group_size)


@pytest.mark.parametrize("bits,outs", [(4, (64, 32, 32)), (4, (36, 20, 12)), (3, (40, 24, 24)), (8, (16, 48))])
@pytest.mark.parametrize("act_order", [False, True])
def test_fused_quant_layer_equals_concatenated_parts(bits, outs, act_order):
    in_features, group_size = 128, 32
    g_idx = gptq_format.default_g_idx(in_features, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(1))]
    parts = [random_quant(in_features, n, bits, group_size, g_idx, seed=i) for i, n in enumerate(outs)]
    fused = fuse_linears(parts)
    assert isinstance(fused, QuantLinear) and fused.out_features == sum(outs)
    expected_weight = torch.cat([p.dequantized_weight() for p in parts])
    assert torch.equal(fused.dequantized_weight(), expected_weight)  # bit-exact: same codes, zeros, scales
    x = torch.randn(3, in_features).half()
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=2e-3, atol=2e-3)


def test_layers_that_disagree_are_not_fused():
    g_idx = gptq_format.default_g_idx(64, 32)
    a, b = random_quant(64, 32, 4, 32, g_idx, 0), random_quant(64, 32, 4, 32, g_idx.flip(0), 1)
    assert fuse_linears([a, b]) is None  # different act-order
    assert fuse_linears([a, random_quant(64, 32, 8, 32, g_idx, 2)]) is None  # different bits
    assert fuse_linears([a, torch.nn.Linear(64, 32)]) is None


def test_layers_that_handed_their_weights_to_the_backend_are_not_fused():
    """The engine fuses before it picks the backend, and accelerate() fuses again: act-order parts left unfused
    the first time (each its own permutation) hold no GPTQ tensors by then, g_idx included, so they must not pass
    as alike (their empty g_idx are equal) and be unpacked."""
    g_idx = gptq_format.default_g_idx(64, 32)
    a, b = random_quant(64, 32, 4, 32, g_idx, 0), random_quant(64, 32, 4, 32, g_idx.flip(0), 1)
    for layer in (a, b):
        layer.set_backend("triton", keep_source=False)
    assert a.source_released and b.source_released and torch.equal(a.g_idx, b.g_idx)
    assert fuse_linears([a, b]) is None


def test_the_cuda_graph_step_takes_heads_the_attention_kernel_serves():
    """Heads of a power of two of at least 16 features (the kernel's tl.dot tiles); others stay on the plain
    path rather than failing to compile on the GPU."""
    from talis_cli.fast_decode import attention_kernel_takes

    assert [attention_kernel_takes(d) for d in (8, 16, 24, 64, 80, 96, 128, 256)] == [
        False, True, False, True, False, False, True, True]


def tiny_model(seed=0, dtype=torch.float32, device="cpu", **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_hf_config(tiny_config(**overrides))).to(device, dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fused_model_logits_match(kv_heads):
    model = tiny_model(num_key_value_heads=kv_heads)
    tokens = torch.randint(0, 4096, (2, 9))
    with torch.no_grad():
        before = model(tokens)
        assert fuse_model(model) == 2 * model.args.n_layers
        after = model(tokens)
    assert model.model.layers[0].self_attn.q_proj is None and model.model.layers[0].mlp.gate_up_proj is not None
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_heads,fused", [(4, True), (2, False)])
def test_decode_step_matches_plain_forward(kv_heads, fused):
    model = tiny_model(seed=kv_heads, device=DEVICE, num_key_value_heads=kv_heads)
    if fused:
        fuse_model(model)
    assert_decode_step_matches_plain_forward(model)


@pytest.mark.parametrize("bounds", [[1], [1, 2]])
def test_decode_steps_chained_over_layer_ranges_match_plain_forward(bounds):
    """What a model split over GPUs runs (one step per device, the hidden state and residual stream handed on):
    here cut at `bounds` on one device."""
    model = tiny_model(seed=3, device=DEVICE, num_key_value_heads=2, num_hidden_layers=3)
    fuse_model(model)
    steps = segments(model, 2, bounds)
    assert [s.layers for s in steps] == [range(a, b) for a, b in zip([0, *bounds], [*bounds, 3])]
    assert [s.first for s in steps] == [True] + [False] * len(bounds) and steps[-1].last and not steps[0].last
    assert_decode_step_matches_plain_forward(model, bounds=bounds)


def test_decode_step_of_act_order_triton_model_matches_plain_forward():
    """The embedded model (GPTQ act-order) on the Triton backend: norms and SiLU write the GEMVs' input already
    in their act-order row order (triton_backend.input_gather)."""
    from quant_kernels.triton_backend import input_gather
    from talis_cli.engine import Engine, LoadSettings

    model = Engine.load(LoadSettings(device_map="cpu", backend="torch")).model.to(DEVICE, torch.float16)
    fuse_model(model)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.set_backend("triton")
    assert all(input_gather(layer.mlp.down_proj) is not None for layer in model.model.layers)
    # fp16: the two paths round differently (one ulp of a logit is ~0.008; cached k/v of deep layers differed by
    # 0.0034 for one prompt in eight on an H100); a wrong row order is off by O(1)
    assert_decode_step_matches_plain_forward(model, steps=1, tolerance=0.05)


def assert_decode_step_matches_plain_forward(model, steps: int = 3, tolerance: float = 1e-4,
                                             bounds: list[int] | None = None, capacity: int = 64):
    """Prefill two left-padded rows, then decode steps with the Triton step (chained over the layer ranges cut at
    `bounds`, attention over `capacity` slots) vs the eager model on a copy."""
    prompts = torch.randint(0, 4096, (2, 6), device=DEVICE)
    pad_lens = torch.tensor([0, 2], device=DEVICE)
    model.setup_cache(2, 64)
    chain = segments(model, 2, bounds or [])
    with torch.no_grad():
        model(prompts, start_pos=0, pad_lens=pad_lens)
        reference_caches = [(layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone())
                            for layer in model.model.layers]
        token = torch.randint(0, 4096, (2, 1), device=DEVICE)
        for pos in range(6, 6 + steps):
            chain[0].tokens.copy_(token[:, 0])
            fast = None
            for step in chain:
                step.slot.fill_(pos)
                step.pad_lens.copy_(pad_lens)
                if fast is not None:
                    step.feed(fast)
                fast = step.run(capacity=capacity)
            fast_caches = [(layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone())
                           for layer in model.model.layers]
            for layer, (k, v) in zip(model.model.layers, reference_caches):  # replay the same step on the plain path
                layer.self_attn.kv_cache.k.copy_(k)
                layer.self_attn.kv_cache.v.copy_(v)
            plain = model(token, start_pos=pos, pad_lens=pad_lens)[:, -1]
            torch.testing.assert_close(fast, plain, rtol=tolerance, atol=tolerance)
            for layer, (k, v) in zip(model.model.layers, fast_caches):
                cache_tolerance = tolerance / 10  # the cache holds values before the last layers amplify them
                torch.testing.assert_close(k, layer.self_attn.kv_cache.k, rtol=cache_tolerance, atol=cache_tolerance)
                torch.testing.assert_close(v, layer.self_attn.kv_cache.v, rtol=cache_tolerance, atol=cache_tolerance)
            reference_caches = fast_caches
            token = plain.argmax(-1, keepdim=True)


def test_buckets_cover_the_cache():
    assert buckets(2048) == [128, 256, 512, 1024, 2048]
    assert buckets(300) == [128, 256, 300] and buckets(100) == [100]


# --- GPU: CUDA graphs against the plain path ------------------------------------------------------------------
def greedy(model, prompt: torch.Tensor, n: int, runner=None) -> list[int]:
    """n greedy tokens after `prompt` [1, T] (plain forward, or the runner for every decode step); keeps a cache
    that is large enough (and the graphs captured on it)."""
    if not model.has_cache or model.max_seq_len < prompt.shape[1] + n:
        model.setup_cache(1, prompt.shape[1] + n)
    with torch.inference_mode():
        token = model(prompt, last_only=True)[:, -1].argmax(-1, keepdim=True)
        out = [token.item()]
        for pos in range(prompt.shape[1], prompt.shape[1] + n - 1):
            logits = runner(token, pos) if runner else model(token, start_pos=pos)[:, -1]
            token = logits.argmax(-1, keepdim=True)
            out.append(token.item())
    return out


@gpu
@needs_cuda
def test_cuda_graph_greedy_tokens_match_tiny_model():
    model = tiny_model(dtype=torch.float16, device="cuda", num_key_value_heads=2, max_position_embeddings=512)
    fuse_model(model)
    prompt = torch.randint(0, 4096, (1, 100), device="cuda")  # crosses the 128-slot bucket while decoding
    plain = greedy(model, prompt, 64)
    assert greedy(model, prompt, 64, CudaGraphDecoder(model)) == plain


@gpu
@needs_cuda
def test_cuda_graph_greedy_tokens_match_embedded_model():
    from talis_cli.engine import DEFAULT_MODEL_DIR, Engine, LoadSettings

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded model is not built yet")
    engine = Engine.load(LoadSettings(device_map="auto", max_seq_len=256))
    prompt = torch.tensor([engine.encode("In the beginning God created")], device="cuda")
    runner = engine.generator.fast_decode  # the first bucket was captured at load (the others lazily)
    assert runner is not None and runner.captured == 1
    assert greedy(engine.model, prompt, 64, runner) == greedy(engine.model, prompt, 64)
    assert runner.captured == 1  # the cache was kept, nothing recaptured; slots up to 70 stay in bucket 128


@gpu
@needs_cuda
def test_a_batch_after_a_single_prompt_captures_again():
    """A batch needs a larger KV cache than the single prompt before it, so the graphs are captured again, into
    new memory pools (capturing into the released pool of the old graphs failed an allocator assert). The new
    graph's step equals the plain forward's for every row of the left-padded batch."""
    from talis_cli.engine import DEFAULT_MODEL_DIR, Engine, LoadSettings
    from talis_cli.generation import GenerationConfig

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded model is not built yet")
    engine = Engine.load(LoadSettings(device_map="auto", max_seq_len=256))
    runner, model = engine.generator.fast_decode, engine.model
    prompts = [engine.encode(text) for text in ("In the beginning", "And it came to pass that", "Blessed")]
    assert len(list(engine.generator.stream(prompts[0], GenerationConfig(max_new_tokens=8, temperature=0)))) == 8
    engine.generator._ensure_cache(len(prompts))  # what stream_batch does first: a new cache, graphs dropped
    T = max(map(len, prompts))
    tokens = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device="cuda")
    pad_lens = torch.tensor([T - len(p) for p in prompts], device="cuda")
    with torch.inference_mode():
        nxt = model(tokens, start_pos=0, pad_lens=pad_lens, last_only=True)[:, -1].argmax(-1, keepdim=True)
        caches = [(layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone())
                  for layer in model.model.layers]
        fast = runner(nxt, T, pad_lens).clone()
        for layer, (k, v) in zip(model.model.layers, caches):
            layer.self_attn.kv_cache.k.copy_(k)
            layer.self_attn.kv_cache.v.copy_(v)
        plain = model(nxt, start_pos=T, pad_lens=pad_lens)[:, -1]
    torch.testing.assert_close(fast, plain, rtol=0.05, atol=0.05)  # fp16: the paths round differently


@gpu
@needs_cuda
def test_cuda_graph_greedy_tokens_match_random_7b():
    from talis_cli import bench

    args = bench.shape_args("7B", 256)
    model = bench.random_model(args, "gptq", 4, 128, act_order=True, device="cuda")
    prompt = torch.randint(0, args.vocab_size, (1, 32), device="cuda")
    plain = greedy(model, prompt, 64)
    assert greedy(model, prompt, 64, CudaGraphDecoder(model)) == plain
    del model
    torch.cuda.empty_cache()


# --- rows at their own positions (continuous batching) ----------------------------------------------------------
ROW_MODELS = {
    "gqa": dict(num_key_value_heads=2),
    "window": dict(model_type="mistral", num_key_value_heads=2, sliding_window=8),
    "dynamic_ntk": dict(num_key_value_heads=1, max_position_embeddings=16,
                        rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "chained": dict(num_key_value_heads=2, num_hidden_layers=3),  # cut after layer 1, as over two GPUs
}


@pytest.mark.parametrize("name", ROW_MODELS)
def test_per_row_decode_step_matches_decode_rows(name):
    """Three requests at different lengths in cache rows 2, 0, 1, plus a spare lane on the spare row 3: the
    Triton step's logits and cache writes equal the eager Transformer.decode_rows for every real row."""
    model = tiny_model(seed=5, device=DEVICE, **ROW_MODELS[name])
    fuse_model(model)
    model.setup_cache(4, 64)
    gen = torch.Generator().manual_seed(2)
    lengths, rows = [3, 20, 1], [2, 0, 1]
    with torch.inference_mode():
        for n, row in zip(lengths, rows):
            model(torch.randint(0, 4096, (1, n), generator=gen).to(DEVICE), cache_row=row)
        chain = segments(model, 4, [1] if name == "chained" else None, per_row=True)
        assert all(step.per_row and step.inputs.shape == (3, 4) for step in chain)
        for i in range(2):
            tokens = torch.randint(0, 4096, (3,), generator=gen)
            slots = torch.tensor(lengths) + i
            before = [(layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone())
                      for layer in model.model.layers]
            fast = None
            for step in chain:  # each device's step gets the inputs; the hidden state is handed on
                step.inputs.copy_(torch.stack([torch.cat([tokens, torch.zeros(1, dtype=torch.long)]),
                                               torch.cat([slots, torch.zeros(1, dtype=torch.long)]),
                                               torch.tensor(rows + [3])]))
                if fast is not None:
                    step.feed(fast)
                fast = step.run(capacity=64)
            fast = fast[:3].clone()
            after = [(layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone())
                     for layer in model.model.layers]
            for layer, (k, v) in zip(model.model.layers, before):
                layer.self_attn.kv_cache.k.copy_(k)
                layer.self_attn.kv_cache.v.copy_(v)
            plain = model.decode_rows(tokens.to(DEVICE), slots.to(DEVICE), torch.tensor(rows, device=DEVICE))
            torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
            for layer, (k, v) in zip(model.model.layers, after):  # the real rows hold what the eager step wrote
                torch.testing.assert_close(k[:3], layer.self_attn.kv_cache.k[:3], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(v[:3], layer.self_attn.kv_cache.v[:3], rtol=1e-5, atol=1e-5)
                layer.self_attn.kv_cache.k.copy_(k)
                layer.self_attn.kv_cache.v.copy_(v)


def staggered_greedy(model, prompts: list[torch.Tensor], joins: list[int], n: int, step,
                     forced: list[list[int]] | None = None, logits: list[list[torch.Tensor]] | None = None
                     ) -> list[list[int]]:
    """Greedy tokens of requests that join at steps `joins`, each in cache row i, decoded together by
    `step(tokens, slots, rows)` (CPU int64 [B] each -> logits [B, vocab]). With `forced`, row i is fed forced[i]
    instead of its own choices (teacher forcing) and those are returned; `logits` (a list per row) collects each
    step's fp32 logits on the CPU."""
    out = [[] for _ in prompts]

    def take(i: int, row_logits: torch.Tensor) -> None:
        if logits is not None:
            logits[i].append(row_logits.float().cpu())
        out[i].append(forced[i][len(out[i])] if forced else int(row_logits.argmax()))

    with torch.inference_mode():
        for t in range(max(joins) + n):
            for i, (p, j) in enumerate(zip(prompts, joins)):
                if j == t:
                    take(i, model(p[None], cache_row=i, last_only=True)[0, -1])
            live = [i for i in range(len(prompts)) if joins[i] < t and len(out[i]) < n]
            if live:
                step_logits = step(torch.tensor([out[i][-1] for i in live]),
                                   torch.tensor([len(prompts[i]) + len(out[i]) - 1 for i in live]), torch.tensor(live))
                for b, i in enumerate(live):
                    take(i, step_logits[b])
    return out


@gpu
@needs_cuda
def test_cuda_graph_rows_at_their_own_positions_match_eager_random_7b():
    """7B shape: rows at different lengths in batch buckets 1, 2 and 4 (with a spare lane), on both sides of the
    128-slot context bucket: the graphs' logits equal the eager decode_rows' (fp16: the paths round differently)."""
    from talis_cli import bench

    args = bench.shape_args("7B", 256)
    model = bench.random_model(args, "gptq", 4, 128, act_order=True, device="cuda")
    fuse_model(model)
    model.setup_cache(4, 256)
    runner = CudaGraphDecoder(model)
    lengths = [100, 7, 140]
    with torch.inference_mode():
        for row, n in enumerate(lengths):
            model(torch.randint(0, args.vocab_size, (1, n), device="cuda"), cache_row=row)
        for count in (1, 2, 3):
            tokens = torch.randint(0, args.vocab_size, (count,))
            slots, rows = torch.tensor(lengths[:count]), torch.arange(count)
            caches = [(layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone())
                      for layer in model.model.layers]
            fast = runner.decode_rows(tokens, slots, rows).clone()
            for layer, (k, v) in zip(model.model.layers, caches):
                layer.self_attn.kv_cache.k.copy_(k)
                layer.self_attn.kv_cache.v.copy_(v)
            plain = model.decode_rows(tokens, slots, rows)
            torch.testing.assert_close(fast, plain, rtol=0.05, atol=0.05)
            lengths = [n + (i < count) for i, n in enumerate(lengths)]  # the rows that ran hold one more token
    assert {key[0] for key in runner._graphs} == {("rows", 1), ("rows", 2), ("rows", 4)}
    del model, runner, caches
    torch.cuda.empty_cache()


@gpu
@needs_cuda
def test_cuda_graph_rows_joining_late_give_eager_greedy_tokens_embedded_model():
    """Rows joining a running batch (graphs of 1, 2 and 4 rows, across the 128-slot context bucket): fed the eager
    path's greedy tokens, the graphs' logits stay within fp16 rounding of the eager ones at every step, and pick the
    same token wherever the eager top two are further apart than that (the paths round differently, so an exact
    near-tie may flip, and one flip would change every later token of a free-running comparison)."""
    from talis_cli.engine import DEFAULT_MODEL_DIR, Engine, LoadSettings

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded model is not built yet")
    engine = Engine.load(LoadSettings(device_map="auto", max_seq_len=256))
    model, runner = engine.model, engine.generator.fast_decode
    model.setup_cache(4, 256)
    prompts = [torch.tensor(engine.encode(t), device="cuda")
               for t in ("In the beginning God created", "And it came to pass", "Blessed are the")]
    joins = [0, 5, 9]
    eager_logits, fast_logits = [[] for _ in prompts], [[] for _ in prompts]
    tokens = staggered_greedy(model, prompts, joins, 100, model.decode_rows, logits=eager_logits)
    staggered_greedy(model, prompts, joins, 100, runner.decode_rows, forced=tokens, logits=fast_logits)
    for row, (eager_row, fast_row) in enumerate(zip(eager_logits, fast_logits)):
        for index, (eager, fast) in enumerate(zip(eager_row, fast_row)):
            tolerance = 0.02 * eager.abs().max().item()
            drift = (eager - fast).abs().max().item()
            assert drift < tolerance, f"row {row} token {index}: logits differ by {drift} (tolerance {tolerance})"
            top2 = eager.topk(2).values
            if top2[0] - top2[1] > 2 * tolerance:
                assert int(fast.argmax()) == tokens[row][index], f"row {row} token {index}"


@gpu
@needs_cuda
def test_scheduler_on_cuda_graphs_gives_each_request_its_text_alone():
    """The embedded model on the GPU: requests joining the scheduler's batch get the greedy text they get alone
    from the Generator (its single-row CUDA-graph step), the per-row graphs captured up front."""
    from talis_cli.engine import DEFAULT_MODEL_DIR, Engine, LoadSettings
    from talis_cli.generation import GenerationConfig
    from talis_cli.scheduler import Scheduler

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded model is not built yet")
    engine = Engine.load(LoadSettings(device_map="auto", max_seq_len=256))
    cfg = GenerationConfig(temperature=0, max_new_tokens=40)
    texts = ["In the beginning God created", "And it came to pass", "Blessed are", "The LORD is my shepherd"]
    prompts = [engine.encode(t) for t in texts]
    alone = ["".join(e.text for e in engine.generator.stream(p, cfg)) for p in prompts]
    scheduler = Scheduler(engine.generator, max_batch=4)
    scheduler.start()  # captures the per-row graphs before serving
    requests = []
    for p in prompts:
        requests.append(scheduler.submit(p, cfg))
    got = ["".join(e.text for e in r.events(timeout=120)) for r in requests]
    scheduler.stop(5)
    assert got == alone
    assert any(key[0] == ("rows", 4) for key in engine.generator.fast_decode._graphs)


@gpu
@needs_cuda
def test_every_capture_warms_up_and_captures_on_the_devices_one_stream(monkeypatch):
    """Nine graphs (batch buckets 1, 2, 4 x three context buckets) are warmed up and captured on one stream, so
    cuBLAS (the lm_head) holds one workspace for all of them: memory allocated grows by less than one workspace
    (32 MiB on Hopper, 8 MiB before) over the captures after the first, where a fresh stream per capture added one
    workspace each."""
    from talis_cli.capture_stream import capture_stream

    model = tiny_model(dtype=torch.float16, device="cuda", num_key_value_heads=2, max_position_embeddings=512)
    fuse_model(model)
    model.setup_cache(5, 512)
    streams = []
    real_graph = torch.cuda.graph
    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **kw: streams.append(kw.get("stream")) or real_graph(*a, **kw))
    runner = CudaGraphDecoder(model)
    with torch.inference_mode():
        runner.decode_rows(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                           torch.full((1,), 4, dtype=torch.long))
        torch.cuda.synchronize()
        first = torch.cuda.memory_allocated()
        runner.capture_rows(4)
        torch.cuda.synchronize()
    graphs = [s for s in streams if s is not None]  # the tuner's own timing graphs pass no stream
    assert runner.captured == 9 and len(graphs) == 9
    assert all(s == capture_stream(torch.device("cuda", 0)) for s in graphs)
    assert torch.cuda.memory_allocated() - first < 4 * 2**20
