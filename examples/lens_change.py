"""Why the lens changed: where a model's lens comes to prefer one answer over another, and what does it.

For a prompt, the logit lens's logit difference of ``--target`` against ``--against`` (also their
log-probability difference) is read at every layer, and every step ``l -> l+1`` is split into what
block ``l`` wrote — every head, the attention bias, the MLP's ``--memories`` key-value memories of
largest effect and the rest of the MLP — plus the change of the final norm's scale; the pieces sum
to the step exactly. The script prints the trajectory, the layer where the target overtakes (the
first row from which it stays ahead to the output), the step into that row piece by piece, and the
step with the largest gain, and draws the waterfall of the overtaking step.

    python examples/lens_change.py --model smollm2          # " Paris" vs " London", 30 layers
    python examples/lens_change.py                          # the embedded 4-layer GPT-2

``--index FILE`` (a saved :class:`~reslens.kv_memory.TriggerIndex` of the same model) shows each
memory piece's top trigger examples. Writes ``lens_change.png`` (the waterfall) and
``lens_change.safetensors`` (``LensChange.load`` reads it back) to ``--out-dir``.
"""

import argparse
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import reslens
from reslens.kv_memory import TriggerIndex
from reslens.lens import lens_changes


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or folder (default: the embedded GPT-2; "
                        "smollm2 for SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default="The Eiffel Tower is in the city of")
    parser.add_argument("--target", default=" Paris", help="the token whose lead is explained")
    parser.add_argument("--against", default=" London", help="the token it is compared with")
    parser.add_argument("--memories", type=int, default=5, help="memories shown per MLP (0: the MLP whole)")
    parser.add_argument("--index", type=Path, default=None, help="a saved TriggerIndex of the same model")
    parser.add_argument("--top", type=int, default=12, help="pieces printed per step")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="folder for the figure and result")
    return parser.parse_args()


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    model, tokenizer = reslens.load_model(args.model)
    index = None if args.index is None else TriggerIndex.load(args.index)
    started = time.perf_counter()
    changes = lens_changes(model, args.prompt, args.target, against=args.against, tokenizer=tokenizer,
                           memories=args.memories, index=index)
    first = changes[0]
    print(f"{reslens.adapter(model)}; {first.describe().rsplit(',', 1)[0]} "
          f"({time.perf_counter() - started:.1f} s)\n")
    print(f"{'row':>4} {'logit diff':>11} {'p(target)':>10} {'p(against)':>11}")
    for row in range(first.n_layer + 1):
        print(f"{row:>4} {float(first.logit[row]):>+11.3f} {float(first.prob[row]):>10.3g} "
              f"{float(first.against_prob[row]):>11.3g}")
    overtake = first.overtake_layer
    if overtake is None:
        print(f"\n{args.target!r} is not ahead of {args.against!r} at the output")
    elif overtake == 0:
        print(f"\n{args.target!r} is ahead of {args.against!r} from the embedding on")
    else:
        print(f"\n{args.target!r} overtakes {args.against!r} at row {overtake} and stays ahead:\n")
        print(changes[overtake - 1].table(k=args.top))
    gain = max(changes, key=lambda c: c.change)
    if not overtake or gain.start != overtake - 1:
        print(f"\nthe largest gain, rows {gain.start} -> {gain.stop}:\n")
        print(gain.table(k=args.top))
    else:
        print(f"\n(the largest gain of any step: {gain.change:+.3f})")
    shown = changes[overtake - 1] if overtake else gain
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shown.plot(k=args.top).savefig(args.out_dir / "lens_change.png", dpi=120)
    shown.save(args.out_dir / "lens_change.safetensors")
    print(f"\nwrote {args.out_dir / 'lens_change.png'} and lens_change.safetensors (rows {shown.start} -> "
          f"{shown.stop})")


if __name__ == "__main__":
    main()
