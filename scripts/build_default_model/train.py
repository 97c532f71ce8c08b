"""Train the default model: a small LLaMA on the KJV training split, from scratch.

Architecture (DEFAULT_ARCH): hidden 256, intermediate 768, 8 layers, 8 query heads and 4 KV heads
(head_dim 32), vocab 4096, untied embeddings, rope_theta 10000, context 512; 8.4 M parameters.

Data: each chapter (chapters are separated by a blank line) is one document, <s> text </s>;
the documents are concatenated and training windows of SEQ_LEN + 1 tokens are drawn at random
offsets. Validation is the held-out text cut the same way into non-overlapping windows.

Recipe (defaults below): dropout 0.1 on the embeddings and on each attention and MLP output
before it joins the residual stream (1 M training tokens overfit an 8 M model within a few
epochs without it), AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear
warm-up then cosine decay to 10% of the peak rate, gradient clipping at 1.0, bf16 autocast on a
CUDA GPU, seed 1234. Each length in --steps is one run from the same seed; validation loss is
measured every --eval-every steps and the weights at the best validation loss over all runs are
saved in fp16 (safetensors) with the tokenizer files beside them; the folder is rewritten after
each run that beats the earlier ones, so a cut-off job still leaves the best finished run.

Run on a GPU (about a minute per 1000 steps on an H100):
    PYTHONPATH=. python3 scripts/build_default_model/train.py --out OUT_DIR
"""

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

DEFAULT_ARCH = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
SEQ_LEN = 512  # the full context, so every rotary position the config promises is trained
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def encode_documents(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """int64 [n_tokens]: every chapter as <s> ids </s>, concatenated."""
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    chapters = [c for c in text.split("\n\n") if c.strip()]
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(chapters, add_special_tokens=False):
        ids += [bos, *encoding.ids, eos]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """int64 [batch, SEQ_LEN + 1] windows at random offsets, on the stream's device."""
    starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (batch, 1), generator=gen)
    return stream[starts.to(stream.device) + torch.arange(SEQ_LEN + 1, device=stream.device)]


def consecutive_windows(stream: torch.Tensor) -> torch.Tensor:
    """int64 [n, SEQ_LEN + 1]: non-overlapping windows sharing one boundary token."""
    n = (len(stream) - 1) // SEQ_LEN
    return torch.stack([stream[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1] for i in range(n)])


def lm_loss(model: LlamaForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over windows [B, SEQ_LEN + 1]."""
    logits = model(input_ids=windows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )


@torch.no_grad()
def validation_loss(model: LlamaForCausalLM, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        with torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=windows.is_cuda):
            total += lm_loss(model, chunk).item() * len(chunk)
    model.train()
    return total / len(windows)


def add_residual_dropout(model: LlamaForCausalLM, p: float) -> None:
    """Dropout (training mode only) on the embeddings and on every branch added to the residual."""
    def drop(module, inputs, output):
        return torch.nn.functional.dropout(output, p, module.training)

    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(drop)
        layer.mlp.down_proj.register_forward_hook(drop)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_one(args, train: torch.Tensor, valid: torch.Tensor, steps: int):
    """One run of `steps` steps; returns (best validation loss, fp32 state dict at that point)."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**DEFAULT_ARCH)).to(args.device)
    add_residual_dropout(model, args.dropout)
    model.train()
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    best = (float("inf"), None)
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args.lr, args.warmup)
        windows = random_windows(train, args.batch, gen)
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.device.type == "cuda"):
            loss = lm_loss(model, windows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            val = validation_loss(model, valid, args.batch)
            if val < best[0]:
                best = (val, copy.deepcopy(model.state_dict()))
            print(f"steps {steps} | step {step + 1:5d} | train {loss.item():.4f} | val {val:.4f} "
                  f"(ppl {math.exp(val):.2f}) | {time.time() - started:.0f}s", flush=True)
    return best


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-text", type=Path, default=root / "scripts/build_default_model/build/train.txt")
    parser.add_argument("--valid-text", type=Path, default=root / "tests/data/kjv/heldout.txt")
    parser.add_argument("--tokenizer", type=Path, default=root / "tests/data/kjv/fp16")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[600, 800, 1000], help="one run per length")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    train = encode_documents(tokenizer, args.train_text.read_text(encoding="utf-8")).to(args.device)
    valid = consecutive_windows(encode_documents(tokenizer, args.valid_text.read_text(encoding="utf-8")))
    valid = valid.to(args.device)
    print(f"train {len(train)} tokens, validation {valid.numel()} tokens, device {args.device}", flush=True)

    best_val = float("inf")
    for steps in args.steps:
        val, state = train_one(args, train, valid, steps)
        if val < best_val:
            best_val = val
            save(args, state, {"best_run_steps": steps, "best_val_loss": val, **vars(args)})
            print(f"saved the {steps}-step run: val loss {val:.4f} (ppl {math.exp(val):.2f})", flush=True)


def save(args, state: dict, summary: dict) -> None:
    """fp16 safetensors + config + the tokenizer files + a summary of the run, into args.out."""
    model = LlamaForCausalLM(LlamaConfig(**DEFAULT_ARCH))
    model.load_state_dict(state)
    model.to(torch.float16).save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        shutil.copy(args.tokenizer / name, args.out / name)
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
