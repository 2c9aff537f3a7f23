"""Time the token-identity patchscope over every layer of SmolLM2: one batched forward against a loop of
one HuggingFace forward per source layer (the nnterp way), at the same batch size.

SmolLM2-135M-Instruct (``reslens.load_model("smollm2")``, cached), a source text of ``--tokens`` tokens
(default 32), every one of the 31 ``resid`` layers (0..30) at every source position, the paper's
token-identity target prompt (``PROMPTS["token_identity"]``, 20 tokens on SmolLM2: patched and read at
its last token ``"?"``), target layer = source layer, float32, CPU, ``torch.set_num_threads(--threads)``.
The source residuals are captured once, outside the timings. Each case ends with the logits
``[31 x tokens, d_vocab]`` of every (layer, position) cell at the target prompt's last token:

- ``batched``: ``Patchscope(model).translate_rows`` over the 31 layers (a fresh lens each repeat, so
  its clean target run is timed too) then ``arch.logits``: every row in one staged forward
  (``batch_size`` 4096 rows: all ``31 x tokens`` at once), each row one position joining at its layer.
- ``batched, batch = tokens``: the same with ``batch_size = tokens`` rows per forward, the loop's batch.
- ``per-layer loop``: for each source layer, one ``model(...)`` forward of the target prompt repeated
  ``tokens`` times, a forward pre-hook on decoder block ``l`` (the final norm for ``l = 30``) writing
  each row's source vector at ``"?"``, logits at the last position only (``logits_to_keep=1``).

Cases are timed interleaved (A, B, C, A, B, C, ...); medians; the max |difference| of the logits against
the loop is printed.

    nice -n 10 python benchmarks/bench_patchscope.py [--tokens 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import torch

import reslens
from reslens.lens import PROMPTS, Patchscope

SOURCE = ("When the old sailor came back to the inn, he asked for a glass of rum and sat by the fire. "
          "The rain fell on the roof all night, and nobody in the village could sleep until morning came.")


def loop(model, target: torch.Tensor, position: int, states: torch.Tensor) -> torch.Tensor:
    """One HF forward per source layer, ``states [n_layer + 1, N, d]`` written at ``position`` by a hook."""
    arch = reslens.adapter(model)
    modules = [*arch.blocks, arch.final_norm_module]
    out = []
    for layer, h in enumerate(states):
        def hook(module, args, kwargs, h=h):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            x[:, position] = h
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        handle = modules[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                rows = target[None].expand(h.shape[0], -1)
                out.append(model(input_ids=rows, use_cache=False, logits_to_keep=1).logits[:, -1])
        finally:
            handle.remove()
    return torch.cat(out)


def batched(model, tokenizer, states: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The Patchscope lens: every (layer, position) row in one staged forward, then the logits."""
    arch = reslens.adapter(model)
    scope = Patchscope(model, tokenizer=tokenizer, batch_size=batch_size)
    with torch.no_grad():
        final = scope.translate_rows(list(enumerate(states)))
        return arch.logits(torch.cat(final))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="source positions (the loop's batch size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = reslens.load_model("smollm2")
    arch = reslens.adapter(model)
    ids = tokenizer(SOURCE)["input_ids"][: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"--tokens {args.tokens}: the source text has {len(ids)} tokens")
    res = reslens.capture(model, torch.tensor([ids]), sites=("resid",))
    states = res.resid[:, 0]  # [n_layer + 1, N, d_model]
    scope = Patchscope(model, tokenizer=tokenizer)
    target, position = scope.target_ids, scope.position
    n = states.shape[0] * states.shape[1]
    print(f"SmolLM2: {arch.n_layer} layers, {len(ids)} source tokens, {states.shape[0]} source layers "
          f"({n} cells), target {PROMPTS['token_identity'][0]!r} = {len(target)} tokens, patched at "
          f"{position}; torch {torch.__version__}, {args.threads} threads, {platform.machine()}, "
          f"load {os.getloadavg()[0]:.2f}")
    cases = {
        "batched": lambda: batched(model, tokenizer, states, 4096),
        "batched, batch = tokens": lambda: batched(model, tokenizer, states, len(ids)),
        "per-layer loop": lambda: loop(model, target, position, states),
    }
    cases["batched"]()  # a warm-up (the loop's first forward is a small part of its time)
    times: dict[str, list[float]] = {name: [] for name in cases}
    outputs = {}
    for _ in range(args.repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            outputs[name] = case()
            times[name].append(time.perf_counter() - start)
    reference = outputs["per-layer loop"].float()
    for name in ("batched", "batched, batch = tokens"):
        diff = (outputs[name].float() - reference).abs().max() / reference.abs().max()
        print(f"{name}: max |logit difference| against the loop {float(diff):.2e} (relative to max |logit|)")
    medians = {name: statistics.median(t) for name, t in times.items()}
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    print(f"\ncommit {commit}; medians of {args.repeats} interleaved repeats (s), load after "
          f"{os.getloadavg()[0]:.2f}")
    print("| case | median s | all repeats | loop ÷ case |")
    print("|---|---|---|---|")
    for name, median in medians.items():
        shown = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {median:.2f} | {shown} | {medians['per-layer loop'] / median:.1f}x |")


if __name__ == "__main__":
    main()
