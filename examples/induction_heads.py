"""The induction circuit, found in a real model (Elhage et al. 2021, Olsson et al. 2022).

An induction head in a later layer finds the earlier copy of the current token and attends to
the token after it (``[A][B] ... [A] -> [B]``). It can find that token because a previous-token
head in an earlier layer wrote "my previous token was A" into the residual stream, which the
induction head reads with its keys: K-composition. This script measures, on repeated random
tokens and on a narrative text:

1. the in-context drop in loss from the first copy to the second (induction at work);
2. the top induction heads and their scores; the previous-token heads in earlier layers;
3. the K-composition from the best previous-token head into the best induction head, against
   the random baseline (and, under rotary positions, by query-key offset);
4. the copying scores (OV eigenvalues) of the induction heads, and the deleting heads: strongly
   negative OV eigenvalues together with attention to the current token;
5. which heads write the induction prediction into the logit (direct logit attribution);

then writes the figures.

    python examples/induction_heads.py --model smollm2 [--n 8] [--batch 2] [--out-dir DIR]
    python examples/induction_heads.py --model gemma3-270m --n 8 --batch 2   # Gemma 3 270M
    python examples/induction_heads.py            # the embedded GPT-2 stand-in (no induction heads)

The embedded GPT-2 is a provisional CPU-trained stand-in with no induction heads (its
MODEL_CARD.md), so its numbers are near chance; SmolLM2-135M-Instruct (``--model smollm2``,
Llama architecture, 30 layers x 9 heads, 3 key/value heads) shows the circuit. On a model whose
circuits are not fixed linear maps of the residual (Gemma 2/3, OLMo 2: a norm on each attention
output; QK-norm) steps 3 and 4 print reslens's refusal instead (``arch.limits``), and the rest runs.
"""

import argparse
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

import reslens  # noqa: E402
from reslens import attribution, heads  # noqa: E402
from reslens.plot import plot_head_score_panels  # noqa: E402

TEXT = (
    "The old captain walked down to the harbour every morning, and every morning he counted the "
    "boats that had come in during the night. When the fog lay thick on the water he counted them "
    "twice, because he did not trust his eyes, and then he went back up the hill to his house."
)
OFFSETS = (0, 1, 2, 4, 8, 16, 32, 64)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="a model reslens.load_model knows, e.g. smollm2 (default: the embedded GPT-2)")
    parser.add_argument("--seq-len", type=int, default=50, help="random tokens per copy (default 50)")
    parser.add_argument("--n", type=int, default=8, help="repeated random sequences (default 8)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per forward (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("."),
                        help="where the PNG figures go (default: here)")
    return parser.parse_args()


def bos_of(arch, tokenizer) -> int | None:
    """The id written before the repeats: GPT-2's end-of-text (as TransformerLens prepends it), else the BOS
    the tokenizer's own convention adds (none for SmolLM2)."""
    if arch.family == "gpt2":
        return tokenizer.eos_token_id
    batch = reslens.tokenize(tokenizer, "x")
    return int(batch.input_ids[0, 0]) if bool(batch.special_mask.any()) else None


def repeated_random_tokens(arch, tokenizer, args):
    """Scores and losses from one capture per chunk of ``--batch`` sequences (capture once, analyse many)."""
    bos = bos_of(arch, tokenizer)
    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(arch.d_vocab) if i not in special]
    ids = heads.repeated_tokens(arch, seq_len=args.seq_len, n=args.n, seed=args.seed, token_pool=pool,
                                bos_token_id=bos)
    start, length = (0 if bos is None else 1), args.seq_len
    induction = duplicate = 0.0
    nll = torch.zeros(2)
    for chunk in ids.split(args.batch):
        res = reslens.capture(arch, chunk, sites=("attn_pattern", "logits"), dtype=torch.float32)
        share = len(chunk) / len(ids)
        induction = induction + heads.induction_scores_of(res, seq_len=length, start=start).scores * share
        duplicate = duplicate + heads.duplicate_token_scores_of(res).scores * share
        logp = res.logits[:, :-1].log_softmax(-1).gather(-1, res.input_ids[:, 1:, None].to(res.logits.device))
        logp = logp[..., 0].cpu()  # [chunk, P-1]: log p(token t+1 | tokens <= t)
        # predicting tokens 2..seq_len of each copy (token 1 of the second copy is not predictable either)
        first = logp[:, start : start + length - 1]
        second = logp[:, start + length : start + 2 * length - 1]
        nll += torch.stack([-first.mean(), -second.mean()]) * share
    how = f"{args.n} x {length} random tokens, seed {args.seed}"
    how += "" if bos is None else f", BOS {bos} first"
    induction = heads.HeadScores(induction, "induction", f"mean attention from i to i-{length}+1; {how}")
    duplicate = heads.HeadScores(duplicate, "duplicate-token", f"attention to the earlier copy; {how}")
    return ids, bos, induction, duplicate, nll


