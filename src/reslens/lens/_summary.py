"""What a reader should take from a lens table: where the model's own prediction appears, layer by layer.

:func:`lens_summary` reads a :class:`~reslens.lens.LensResult` (no model): at the last real position,
the model's top-1 and its rank in every lens row (0 = top-1), the row from which it is top-1 and stays
so, and over every position the layer at which the final top-1 settles (the ``convergence_layer``).
"""

from __future__ import annotations

import textwrap
from typing import Any

from reslens._checks import check_int

__all__ = ["lens_summary", "compact_rank"]


def compact_rank(rank: int) -> str:
    """A rank in at most 4 characters: ``0``, ``87``, ``4.5k``, ``31k`` (``-`` where there is none)."""
    if rank < 0:
        return "-"
    if rank < 1000:
        return str(rank)
    return f"{rank / 1000:.1f}k" if rank < 10_000 else f"{rank // 1000}k"


def _label(site: str, layer: int) -> str:
    return f"L{layer}" if site == "resid" else f"mid {layer}"


def lens_summary(result: Any, seq: int = 0, *, width: int = 100) -> str:
    """A few lines under the table: the final prediction's rank per row, and where the rows settle.

    ``seq``: the sequence; ``width``: the line width the rank list is wrapped to.
    """
    check_int(seq, "seq", low=0, high=result.input_ids.shape[0] - 1)
    check_int(width, "width", low=40)
    real = result.attention_mask[seq].nonzero().flatten().tolist()
    last = real[-1]
    pred = int(result.final_top1[seq, last])
    lines = [f"what to read from it ({result.lens_name}):"]
    if pred < 0:
        return "\n".join([*lines, "  the model's own logits at the last position are not finite"])
    rows = list(zip(result.site_of_row, result.layer_of_row))
    shown = repr(result.token(pred))
    top = max(result.layer_of_row)  # the deepest row: the model's output where the lens read it
    deepest = next((r for r, row in enumerate(rows) if row == ("resid", top)), None)
    p_top = None if deepest is None else float(result.final_top1_prob[deepest, seq, last])
    prob = "" if p_top is None else f" (p={p_top:.3f} at L{top})"
    lines.append(f"  the model's prediction after the last token is {shown}{prob}")
    if result.final_top1_rank is not None:
        ranks = result.final_top1_rank[:, seq, last].tolist()
        cells = ", ".join(f"{_label(*row)}={compact_rank(int(r))}".replace(" ", "\u00a0")
                          for row, r in zip(rows, ranks))
        lines.append(f"  its rank in each row (0 = top-1): {cells}")  # (no-break spaces: a cell stays whole)
        first = next((_label(*row) for row, r in zip(rows, ranks) if r == 0), None)
    else:
        first = None
    settled = int(result.convergence_layer[seq, last])
    earlier = f"first top-1 at {first}; " if first is not None and first != f"L{settled}" else ""
    lines.append(f"  it is {earlier}top-1 from layer {settled} on" if settled >= 0
                 else "  no row's top-1 stays the final top-1 to the deepest row")
    layers = result.convergence_layer[seq, real]
    layers = layers[layers >= 0].sort().values
    if len(layers):
        median = int(layers[(len(layers) - 1) // 2])
        late = int((layers == top).sum())
        lines.append(f"  over the {len(real)} positions the final top-1 becomes top-1 and stays at layer "
                     f"{median} (median; {int(layers[0])}..{int(layers[-1])}"
                     + (f"; only at L{top} at {late})" if late else ")"))
    wrapped = (part for line in lines for part in textwrap.wrap(line, width, subsequent_indent="    "))
    return "\n".join(wrapped).replace("\u00a0", " ")
