"""Time and peak memory of ``reslens.logit_lens`` against a plain HuggingFace forward, the
naive full-materialisation lens and TransformerLens 4's logit lens, side by side in one run.

GPT-2-small shape (124M parameters, vocab 50257, random weights, seed 0, eval mode), all 13
``resid`` layers, all positions, top-5 plus every metric, CPU by default. Shapes: 1 x 1024
and 4 x 256 tokens.

Cases (timed interleaved: A, B, C, ..., A, B, C, ...; medians and ratios to the forward):

- ``HF forward``: ``model(ids)`` under ``no_grad`` -- the baseline.
- ``reslens`` with ``fused=False`` and ``fused=True``: ``logit_lens(model, ids, top_k=5)``
  (target = next token, so every metric is computed). The fused reducer's compile runs in a
  warm-up call that is excluded from the timings; its one-off cost is printed separately
  (measured with a fresh, empty inductor cache).
- ``lens_stats`` against ``logit_lens`` on the same tokens: ``lens_stats(model, [ids])`` (one
  batch: the lens with top-1 plus running sums and the quantile samples) beside
  ``logit_lens(model, ids, top_k=1)``, which is what it reads per batch; a line after the table
  gives both per token and their ratio.
- ``naive lens``: ``ln_f(resid) @ W_U^T`` for all 13 layers materialised as float32
  ``[13, B, P, V]``, ``log_softmax``, then top-5, target log-prob, rank, entropy, KL both
  ways and JS from the full tensors.
- TransformerLens 4.3 (only when ``transformer_lens`` imports; see setup_tl_env.sh):
  ``transformer_lens.tools.analysis.logit_lens`` on ``TransformerBridge.boot_transformers``
  of the same weights saved to a temporary directory (booted offline). Its ``top_k``,
  ``targets`` and ``vocab`` selectors are mutually exclusive, so two rows: ``top-5`` (one
  call: forward + top-5 probabilities + entropy) and ``top-5 + target`` (one
  ``run_with_cache`` and two readouts of that cache: top-5 + entropy, then target
  log-prob + rank). It has no KL, JS or final-top-1 metrics.
- breakdown rows (on unless ``--no-breakdown``; timed only): ``reslens.capture`` of the
  residual stream alone, and the unembedding alone (``ln_f`` + ``x @ W_U^T`` of the 13 x N
  already-captured rows in blocks of 256, results dropped) -- the floor any lens pays on top of
  its forward. reslens's time minus these two is its reduction (metrics) time.

Peak memory: each case runs once more in its own fresh subprocess: model (and bridge) load,
input creation and a warm-up call on a 1 x 32 input (this compiles the fused reducer; glibc is
told to map every block of 64 KiB or more and to return freed memory at once, so the warm-up
leaves no retained heap for the measured call to reuse), then
the peak-RSS counter is reset (``/proc/self/clear_refs``) and the case runs at full size.
``peak extra`` = peak RSS during the case - RSS just before it; ``above forward`` = a case's
peak extra - the HF forward's peak extra, measured the same way.

    python benchmarks/bench_lens.py                       # reslens + naive only
    bash benchmarks/setup_tl_env.sh                       # once: venv with TransformerLens
    /tmp/reslens-tl-venv/bin/python benchmarks/bench_lens.py --repeats 5

Prints a Markdown table per shape with the machine line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Inductor's on-disk cache would hide the compile cost: the parent process compiles into a
# fresh directory, and the memory subprocesses reuse it (their warm-up is not measured).
if "RESLENS_BENCH_INDUCTOR_DIR" not in os.environ:
    os.environ["RESLENS_BENCH_INDUCTOR_DIR"] = tempfile.mkdtemp(prefix="reslens-bench-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ["RESLENS_BENCH_INDUCTOR_DIR"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from reslens import capture  # noqa: E402
from reslens.lens import logit_lens  # noqa: E402
from reslens.lens import lens_stats  # noqa: E402

EMBEDDED = Path(__file__).resolve().parents[1] / "src" / "reslens" / "data" / "embedded"
TOP_K = 5

FORWARD = "HF forward (baseline)"
RESLENS = "reslens logit_lens, fused=False"
RESLENS_FUSED = "reslens logit_lens, fused=True"
RESLENS_TOP1 = "reslens logit_lens, top_k=1 (what lens_stats reads)"
STATS = "reslens lens_stats, same tokens (1 batch)"
NAIVE = "naive lens (full [13,B,P,V] float32)"
TL_TOP = "TransformerLens logit_lens, top-5"
TL_BOTH = "TransformerLens logit_lens, top-5 + target (2 readouts, 1 cache)"
CAPTURE = "breakdown: reslens capture(resid) only"
GEMM = "breakdown: ln_f + unembedding GEMMs only"


# --- the model and inputs -----------------------------------------------------------------


def build_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()


def make_ids(batch: int, pos: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, pos), generator=gen)


def next_targets(ids: torch.Tensor) -> torch.Tensor:
    """Next-token ids ``[B, P]``, -1 at the last position (as reslens's ``targets="next"``)."""
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = ids[:, 1:]
    return nxt


def save_for_tl(model: GPT2LMHeadModel) -> str:
    """The model plus the embedded GPT-2 tokenizer files in a temporary directory."""
    path = tempfile.mkdtemp(prefix="reslens-bench-gpt2-")
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED / name, path)
    return path