def best_previous_before(previous: heads.HeadScores, layer: int) -> tuple[int, int, float]:
    """The strongest previous-token head in a layer before ``layer``."""
    earlier = torch.nan_to_num(previous.scores.clone(), nan=-1.0)
    earlier[layer:] = -1.0
    prev_layer, prev_head = divmod(int(earlier.argmax()), previous.n_head)
    return prev_layer, prev_head, float(previous.scores[prev_layer, prev_head])


def report_composition(arch, induction, previous):
    """K-composition from the best earlier previous-token head into the best induction head."""
    k_comp = heads.composition_scores(arch, "k")
    print(k_comp.table(k=5), "\n")
    (ind_label, ind_score), = induction.top(1)
    ind_layer, ind_head = map(int, ind_label.split("."))
    if ind_layer == 0:
        print(f"the strongest induction head {ind_label} is in layer 0, so no head can compose into it")
        return k_comp, None
    prev_layer, prev_head, prev_score = best_previous_before(previous, ind_layer)
    pair = f"{prev_layer}.{prev_head}"
    raw = float(k_comp.raw[prev_layer, prev_head, ind_layer, ind_head])
    into = k_comp.raw[:, :, ind_layer, ind_head]
    rank = int((into[~into.isnan()] > raw).sum()) + 1
    n_writers = int((~into.isnan()).sum())
    sigmas = (raw - k_comp.baseline) / k_comp.baseline_std
    print(f"strongest induction head {ind_label} (score {ind_score:.3f}); strongest previous-token head "
          f"in an earlier layer {pair} (score {prev_score:.3f})")
    print(f"K-composition {pair} -> {ind_label}: raw {raw:.4f} vs random baseline {k_comp.baseline:.4f} "
          f"± {k_comp.baseline_std:.4f} ({sigmas:.0f} standard deviations above, "
          f"{raw / k_comp.baseline:.1f}x); "
          f"rank {rank} of the {n_writers} earlier heads writing into {ind_label}"
          + ("" if k_comp.offset is None else f"; at query-key offset {k_comp.offset}"))
    print(f"heads composing most into {ind_label}:",
          ", ".join(f"{label} {score:+.4f}" for label, score in k_comp.reader(ind_layer, ind_head).top(5)))
    if arch.positional == "rotary":
        offsets = tuple(o for o in OFFSETS if o < arch.n_ctx)
        by_offset = heads.composition_by_offset(arch, "k", offsets)
        curve = by_offset.pair(pair, ind_label)
        print(f"K-composition {pair} -> {ind_label} by query-key offset (minus baseline): "
              + ", ".join(f"{o}: {float(s):+.4f}" for o, s in zip(offsets, curve)))
    print()
    return k_comp, (pair, ind_label)


def report_copying(arch, tokenizer, induction):
    """Copying scores of the induction heads; deleting heads (negative OV eigenvalues, attending to self)."""
    ov = heads.ov_eigen_summary(arch, fold_ln=True)  # the norms' γ folded in (all an RMSNorm has to fold)
    small = arch.n_layer <= 12
    print(ov.table(k=5) if small else top_line("top copying heads (norm γ folded)", ov.copying_scores), "\n")
    print("copying scores of the top induction heads:",
          ", ".join(f"{label} {float(ov.copying[tuple(map(int, label.split('.')))]):+.3f}"
                    for label, _ in induction.top(5)))
    current = heads.current_token_scores(arch, TEXT, tokenizer=tokenizer)
    print(top_line("top current-token heads", current))
    deleters = ov.deleters(current)
    print("deleting heads (copying <= -0.3 and attention to the current token >= 0.3):")
    for label, copying, attention in deleters or []:
        eig = ov.eigenvalues[tuple(map(int, label.split(".")))]
        print(f"  {label:>6}  copying {copying:+.3f}  attention to self {attention:.3f}  "
              f"most negative eigenvalue {float(eig.real.min()):+.3g}")
    if not deleters:
        print("  none")
    print()
    return ov


