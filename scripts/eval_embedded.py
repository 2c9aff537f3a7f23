"""Measure the embedded reslens model against the issue's quality bars (not part of the package).

On a model directory (default: ``src/reslens/data/embedded``):

1. held-out loss: bits per byte and nats per token over the three held-out books.
   Protocol: each book is tokenised alone, ``<|endoftext|>`` is put in front, and the
   sequence is cut into non-overlapping windows of ``ctx`` inputs; every token of the book
   is predicted exactly once (context resets at each window). bits/byte = total nats / ln 2
   / total UTF-8 bytes of the three books.  Bar: ≤ 1.45 bits/byte.
2. copying: ``n`` spans of 50 held-out tokens, each fed as ``[eos] + span + span``; mean loss
   on tokens 2..50 of the first copy minus that of the second copy.  Bar: ≥ 2 nats/token.
3. induction heads: ``n`` sequences of 50 distinct tokens drawn uniformly from the 2,000 most
   frequent tokens of the training books, fed as ``[eos] + r + r``; a head's score is its mean
   attention from each token of the second copy to the token after that token's first
   occurrence.  Bar: at least two heads with score ≥ 0.3.
4. logit lens: on a narrative prompt, ``lm_head(ln_f(resid))`` of the raw residual before
   ``ln_f`` (final layer) and of the output of the second-to-last block; the fraction of
   positions whose top-1 tokens agree.  Bar: > 0.5.
5. ``reslens.load_model()`` time in a fresh process (imports excluded; median of 3).  Bar: < 2 s.

    python scripts/eval_embedded.py --json runs/cpu/eval.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPT2LMHeadModel

from embedded_data import (EMBEDDED_DIR, EOS_ID, HELD_OUT_BOOKS, REPO, common_tokens, default_corpus,
                           load_token_arrays)

NARRATIVE_PROMPT = (
    "When Mary came home that evening, she found the door of the old house open and the fire "
    "gone out. She called for her brother, but nobody answered, so she lit a candle and went "
    "slowly up the stairs. At the top she stopped, for she could hear someone walking in the "
    "room above her, and she knew that her brother had gone to the village in the morning."
)


def next_token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-position loss in nats (float32). ``ids: [batch, seq]`` → ``[batch, seq - 1]``."""
    ids = ids.to(model.device)
    logits = model(input_ids=ids[:, :-1]).logits.float()  # [batch, seq - 1, d_vocab]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").cpu()