def boot_tl(model_dir: str):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(model_dir, device="cpu")
    bridge.eval()
    return bridge


def tl_available() -> str | None:
    """None if TransformerLens imports, else the reason it does not."""
    try:
        import transformer_lens  # noqa: F401
        from transformer_lens.tools.analysis import logit_lens as _  # noqa: F401
    except Exception as error:  # pragma: no cover - depends on the environment
        return f"{type(error).__name__}: {error}"
    return None


# --- the lenses ---------------------------------------------------------------------------


def naive_lens(model: GPT2LMHeadModel, ids: torch.Tensor, top_k: int = TOP_K) -> dict[str, torch.Tensor]:
    """Every lens metric from the full ``[13, B, P, V]`` float32 logits, written plainly."""
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # 13 x [B, P, D]
        ln_f = model.transformer.ln_f
        # hidden[-1] already has ln_f applied; the others are raw residuals.
        normed = torch.stack([ln_f(h) for h in hidden[:-1]] + [hidden[-1]])  # [13, B, P, D]
        logits = (normed @ model.lm_head.weight.T).float()  # [13, B, P, V]
        logp = torch.log_softmax(logits, dim=-1)
        targets = next_targets(ids)
        has_target = targets >= 0
        tgt = targets.clamp(min=0)[None, :, :, None].expand(logits.shape[0], -1, -1, 1)
        top_logp, top_ids = logp.topk(top_k, dim=-1)
        target_logprob = torch.where(has_target, logp.gather(-1, tgt).squeeze(-1), torch.nan)
        target_rank = torch.where(has_target, (logits > logits.gather(-1, tgt)).sum(-1), -1)
        del logits
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
        q, logq = p[-1:], logp[-1:]  # the final layer's distribution
        kl_final_layer = (q * (logq - logp)).sum(-1)
        kl_layer_final = (p * (logp - logq)).sum(-1)
        m = 0.5 * (p + q)
        js = -torch.xlogy(m, m).sum(-1) - 0.5 * (entropy + entropy[-1:])
        del m
        final_top1 = top_ids[-1, ..., 0]
        final_top1_prob = p.gather(-1, final_top1[None, ..., None].expand(p.shape[0], -1, -1, 1)).squeeze(-1)
        top_probs = top_logp.exp()
        return dict(
            top_ids=top_ids,
            top_probs=top_probs,
            target_logprob=target_logprob,
            target_rank=target_rank,
            entropy=entropy,
            kl_final_layer=kl_final_layer,
            kl_layer_final=kl_layer_final,
            js=js,
            max_prob=top_probs[..., 0],
            final_top1_prob=final_top1_prob,
        )


def gemm_only(model: GPT2LMHeadModel, flat: torch.Tensor, rows: int = 256) -> None:
    """``ln_f`` and the unembedding of already-captured residual rows ``flat: [13 * N, D]`` in
    blocks of ``rows``, results dropped: the floor any lens pays."""
    ln_f, w_u = model.transformer.ln_f, model.lm_head.weight
    with torch.no_grad():
        for start in range(0, flat.shape[0], rows):
            torch.nn.functional.linear(ln_f(flat[start : start + rows]), w_u)


def tl_top(bridge, ids: torch.Tensor):
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    return tl_logit_lens(bridge, ids, positions=None, top_k=TOP_K, return_type="probs")


def tl_both(bridge, ids: torch.Tensor):
    """Top-5 + entropy and target log-prob + rank: TL takes one selector per readout."""
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    n = int(bridge.cfg.n_layers)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=names)
    top = tl_logit_lens(cache, positions=None, top_k=TOP_K, return_type="probs")
    targets = next_targets(ids).clamp(min=0)  # TL needs a valid id at the last position too
    target = tl_logit_lens(cache, positions=None, targets=targets, return_type="log_probs")
    return top, target


