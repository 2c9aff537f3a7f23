"""Train the small GPT-2 embedded in reslens (not part of the importable package).

A ``GPT2LMHeadModel`` from a ``GPT2Config``, trained on ``../shared/corpus`` with the three
validation books held out whole; the real GPT-2 tokenizer from ``build_tokenizer.py``.
Fixed seed (the batch of step ``s`` depends only on ``(seed, s)``), cosine learning rate
with warmup, train/validation loss on stdout and in ``<run-dir>/log.jsonl``, checkpoints
that ``--resume`` continues, and an optional copy curriculum: a fraction of the training
sequences hold a span (random common tokens, or corpus text) written twice, so the model
has a reason to grow induction heads. On CUDA the body runs under bf16 autocast; logits
and loss are always float32.

    python scripts/train_embedded.py --preset cpu --run-dir runs/cpu --export
    python scripts/train_embedded.py --preset gpu --run-dir runs/gpu --compile --export
    python scripts/train_embedded.py --run-dir runs/gpu --resume --export   # continue / export

``--export`` writes ``config.json``, fp16 ``model.safetensors`` (checked ≤ 40 MB) and the
tokenizer into ``src/reslens/data/embedded/`` (or ``--export-dir``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from embedded_data import EMBEDDED_DIR, EOS_ID, REPO, common_tokens, default_corpus, load_token_arrays

MAX_EXPORT_BYTES = 40_000_000

PRESETS: dict[str, dict] = {
    # 8 x 256 is the widest/deepest GPT-2 whose fp16 weights (tied 50,257-token embedding) stay
    # under 40 MB: ~19.3M parameters, ~38.6 MB.
    "gpu": dict(n_layer=8, n_embd=256, n_head=8, ctx=512, batch_size=64, steps=6000, lr=1e-3,
                warmup=200, dropout=0.1, copy_frac=0.25, copy_span=50, eval_every=500,
                ckpt_every=1000, log_every=50, val_batches=16),
    # A stand-in that trains in ~20 minutes on one CPU thread (~1.2 s per step there).
    "cpu": dict(n_layer=4, n_embd=128, n_head=4, ctx=128, batch_size=8, steps=1000, lr=2e-3,
                warmup=50, dropout=0.0, copy_frac=0.25, copy_span=30, eval_every=200,
                ckpt_every=200, log_every=25, val_batches=4),
}


@dataclass
class CopyCurriculum:
    """Settings for training sequences that contain a span written twice."""

    frac: float  # fraction of the batch's sequences that hold a repeated span
    span: int  # longest span; lengths are uniform in [min(8, span), span]
    common: np.ndarray  # [k] token ids to draw random spans from
    text_frac: float  # fraction of the repeated spans taken from corpus text instead


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--run-dir", type=Path, default=None, help="default runs/<preset>")
    parser.add_argument("--corpus", type=Path, default=default_corpus())
    parser.add_argument("--tokenizer-dir", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "cache")
    for name, kind in [("n_layer", int), ("n_embd", int), ("n_head", int), ("ctx", int),
                       ("batch_size", int), ("steps", int), ("lr", float), ("warmup", int),
                       ("dropout", float), ("copy_frac", float), ("copy_span", int),
                       ("eval_every", int), ("ckpt_every", int), ("log_every", int),
                       ("val_batches", int)]:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"overrides the preset ({name})")
    parser.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr / peak lr")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--copy-vocab", type=int, default=2000, help="random spans use the k most common tokens")
    parser.add_argument("--copy-text-frac", type=float, default=0.5, help="share of spans taken from corpus text")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer body")
    parser.add_argument("--no-autocast", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 for float32 matmuls on CUDA (faster unembedding, 10-bit mantissa inputs)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (with a checkpoint) after this much training time; resume later")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop at this step (the schedule still spans --steps) and count it as finished")
    parser.add_argument("--resume", action="store_true", help="continue from <run-dir>/ckpt.pt")
    parser.add_argument("--export", action="store_true", help="export when training has finished")
    parser.add_argument("--export-dir", type=Path, default=EMBEDDED_DIR)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if 2 * args.copy_span > args.ctx:
        parser.error(f"--copy-span {args.copy_span} is too long for --ctx {args.ctx}: two copies must fit")
    if args.run_dir is None:
        args.run_dir = REPO / "runs" / args.preset
    return args


def make_config(args: argparse.Namespace) -> GPT2Config:
    """The GPT-2 configuration of the model to train."""
    return GPT2Config(
        vocab_size=50257, n_positions=args.ctx, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
        attn_pdrop=args.dropout, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
        tie_word_embeddings=True,
    )


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to ``args.lr``, then cosine decay to ``args.lr * args.min_lr_frac``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    floor = args.lr * args.min_lr_frac
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * progress))


def insert_repeat(window: np.ndarray, span: np.ndarray, rng: np.random.Generator) -> None:
    """Write ``span`` twice into ``window`` (in place), with a gap of 0..len(span) text tokens."""
    length = len(span)
    gap = int(rng.integers(0, min(length, len(window) - 2 * length) + 1))
    start = int(rng.integers(0, len(window) - 2 * length - gap + 1))
    window[start:start + length] = span
    window[start + length + gap:start + 2 * length + gap] = span


def sample_batch(tokens: np.ndarray, batch: int, ctx: int, rng: np.random.Generator,
                 copy: CopyCurriculum | None) -> np.ndarray:
    """Random windows of ``tokens``, some holding a repeated span. Returns ``[batch, ctx + 1]`` int64."""
    starts = rng.integers(0, len(tokens) - ctx - 1, size=batch)
    windows = np.stack([tokens[s:s + ctx + 1] for s in starts]).astype(np.int64)
    if copy is None or copy.frac <= 0:
        return windows
    for row in np.flatnonzero(rng.random(batch) < copy.frac):
        length = int(rng.integers(min(8, copy.span), copy.span + 1))
        if rng.random() < copy.text_frac:
            s = int(rng.integers(0, len(tokens) - length))
            span = tokens[s:s + length].astype(np.int64)
        else:
            span = rng.choice(copy.common, size=length, replace=False)
        insert_repeat(windows[row], span, rng)
    return windows


def lm_loss(model: GPT2LMHeadModel, batch: torch.Tensor, autocast: bool, body=None) -> torch.Tensor:
    """Mean next-token cross-entropy in nats. ``batch: [batch, ctx + 1]``.

    The transformer body may run under bf16 autocast; the unembedding and the loss run in
    float32 so that the 50,257-way softmax is not rounded away. ``body`` replaces
    ``model.transformer`` (e.g. its ``torch.compile`` wrapper).
    """
    body = model.transformer if body is None else body
    inputs, targets = batch[:, :-1], batch[:, 1:]
    device_type = batch.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        hidden = body(input_ids=inputs).last_hidden_state  # [batch, ctx, d_model]
    with torch.autocast(device_type, enabled=False):
        logits = F.linear(hidden.float(), model.lm_head.weight.float())  # [batch, ctx, d_vocab]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model, val: np.ndarray, args, autocast: bool, common: np.ndarray) -> dict:
    """Validation loss on fixed held-out windows, and the copy drop on repeated held-out spans."""
    model.eval()
    rng = np.random.default_rng([args.seed, 999_999])
    losses = []
    for _ in range(args.val_batches):
        batch = torch.from_numpy(sample_batch(val, args.batch_size, args.ctx, rng, None))
        losses.append(lm_loss(model, batch.to(args.device), autocast).item())
    # Copy drop: [eos] + span + span with span = 25..50 held-out tokens (within ctx).
    length = min(50, (args.ctx - 1) // 2)
    starts = rng.integers(0, len(val) - length, size=32)
    spans = np.stack([val[s:s + length] for s in starts]).astype(np.int64)
    seqs = np.concatenate([np.full((32, 1), EOS_ID), spans, spans], axis=1)
    x = torch.from_numpy(seqs).to(args.device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model.transformer(input_ids=x[:, :-1]).last_hidden_state
    logits = F.linear(hidden.float(), model.lm_head.weight.float())
    nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # [32, 2 * length]
    first, second = nll[:, 1:length].mean().item(), nll[:, length + 1:].mean().item()
    model.train()
    return {"val_loss": float(np.mean(losses)), "copy_first": first, "copy_second": second,
            "copy_drop": first - second}


def save_checkpoint(path: Path, model, optimizer, step: int, tokens_seen: int, train_seconds: float,
                    args: argparse.Namespace) -> None:
    """Model, optimizer, step and settings, written atomically."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "tokens_seen": tokens_seen, "train_seconds": train_seconds,
             "config": model.config.to_dict(),
             "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def export(model: GPT2LMHeadModel, tokenizer, tokenizer_dir: Path, out: Path) -> int:
    """fp16 safetensors + config + tokenizer (and its licence) into ``out``. Returns the weights' bytes."""
    out.mkdir(parents=True, exist_ok=True)
    licence = tokenizer_dir / "TOKENIZER_LICENSE"
    if licence.is_file() and licence.resolve() != (out / licence.name).resolve():
        shutil.copyfile(licence, out / licence.name)
    half = GPT2LMHeadModel(model.config)
    half.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    half = half.half().eval()
    half.config.resid_pdrop = half.config.embd_pdrop = half.config.attn_pdrop = 0.0
    half.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = model.config.n_positions
    tokenizer.save_pretrained(out)
    for path in out.iterdir():
        path.chmod(0o644)
    size = (out / "model.safetensors").stat().st_size
    if size > MAX_EXPORT_BYTES:
        raise ValueError(f"model.safetensors is {size:,} bytes, over the {MAX_EXPORT_BYTES:,}-byte limit")
    return size