@torch.no_grad()
def held_out_loss(model, tokenizer, corpus: Path, ctx: int) -> dict:
    """Nats and bits/byte over the held-out books, in non-overlapping windows of ``ctx`` inputs."""
    per_book, total_nats, total_tokens, total_bytes = {}, 0.0, 0, 0
    batch = max(1, 4096 // ctx)
    for name in HELD_OUT_BOOKS:
        text = (corpus / name).read_text(encoding="utf-8")
        ids = [EOS_ID] + tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        seq = torch.tensor(ids)
        windows = [seq[s:s + ctx + 1] for s in range(0, len(seq) - 1, ctx)]  # each [≤ ctx + 1]
        full = [w for w in windows if len(w) == ctx + 1]
        nats = sum(next_token_nll(model, torch.stack(full[i:i + batch])).sum().item()
                   for i in range(0, len(full), batch))
        nats += sum(next_token_nll(model, w[None]).sum().item() for w in windows if len(w) < ctx + 1)
        n_bytes = len(text.encode("utf-8"))
        per_book[name] = {"tokens": len(ids) - 1, "bytes": n_bytes, "nats_per_token": nats / (len(ids) - 1),
                          "bits_per_byte": nats / math.log(2) / n_bytes}
        total_nats, total_tokens, total_bytes = total_nats + nats, total_tokens + len(ids) - 1, total_bytes + n_bytes
    return {"nats_per_token": total_nats / total_tokens, "bits_per_byte": total_nats / math.log(2) / total_bytes,
            "tokens": total_tokens, "bytes": total_bytes, "window": ctx, "books": per_book}


@torch.no_grad()
def repeated_span_drop(model, held_out: np.ndarray, n: int, span: int, seed: int) -> dict:
    """Loss on the first vs the second copy of held-out spans fed as ``[eos] + s + s``."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(held_out) - span, size=n)
    spans = np.stack([held_out[s:s + span] for s in starts]).astype(np.int64)  # [n, span]
    ids = torch.from_numpy(np.concatenate([np.full((n, 1), EOS_ID), spans, spans], axis=1))
    nll = torch.cat([next_token_nll(model, ids[i:i + 25]) for i in range(0, n, 25)])  # [n, 2 * span]
    first, second = nll[:, 1:span].mean().item(), nll[:, span + 1:].mean().item()
    return {"first": first, "second": second, "drop": first - second, "n": n, "span": span}


@torch.no_grad()
def induction_scores(model, common: np.ndarray, n: int, span: int, seed: int) -> dict:
    """Per-head induction scores ``[n_layer, n_head]`` on ``[eos] + r + r`` random-token sequences."""
    rng = np.random.default_rng(seed)
    rand = np.stack([rng.choice(common, size=span, replace=False) for _ in range(n)])  # [n, span]
    ids = torch.from_numpy(np.concatenate([np.full((n, 1), EOS_ID), rand, rand], axis=1)).to(model.device)
    queries = torch.arange(span + 1, 2 * span + 1)  # positions of the second copy
    keys = queries - span + 1  # the token after each one's first occurrence
    scores, nll = [], []
    for i in range(0, n, 25):
        out = model(input_ids=ids[i:i + 25], output_attentions=True)
        pattern = torch.stack(out.attentions)  # [n_layer, batch, head, query, key]
        scores.append(pattern[:, :, :, queries, keys].mean(-1).sum(1))  # [n_layer, head]
        logits = out.logits[:, :-1].float()
        nll.append(F.cross_entropy(logits.transpose(1, 2), ids[i:i + 25, 1:], reduction="none"))
    score = (torch.stack(scores).sum(0) / n).float().cpu()
    nll = torch.cat(nll).cpu()
    top = torch.topk(score.flatten(), k=min(5, score.numel()))
    return {"scores": score.tolist(), "max": score.max().item(), "count_ge_0.3": int((score >= 0.3).sum()),
            "top_heads": [f"{int(j) // score.shape[1]}.{int(j) % score.shape[1]}={v:.3f}"
                          for v, j in zip(top.values.tolist(), top.indices.tolist())],
            "random_first": nll[:, 1:span].mean().item(), "random_second": nll[:, span + 1:].mean().item(),
            "n": n, "span": span, "common_vocab": len(common)}


@torch.no_grad()
def lens_agreement(model, tokenizer, prompt: str) -> dict:
    """Top-1 agreement of each layer's logit lens with the final layer on ``prompt``.

    ``resid[l]`` for ``l < n_layer`` is HF's ``hidden_states[l]`` (raw); ``resid[n_layer]`` is
    the input of ``ln_f``, captured by a hook (HF's ``hidden_states[-1]`` already has ``ln_f``).
    """
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
    captured = []
    handle = model.transformer.ln_f.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        out = model(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    resid = torch.stack([*out.hidden_states[:-1], captured[0]])[:, 0]  # [n_layer + 1, pos, d_model]
    lens = model.lm_head(model.transformer.ln_f(resid)).float()  # [n_layer + 1, pos, d_vocab]
    if not torch.allclose(lens[-1], out.logits[0].float(), atol=1e-3, rtol=1e-3):
        raise RuntimeError("the final-layer lens does not reproduce the model's logits")
    top1 = lens.argmax(-1).cpu()  # [n_layer + 1, pos]
    per_layer = (top1 == top1[-1]).float().mean(-1)  # [n_layer + 1]
    return {"final_vs_second_to_last": per_layer[-2].item(), "per_layer": per_layer.tolist(),
            "positions": ids.shape[1]}


def load_time(model_dir: Path, repeats: int = 3) -> dict:
    """Seconds for ``reslens.load_model()`` (and the tokenizer alone) in fresh processes, imports excluded."""
    name = "" if model_dir.resolve() == EMBEDDED_DIR.resolve() else repr(str(model_dir))
    code = (
        "import time, torch; torch.set_num_threads(1)\n"
        "import reslens.models as m\n"
        "from transformers import AutoTokenizer, GPT2LMHeadModel\n"
        "t = time.perf_counter(); m.load_model(" + name + "); a = time.perf_counter() - t\n"
        "t = time.perf_counter(); AutoTokenizer.from_pretrained(" + repr(str(model_dir)) +
        ", local_files_only=True); b = time.perf_counter() - t\n"
        "print(a, b)\n"
    )
    runs = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append([float(x) for x in result.stdout.split()[-2:]])
    runs = np.asarray(runs)
    return {"load_model_seconds": float(np.median(runs[:, 0])), "tokenizer_seconds": float(np.median(runs[:, 1])),
            "runs": runs.tolist()}


def bars(results: dict) -> list[dict]:
    """The issue's bars with PASS/FAIL."""
    rows = [
        ("held-out bits/byte", results["held_out"]["bits_per_byte"], "<= 1.45", results["held_out"]["bits_per_byte"] <= 1.45),
        ("repeated-span loss drop (nats/token)", results["copy"]["drop"], ">= 2.0", results["copy"]["drop"] >= 2.0),
        ("heads with induction score >= 0.3", results["induction"]["count_ge_0.3"], ">= 2",
         results["induction"]["count_ge_0.3"] >= 2),
        ("lens top-1 agreement, final vs second-to-last", results["lens"]["final_vs_second_to_last"], "> 0.5",
         results["lens"]["final_vs_second_to_last"] > 0.5),
    ]
    if "load" in results:
        rows.append(("reslens.load_model() seconds", results["load"]["load_model_seconds"], "< 2.0",
                     results["load"]["load_model_seconds"] < 2.0))
    return [{"bar": b, "value": v, "threshold": t, "pass": bool(p)} for b, v, t, p in rows]


def print_table(results: dict) -> None:
    held = results["held_out"]
    print(f"held-out: {held['nats_per_token']:.4f} nats/token, {held['bits_per_byte']:.4f} bits/byte "
          f"({held['tokens']:,} tokens, {held['bytes']:,} bytes, windows of {held['window']})")
    for name, book in held["books"].items():
        print(f"  {name:40s} {book['nats_per_token']:.4f} nats/token  {book['bits_per_byte']:.4f} bits/byte")
    copy, ind = results["copy"], results["induction"]
    print(f"repeated held-out spans: first copy {copy['first']:.3f}, second copy {copy['second']:.3f} nats/token")
    print(f"random common-token spans: first {ind['random_first']:.3f}, second {ind['random_second']:.3f} nats/token")
    print(f"induction: max head score {ind['max']:.3f}; top heads {', '.join(ind['top_heads'])}")
    print("lens agreement with the final layer, by layer: "
          + " ".join(f"{v:.2f}" for v in results["lens"]["per_layer"]))
    if "load" in results:
        print(f"load_model() {results['load']['load_model_seconds']:.2f} s, tokenizer alone "
              f"{results['load']['tokenizer_seconds']:.2f} s")
    print(f"\n{'bar':48s} {'value':>10s} {'needs':>8s}  result")
    for row in results["bars"]:
        print(f"{row['bar']:48s} {row['value']:>10.4g} {row['threshold']:>8s}  {'PASS' if row['pass'] else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--corpus", type=Path, default=default_corpus())
    parser.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "cache")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--n", type=int, default=100, help="sequences for the copy and induction measures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="e.g. cuda; the load time is always measured on CPU")
    parser.add_argument("--skip-load-time", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = GPT2LMHeadModel.from_pretrained(args.model_dir, dtype=torch.float32, local_files_only=True,
                                            attn_implementation="eager").eval().to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    data = load_token_arrays(tokenizer, args.model_dir, args.corpus, args.cache_dir)
    span = min(50, (model.config.n_positions - 1) // 2)
    started = time.perf_counter()
    results = {
        "model_dir": str(args.model_dir),
        "config": {k: model.config.to_dict()[k] for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out": held_out_loss(model, tokenizer, args.corpus, model.config.n_positions),
        "copy": repeated_span_drop(model, data["val"], args.n, span, args.seed),
        "induction": induction_scores(model, common_tokens(data["train"], 2000), args.n, span, args.seed),
        "lens": lens_agreement(model, tokenizer, NARRATIVE_PROMPT),
    }
    results["eval_seconds"] = round(time.perf_counter() - started, 1)
    if not args.skip_load_time:
        results["load"] = load_time(args.model_dir)
    results["bars"] = bars(results)
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