def make_cases(model, ids, bridge, breakdown: bool) -> dict:
    def forward():
        with torch.no_grad():
            model(ids)

    cases = {
        FORWARD: forward,
        RESLENS: lambda: logit_lens(model, ids, top_k=TOP_K, fused=False),
        RESLENS_FUSED: lambda: logit_lens(model, ids, top_k=TOP_K, fused=True),
        RESLENS_TOP1: lambda: logit_lens(model, ids, top_k=1),
        STATS: lambda: lens_stats(model, [ids], progress=False),
        NAIVE: lambda: naive_lens(model, ids),
    }
    if bridge is not None:
        cases[TL_TOP] = lambda: tl_top(bridge, ids)
        cases[TL_BOTH] = lambda: tl_both(bridge, ids)
    if breakdown:
        cases[CAPTURE] = lambda: capture(model, ids, sites=("resid",))
        captured = {}

        def gemm():
            if "flat" not in captured:  # captured once, in the untimed warm-up call
                resid = capture(model, ids, sites=("resid",)).resid
                captured["flat"] = resid.reshape(-1, resid.shape[-1])
            gemm_only(model, captured["flat"])

        cases[GEMM] = gemm
    return cases


# --- correctness spot check ---------------------------------------------------------------


def spot_check(model, bridge) -> str:
    """reslens vs the naive lens (and TL) on 2 x 48 tokens: the cases compute the same thing."""
    ids = make_ids(2, 48, model.config.vocab_size)
    ours = logit_lens(model, ids, top_k=TOP_K)
    ref = naive_lens(model, ids)
    keep = next_targets(ids) >= 0
    worst = {}
    for name in ("top_probs", "entropy", "kl_final_layer", "kl_layer_final", "js", "final_top1_prob"):
        worst[name] = float((getattr(ours, name) - ref[name]).abs().max())
    worst["target_logprob"] = float((ours.target_logprob - ref["target_logprob"])[:, keep].abs().max())
    worst["target_rank"] = int((ours.target_rank - ref["target_rank"])[:, keep].abs().max())
    worst["top1 disagreements"] = int((ours.top_ids[..., 0] != ref["top_ids"][..., 0]).sum())
    if bridge is not None:
        top, target = tl_both(bridge, ids)
        worst["TL top_probs"] = float((top.values - ours.top_probs).abs().max())
        worst["TL entropy"] = float((top.readout.entropy - ours.entropy).abs().max())
        worst["TL target_logprob"] = float((target.values[..., 0] - ours.target_logprob)[:, keep].abs().max())
        worst["TL target_rank"] = int(
            (target.readout.target_ranks[..., 0] - ours.target_rank)[:, keep].abs().max()
        )
    return ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in worst.items())