def refusals(arch, *analyses: str) -> list[str]:
    """reslens's refusal of each of ``analyses`` this model cannot give exactly (see ``arch.limits``)."""
    found = []
    for analysis in analyses:
        try:
            arch.require(analysis)
        except ValueError as refused:
            found.append(str(refused))
    return found


def top_line(title: str, scores: heads.HeadScores, k: int = 5) -> str:
    return f"{title}: " + ", ".join(f"{label} {s:.3f}" for label, s in scores.top(k))


def report_attribution(arch, tokenizer, bos, seq_len: int = 20):
    """Direct logit attribution at a repeated-sequence position where induction predicts the next token."""
    ids = heads.repeated_tokens(arch, seq_len=seq_len, n=1, seed=1, bos_token_id=bos)
    sites = (*attribution.ATTRIBUTION_SITES, "attn_pattern")
    res = reslens.capture(arch, ids, sites=sites, dtype=torch.float32)
    start = 0 if bos is None else 1
    one = heads.induction_scores_of(res, seq_len=seq_len, start=start)
    print(top_line("induction scores on the attributed sequence", one))
    position = start + seq_len + 10  # token 10 of the second copy; the next token is token 11 of the first
    target = int(ids[0, position + 1])
    dla = attribution.logit_attribution_of(res, arch, target, position=position, tokenizer=tokenizer)
    print(dla.table(k=8))
    print(top_line("heads writing most directly into that logit", dla.head_scores()))
    return dla


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    model, tokenizer = reslens.load_model(args.model)
    arch = reslens.adapter(model)  # the family adapter: pass it around instead of re-wrapping the model
    print(f"{args.model or 'embedded GPT-2'}: {arch!r}, {arch.n_kv_head} key/value heads, "
          f"{arch.positional} positions\n")

    ids, bos, induction, duplicate, nll = repeated_random_tokens(arch, tokenizer, args)
    print(f"loss on {args.n} repeated random sequences of {args.seq_len} tokens (tokens 2..{args.seq_len} of "
          f"each copy): first copy {nll[0]:.2f} nats, second copy {nll[1]:.2f} nats\n")
    print(induction.table(k=8) if arch.n_layer <= 12 else top_line("top induction heads", induction, 8))
    print("heads scoring > 0.5:", int((induction.scores > 0.5).sum()), "\n")
    print(top_line("top duplicate-token heads", duplicate), "\n")
    previous = heads.previous_token_scores(arch, TEXT, tokenizer=tokenizer)
    print(top_line("top previous-token heads (narrative text)", previous, 8), "\n")

    figures = {}
    why = refusals(arch, "ov_circuit", "qk_circuit")  # K-composition reads the writer's OV, the reader's QK
    if not why:
        k_comp, _ = report_composition(arch, induction, previous)
        figures["k_composition.png"] = k_comp.plot()
    else:
        print("K-composition:", *why, "", sep="\n  ")
    copying = not refusals(arch, "ov_circuit")
    if copying:
        ov = report_copying(arch, tokenizer, induction)
    else:
        print("copying (OV) scores and deleting heads:", *refusals(arch, "ov_circuit"), sep="\n  ")
        current = heads.current_token_scores(arch, TEXT, tokenizer=tokenizer)
        print(top_line("top current-token heads", current), "\n")
    dla = report_attribution(arch, tokenizer, bos)

    figures["head_scores.png"] = plot_head_score_panels(
        [induction, previous] + ([ov.copying_scores, ov.sign_scores] if copying else []))
    figures["induction_logit_attribution.png"] = dla.plot()
    for name, figure in figures.items():
        figure.savefig(args.out_dir / name, dpi=150, bbox_inches="tight")
    print(f"\nwrote {', '.join(figures)} to {args.out_dir} ({time.perf_counter() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
