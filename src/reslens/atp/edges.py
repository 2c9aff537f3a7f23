"""Edge attribution patching (Syed et al. 2023; EAP-IG, Hanna et al. 2024): which writer feeds which reader.

An edge runs from an upstream component that writes the residual stream — the embedding, a head (its
``z_h @ W_O[h]``), an MLP — to a downstream reader: block ``l``'s attention input (every head's query,
key and value input together, grouped K/V included), block ``l``'s MLP input, or the logits (the final
norm's input). Its score is ``Δwrite_u · ∂metric/∂input_v``, summed over sequences and positions, where
``Δwrite_u`` is the upstream's corrupted minus clean write and the gradient is the one reaching ``v``'s
input only through ``v``. Those gradients come from the residual's: attention input of block ``l`` =
``grad(resid_l) - grad(resid_mid_l)``, MLP input = ``grad(resid_mid_l) - grad(resid_l+1)``, logits =
``grad(resid_n_layer)`` (``grad(resid_mid_l)`` is ``grad(attn_out_l)``, what attention adds to it). So an
upstream's edges sum exactly to its node estimate (:func:`~reslens.atp.attribution_patching`'s).

Refused: parallel blocks (GPT-NeoX: attention and MLP read one input, whose gradient this does not split
by reader), and families whose heads' sum passes a norm before the residual (Gemma 2/3, OLMo 2: a head's
write is not ``z_h @ W_O[h]``). Edges are estimates only; they are not verified by exact path patching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from reslens._checks import check_choice, check_int
from reslens._inputs import as_batch
from reslens._saving import Saveable
from reslens._text import html_table, pandas
from reslens.arch import adapter
from reslens.atp.estimate import _corruption, _gradients, _name
from reslens.atp.metrics import wide
from reslens.atp._passes import corrupted_states
from reslens.lens._data import model_name

__all__ = ["EdgeResult", "edge_attribution"]


@dataclass(frozen=True, repr=False)
class EdgeResult(Saveable):
    """Edge scores ``scores [n_upstream, n_downstream]`` (NaN where the reader comes before the writer).

    ``upstream``: ``"embed"``, heads ``"l.h"``, ``"mlp l"``; ``downstream``: ``"attn l"`` (block ``l``'s
    attention input), ``"mlp l"`` (its MLP input), ``"logits"``. ``model``, ``model_fingerprint``: the model
    that was read.
    """

    method: str
    steps: int
    metric: str
    clean_metric: float
    corrupt_metric: float
    upstream: tuple[str, ...]
    downstream: tuple[str, ...]
    scores: torch.Tensor
    model: str = ""
    model_fingerprint: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "upstream", tuple(self.upstream))
        object.__setattr__(self, "downstream", tuple(self.downstream))
        shape = (len(self.upstream), len(self.downstream))
        if tuple(self.scores.shape) != shape:
            raise ValueError(f"scores has shape {tuple(self.scores.shape)}; expected {shape}")

    @property
    def node_totals(self) -> torch.Tensor:
        """``[n_upstream]``: each upstream's edges summed (its node estimate)."""
        return self.scores.nan_to_num(0.0).sum(1)

    def top(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` edges of largest ``|score|``: ``(upstream, downstream, score)``."""
        flat = self.scores.nan_to_num(0.0).reshape(-1)
        order = flat.abs().argsort(descending=True)[:n].tolist()
        width = len(self.downstream)
        return [(self.upstream[i // width], self.downstream[i % width], float(flat[i])) for i in order]

    def to_frame(self):
        """``pandas.DataFrame``: one row per possible edge (upstream, downstream, score)."""
        pd = pandas()
        rows = [(u, d, float(self.scores[i, j])) for i, u in enumerate(self.upstream)
                for j, d in enumerate(self.downstream) if not bool(self.scores[i, j].isnan())]
        return pd.DataFrame(rows, columns=["upstream", "downstream", "score"])

    def table(self, n: int = 15) -> str:
        """Text: the top ``n`` edges, and what to read from them."""
        total = self.corrupt_metric - self.clean_metric
        lines = [f"edge attribution ({self.method}) of {self.metric}: clean {self.clean_metric:.4f}, "
                 f"corrupted {self.corrupt_metric:.4f}, total effect {total:+.4f}",
                 f"{'upstream':<12}{'downstream':<12}{'score':>10}"]
        lines += [f"{u:<12}{d:<12}{s:>+10.4f}" for u, d, s in self.top(n)]
        lines.append("Read: an edge's score estimates the metric's change when only what the upstream writes "
                     "into that reader's input is corrupted; an upstream's edges sum to its node estimate. "
                     "Estimates, not verified: check a circuit by patching.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"EdgeResult(method={self.method!r}, metric={self.metric!r}, "
                f"upstream={len(self.upstream)}, downstream={len(self.downstream)}, "
                f"total_effect={self.corrupt_metric - self.clean_metric:+.4f})")

    def _repr_html_(self) -> str:
        return html_table(f"EdgeResult ({self.method})", ("upstream", "downstream", "score"), self.top(12),
                          note=f"({self.metric})")


def _readers(arch: Any, grads: dict) -> tuple[list[str], list[torch.Tensor], list[int]]:
    """Downstream labels, input gradients ``[rows, pos, d_model]`` and read points (see :func:`_writers`)."""
    labels, tensors, points = [], [], []
    for layer in range(arch.n_layer):
        mid = wide(grads[("attn_out", layer)])  # grad(resid_mid): attention's output is added to it
        labels += [f"attn {layer}", f"mlp {layer}"]
        tensors += [wide(grads[("resid", layer)]) - mid, mid - wide(grads[("resid", layer + 1)])]
        points += [2 * layer, 2 * layer + 1]
    return [*labels, "logits"], [*tensors, wide(grads[("resid", arch.n_layer)])], [*points, 2 * arch.n_layer]


def _writers(arch: Any, clean: Any, corrupt: Any) -> tuple[list[str], list[torch.Tensor], list[int]]:
    """Upstream labels, write deltas ``[rows, pos, d_model]`` and write points.

    Points: the embedding 0, block ``l``'s heads ``2l + 1``, its MLP ``2l + 2``; a reader at point ``r``
    (block ``l``'s attention ``2l``, its MLP ``2l + 1``, the logits ``2 n_layer``) sees writes at ``<= r``.
    """
    def delta(site: str, layer: int) -> torch.Tensor:
        return wide(corrupt.sites[(site, layer)]) - wide(clean.sites[(site, layer)])

    labels, tensors, points = ["embed"], [delta("resid", 0)], [0]
    for layer in range(arch.n_layer):
        dz = delta("attn_z", layer)
        dz = dz.view(*dz.shape[:2], arch.n_head, arch.d_head)
        w_o = wide(arch.W_O(layer).detach()).to(dz.device)  # [n_head, d_head, d_model]
        for head in range(arch.n_head):
            labels.append(f"{layer}.{head}")
            tensors.append(dz[..., head, :] @ w_o[head])
            points.append(2 * layer + 1)
        labels.append(f"mlp {layer}")
        tensors.append(delta("mlp_out", layer))
        points.append(2 * layer + 2)
    return labels, tensors, points


def edge_attribution(
    model: Any,
    clean: Any,
    corrupt: Any = None,
    *,
    metric: Any,
    noise: Any = None,
    span: Any = None,
    method: str = "atp",
    steps: int = 8,
    tokenizer: Any = None,
) -> EdgeResult:
    """Edge attribution patching between writers and readers of the residual stream (module docstring).

    Arguments as :func:`~reslens.atp.attribution_patching` (``method="ig"``: EAP-IG).

    >>> import torch
    >>> from reslens.atp import logit_diff
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> ids, other = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
    >>> r = edge_attribution(model, ids, other, metric=logit_diff(7, 8))
    >>> r.scores.shape, r.upstream[:3], r.downstream[-2:]
    (torch.Size([7, 5]), ('embed', '0.0', '0.1'), ('mlp 1', 'logits'))
    """
    arch = adapter(model)
    if not callable(metric):
        raise TypeError(f"metric must be a callable fn(logits) -> scalar tensor; got {type(metric).__name__}")
    if arch.layout.parallel:
        raise ValueError(f"edge attribution is refused on this {arch.family} model: its attention and MLP "
                         "read one input (parallel block), whose gradient is not split by reader here")
    arch.require("ov_circuit")  # a head's write must be z_h @ W_O[h]
    check_choice(method, ("atp", "ig"), "method")
    steps = check_int(steps, "steps", low=1)
    kinds = ("heads", "mlp", "resid")
    batch = as_batch(clean, arch, tokenizer)
    batch, other, resid0_edit = _corruption(arch, batch, corrupt, noise, span, tokenizer)
    corrupt_st = corrupted_states(arch, other, kinds, resid0_edit)
    extra = tuple(("attn_out", layer) for layer in range(arch.n_layer))
    grads, clean_st, metric, clean_value = _gradients(arch, batch, kinds, metric, method, steps, corrupt_st,
                                                      None, extra)
    with torch.no_grad():
        corrupt_value = float(metric(wide(arch.unembed(corrupt_st.final))))
    up, deltas, wrote = _writers(arch, clean_st, corrupt_st)
    down, inputs, read = _readers(arch, grads)
    writes = torch.stack(deltas).flatten(1)  # [n_up, rows * pos * d_model]
    scores = (writes @ torch.stack(inputs).to(writes.device).flatten(1).T).cpu()  # [n_up, n_down]
    visible = torch.tensor(read)[None, :] >= torch.tensor(wrote)[:, None]  # [n_up, n_down]
    scores = scores.masked_fill(~visible, float("nan")).float()
    return EdgeResult(method=method, steps=steps if method == "ig" else 1, metric=_name(metric),
                      clean_metric=clean_value, corrupt_metric=corrupt_value, upstream=tuple(up),
                      downstream=tuple(down), scores=scores, model=model_name(arch),
                      model_fingerprint=arch.fingerprint)