# --- memory (one fresh subprocess per case) -------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def memory_child(case: str, batch: int, pos: int, model_dir: str | None) -> None:
    model = build_model()
    bridge = boot_tl(model_dir) if model_dir and case in (TL_TOP, TL_BOTH) else None
    ids = make_ids(batch, pos, model.config.vocab_size)
    small = make_ids(1, 32, model.config.vocab_size)
    make_cases(model, small, bridge, breakdown=False)[case]()  # warm-up (compiles fused)
    fn = make_cases(model, ids, bridge, breakdown=False)[case]
    gc.collect()
    before = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM)
        method = "VmHWM reset"
    except OSError:  # pragma: no cover - older kernels
        method = "ru_maxrss (includes load)"
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = (
        _status_kb("VmHWM") if method == "VmHWM reset" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    del out
    print(
        json.dumps(
            {
                "case": case,
                "before_mb": before / 1024,
                "peak_mb": peak / 1024,
                "extra_mb": (peak - before) / 1024,
                "seconds": seconds,
                "method": method,
            }
        )
    )


def measure_memory(case: str, batch: int, pos: int, model_dir: str | None) -> dict:
    cmd = [sys.executable, __file__, "--memory-case", case, "--shapes", f"{batch}x{pos}"]
    if model_dir:
        cmd += ["--model-dir", model_dir]
    # glibc: every block of 64 KiB or more gets its own mapping, and freed memory goes back at
    # once, so the warm-up leaves no retained heap for the measured call to hide in.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"case": case, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


# --- main ---------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in part.lower().split("x")) for part in text.split(",")]  # type: ignore[misc]


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()
    except (OSError, AttributeError):
        pass
    threads = torch.get_num_threads()
    return f"machine: {cpu}, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="1x1024,4x256", help="comma-separated BATCHxPOS")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-tl", action="store_true", help="skip TransformerLens even if it imports")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes)

    if args.memory_case:
        memory_child(args.memory_case, *shapes[0], args.model_dir)
        return

    model = build_model()
    tl_reason = "skipped (--no-tl)" if args.no_tl else tl_available()
    bridge = model_dir = None
    if tl_reason is None:
        try:
            model_dir = save_for_tl(model)
            bridge = boot_tl(model_dir)
        except Exception as error:  # pragma: no cover - depends on the environment
            tl_reason = f"boot failed: {type(error).__name__}: {error}"
            bridge = model_dir = None

    print(machine_line())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = "?"
    import transformers

    tl_version = "not used"
    if bridge is not None:
        from importlib.metadata import version

        tl_version = version("transformer-lens")
    versions = f"transformers {transformers.__version__}, transformer-lens {tl_version}"
    print(f"reslens commit {commit or '?'}, {versions}")
    if tl_reason is not None:
        print(f"TransformerLens: not benchmarked -- {tl_reason}")
    print(f"spot check (max |reslens - other| on 2 x 48 tokens): {spot_check(model, bridge)}")

    compile_note = None
    for batch, pos in shapes:
        ids = make_ids(batch, pos, model.config.vocab_size)
        cases = make_cases(model, ids, bridge, args.breakdown)
        first = {}
        for name, fn in cases.items():  # warm-up, untimed (the fused reducer compiles here)
            start = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - start
            gc.collect()
        times = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                start = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - start)
                del out
                gc.collect()
        if compile_note is None:
            compile_note = first[RESLENS_FUSED] - statistics.median(times[RESLENS_FUSED])
            compile_note = (
                f"fused=True one-off compile (first call at {batch} x {pos}, empty inductor cache, "
                f"minus its median): {compile_note:.1f} s"
            )

        memory = {}
        if not args.no_memory:
            for name in cases:
                if name in (CAPTURE, GEMM):
                    continue
                memory[name] = measure_memory(name, batch, pos, model_dir)

        base = statistics.median(times[FORWARD])
        base_mem = memory.get(FORWARD, {}).get("extra_mb")
        print(
            f"\n### GPT-2 small (124M), {batch} x {pos} tokens, 13 layers, all positions, top-{TOP_K} "
            f"+ all metrics; cpu, {args.repeats} interleaved repeats\n"
        )
        print("| case | median s | min s | ratio to forward | peak extra MB | above forward MB |")
        print("|---|---|---|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            mem = memory.get(name, {})
            extra = mem.get("extra_mb")
            above = "" if extra is None or base_mem is None else f"{extra - base_mem:.0f}"
            extra_s = (
                f"{extra:.0f}" if extra is not None else (f"error: {mem['error']}" if "error" in mem else "")
            )
            print(f"| {name} | {med:.3f} | {min(ts):.3f} | {med / base:.2f} | {extra_s} | {above} |")
        if compile_note and (batch, pos) == shapes[0]:
            print(f"\n{compile_note}")
        med = {name: statistics.median(ts) for name, ts in times.items()}
        per_token = {name: med[name] / (batch * pos) * 1e3 for name in (RESLENS_TOP1, STATS)}
        print(
            f"\nper token: logit_lens(top_k=1) {per_token[RESLENS_TOP1]:.3f} ms, lens_stats "
            f"{per_token[STATS]:.3f} ms: lens_stats / logit_lens = {med[STATS] / med[RESLENS_TOP1]:.3f}"
        )
        if TL_TOP in med:
            for tl in (TL_TOP, TL_BOTH):
                for ours in (RESLENS, RESLENS_FUSED):
                    line = f"- {tl} / {ours}: time {med[tl] / med[ours]:.2f}x"
                    if (
                        memory.get(tl, {}).get("extra_mb")
                        and memory.get(ours, {}).get("extra_mb") is not None
                    ):
                        line += (
                            f", peak extra {memory[ours]['extra_mb'] / memory[tl]['extra_mb']:.3f} of TL's"
                        )
                    print(line)
        print(f"\nraw times (s): {json.dumps({k: [round(t, 3) for t in v] for k, v in times.items()})}")
        if memory:
            rounded = {
                k: {f: (round(x, 1) if isinstance(x, float) else x) for f, x in v.items() if f != "case"}
                for k, v in memory.items()
            }
            print(f"memory (MB): {json.dumps(rounded)}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