def make_optimizer(model, args) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings included), none on biases and norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95),
                             fused=args.device.startswith("cuda"))


def log(record: dict, path: Path) -> None:
    """One line to stdout and to the jsonl log."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
          flush=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    args.run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = args.run_dir / "ckpt.pt", args.run_dir / "log.jsonl"

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir, local_files_only=True)
    data = load_token_arrays(tokenizer, args.tokenizer_dir, args.corpus, args.cache_dir)
    train, val, meta = data["train"], data["val"], data["meta"]
    common = common_tokens(train, args.copy_vocab)
    copy = CopyCurriculum(args.copy_frac, args.copy_span, common, args.copy_text_frac)
    print(f"train {meta['train_tokens']:,} tokens ({len(meta['train_files'])} books), "
          f"val {meta['val_tokens']:,} tokens ({', '.join(meta['val_files'])})", flush=True)

    model = GPT2LMHeadModel(make_config(args)).to(args.device)
    optimizer = make_optimizer(model, args)
    step, tokens_seen, train_seconds = 0, 0, 0.0
    if args.resume:
        state = torch.load(ckpt_path, map_location=args.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen, train_seconds = state["step"], state["tokens_seen"], state["train_seconds"]
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.n_layer} layers x {args.n_embd}, {args.n_head} heads, ctx {args.ctx}, "
          f"{n_params:,} parameters; {args.steps} steps of {args.batch_size} x {args.ctx} tokens", flush=True)
    (args.run_dir / "args.json").write_text(
        json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=1))

    autocast = args.device.startswith("cuda") and not args.no_autocast
    body = torch.compile(model.transformer) if args.compile else model.transformer
    model.train()
    started, window_losses = time.perf_counter(), []
    time_up = False
    last_step = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    while step < last_step:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        rng = np.random.default_rng([args.seed, step])
        batch = torch.from_numpy(sample_batch(train, args.batch_size, args.ctx, rng, copy))
        loss = lm_loss(model, batch.to(args.device, non_blocking=True), autocast, body)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        tokens_seen += args.batch_size * args.ctx
        window_losses.append(loss.detach())  # no GPU sync until the next log line
        elapsed = train_seconds + time.perf_counter() - started
        time_up = args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes
        if step % args.log_every == 0 or step == last_step:
            log({"step": step, "train_loss": torch.stack(window_losses).mean().item(), "lr": lr_at(step - 1, args),
                 "tokens_seen": tokens_seen, "seconds": round(elapsed, 1)}, log_path)
            window_losses = []
        if step % args.eval_every == 0 or step == last_step or time_up:
            log({"step": step, **evaluate(model, val, args, autocast, common)}, log_path)
        if step % args.ckpt_every == 0 or step == last_step or time_up:
            save_checkpoint(ckpt_path, model, optimizer, step, tokens_seen, elapsed, args)
        if time_up:
            print(f"--max-minutes reached at step {step}; continue with --resume", flush=True)
            break

    summary = {"step": step, "steps": args.steps, "stop_after": args.stop_after, "tokens_seen": tokens_seen,
               "train_seconds": round(train_seconds + time.perf_counter() - started, 1),
               "parameters": n_params, "device": args.device, "corpus": meta}
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.export and step >= last_step:
        size = export(model.cpu(), tokenizer, args.tokenizer_dir, args.export_dir)
        print(f"exported to {args.export_dir} (model.safetensors {size:,} bytes)", flush=True)
    elif args.export:
        print(f"not exported: training stopped at step {step} of {last_step}", flush=True)


if __name__ == "__main__":
    main()
