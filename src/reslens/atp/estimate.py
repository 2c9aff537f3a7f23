"""Attribution patching (Nanda 2023; Kramár et al. 2024) that checks itself by exact patches.

:func:`attribution_patching` estimates, for every component, the effect on a metric of patching that
component's corrupted activation into the clean run: ``grad(metric)|clean · (a_corrupt - a_clean)``,
one corrupted forward, one clean forward and one backward (``method="atp"``), or with the gradient
averaged over ``steps`` midpoints of the straight path from the clean to the corrupted embedding
(``method="ig"``, integrated gradients as in EAP-IG, Hanna et al. 2024: ``steps`` forwards and
backwards more). Then it patches the top candidates of each kind and a random sample of the rest
exactly, a chunk of them per forward (:mod:`reslens.atp._exact`), and returns both side by side.

The corruption is a second batch of the same shape (e.g. another name, random tokens), or Gaussian
noise on the embedding of ``span`` as in causal tracing (:class:`reslens.tracing.Noise`; the clean batch
is then repeated ``samples`` times, row ``s * batch + b`` holding draw ``s``).
"""

from __future__ import annotations

from typing import Any

import torch

from reslens.atp.metrics import wide
from reslens._checks import check_choice, check_int
from reslens._inputs import Batch, as_batch
from reslens.arch import Arch, adapter
from reslens.atp._exact import Candidate, exact_effects
from reslens.atp._passes import (KINDS, States, clean_states, corrupted_states, estimates, gradient_pass,
                                 grad_keys)
from reslens.atp.result import AtPResult, KindScores
from reslens.lens._data import model_name

__all__ = ["attribution_patching"]


def _kinds(kinds: Any) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    if not isinstance(kinds, (tuple, list)) or not kinds:
        raise ValueError(f"kinds must be a non-empty tuple of {KINDS}; got {kinds!r}")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kinds: {kind!r} is not one of {KINDS}")
    return tuple(k for k in KINDS if k in kinds)


def _repeat(batch: Batch, n: int) -> Batch:
    if n == 1:
        return batch
    return Batch(batch.input_ids.repeat(n, 1), batch.attention_mask.repeat(n, 1),
                 batch.position_ids.repeat(n, 1), batch.special_mask.repeat(n, 1))


def _corruption(arch: Arch, batch: Batch, corrupt: Any, noise: Any, span: Any,
                tokenizer: Any) -> tuple[Batch, Batch, Any]:
    """``(clean batch, corrupted batch, resid-0 edit or None)`` as the passes run them."""
    if (corrupt is None) == (noise is None):
        raise ValueError("give exactly one corruption: corrupt= (a second batch of the clean batch's "
                         "shape) or noise= (a reslens.tracing.Noise, with span=); got "
                         f"corrupt={type(corrupt).__name__}, noise={noise!r}")
    if corrupt is not None:
        other = as_batch(corrupt, arch, tokenizer)
        if other.input_ids.shape != batch.input_ids.shape:
            raise ValueError(f"corrupt is {tuple(other.input_ids.shape)} (batch, pos); the clean batch is "
                             f"{tuple(batch.input_ids.shape)}: patching needs the same positions")
        if not torch.equal(other.attention_mask, batch.attention_mask):
            raise ValueError("corrupt has another padding (attention_mask) than the clean batch; "
                             "pad both alike")
        return batch, other, None
    from reslens.tracing import Noise
    from reslens.tracing._engine import draw_noise
    from reslens.tracing.trace import embedding_std

    if not isinstance(noise, Noise):
        raise TypeError(f"noise must be a reslens.tracing.Noise; got {type(noise).__name__}")
    n_pos = batch.input_ids.shape[1]
    ok = isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(x, int) for x in span)
    if not ok or not 0 <= span[0] < span[1] <= n_pos:
        raise ValueError(f"span must be (start, end) positions with 0 <= start < end <= {n_pos}; "
                         f"got {span!r}")
    std = noise.embedding_std
    std = (embedding_std(arch, batch.input_ids[:, span[0]:span[1]]) if std is None else
           embedding_std(arch) if std == "vocab" else float(std))
    drawn = draw_noise(arch, noise.samples, tuple(span), noise.scale * std, noise.seed)  # [samples, span, d]
    rows = _repeat(batch, noise.samples)
    shift = torch.zeros((rows.input_ids.shape[0], n_pos, arch.d_model), dtype=torch.float32,
                        device=arch.device)
    shift[:, span[0]:span[1]] = drawn.repeat_interleave(batch.input_ids.shape[0], 0)
    return rows, rows, lambda x: x + shift.to(x.dtype)


def _name(metric: Any) -> str:
    """The metric as text: the repr of reslens's metrics, a function's name, or the class's."""
    if hasattr(metric, "positions"):
        return repr(metric)
    return getattr(metric, "__name__", type(metric).__name__)


def _candidates(rank: dict[str, torch.Tensor], verify: int, sample: int,
                seed: int) -> tuple[list[Candidate], list[bool]]:
    """Per kind, the ``verify`` largest ``rank`` scores and ``sample`` others drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    cands, top = [], []
    for kind, t in rank.items():
        t2 = t[:, None] if t.ndim == 1 else t
        flat = t2.reshape(-1)
        order = flat.argsort(descending=True)
        k = min(verify, flat.numel())
        rest = order[k:]
        drawn = rest[torch.randperm(rest.numel(), generator=gen)[: min(sample, rest.numel())]]
        for i, is_top in [(int(i), True) for i in order[:k]] + [(int(i), False) for i in drawn]:
            cands.append((kind, i // t2.shape[1], i % t2.shape[1]))
            top.append(is_top)
    return cands, top


def _graddrop(est: dict[str, torch.Tensor], dropped: list[dict[str, torch.Tensor]]) -> dict:
    """``Σ_l |AtP with block l's gradient dropped - AtP|`` per component, over the blocks after its own.

    Drop ``l`` gates the gradient into block ``l``'s attention and MLP outputs, so it removes the paths
    through that block; a component of block ``l`` itself is not counted there (its gradient is read
    before the MLP's gate, after the heads'), so every kind counts the paths through later blocks only.
    """
    out = {}
    for kind, base in est.items():
        total = torch.zeros_like(base)
        for layer, d in enumerate(dropped):
            diff = (d[kind] - base).abs()
            if kind != "resid":
                diff[layer] = 0  # the block's own components
            total += diff
        out[kind] = total
    return out


def _gradients(arch: Arch, batch: Batch, kinds: tuple[str, ...], metric: Any, method: str, steps: int,
               corrupt_st: States, on_drop: Any, extra: tuple = ()) -> tuple[dict, States, Any, float]:
    """``(grads, clean states, metric as bound, clean value)`` of AtP or integrated gradients.

    AtP: one gradient pass at the clean run; IG: ``steps`` passes, at the midpoints of the straight path from
    the clean to the corrupted embedding (``resid`` layer 0), the gradients averaged. ``extra``: more
    ``(site, layer)`` keys whose gradients to return.
    """
    keys = list(dict.fromkeys([*grad_keys(arch, kinds), *extra]))
    if method == "atp":
        gp = gradient_pass(arch, batch, keys, metric, kinds=kinds, keep=True, on_drop=on_drop)
        return gp.grads, gp.states, gp.metric, gp.value
    clean_st = clean_states(arch, batch, kinds)
    with torch.no_grad():
        logits = wide(arch.unembed(clean_st.final))
        metric = metric.bind(logits) if hasattr(metric, "bind") else metric
        clean_value = float(metric(logits))
    del logits
    d0 = wide(corrupt_st.sites[("resid", 0)]) - wide(clean_st.sites[("resid", 0)])
    grads: dict = {}
    for k in range(steps):
        shift = (k + 0.5) / steps * d0  # the midpoint of the k-th of `steps` equal segments
        gp = gradient_pass(arch, batch, keys, metric, kinds=kinds, shift=shift, keep=False)
        for key, g in gp.grads.items():
            grads[key] = grads.get(key, 0) + wide(g) / steps
    return grads, clean_st, metric, clean_value


def attribution_patching(
    model: Any,
    clean: Any,
    corrupt: Any = None,
    *,
    metric: Any,
    noise: Any = None,
    span: Any = None,
    kinds: Any = KINDS,
    method: str = "atp",
    steps: int = 8,
    verify: int = 20,
    sample: int = 10,
    seed: int = 0,
    batch_size: int = 64,
    graddrop: bool = False,
    tokenizer: Any = None,
) -> AtPResult:
    """Estimate every component's patching effect on ``metric``, and verify the top ones exactly.

    ``clean``, ``corrupt``: inputs of the same shape (ids, a Batch, texts with ``tokenizer=``); or
    ``noise=Noise(...)`` with ``span=(start, end)`` instead of ``corrupt``. ``metric``: ``fn(logits
    [batch, pos, d_vocab]) -> scalar`` (:mod:`reslens.atp.metrics`). ``kinds``: of ``heads``, ``mlp``,
    ``memories``, ``resid``. ``method``: ``"atp"`` or ``"ig"`` (``steps`` points). ``verify``/``sample``:
    per kind, the top candidates and the random others patched exactly (0 and 0: no verification);
    ``batch_size``: rows per verification forward. ``graddrop``: also AtP*'s GradDrop scores (one more
    backward per block, ``method="atp"`` only); candidates are then ranked by ``max(|estimate|, GradDrop)``.
    The model's weights never get a gradient.

    >>> import torch, reslens
    >>> from reslens.atp import attribution_patching, logit_diff
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> r = attribution_patching(model, torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]]),
    ...                          metric=logit_diff(7, 8), kinds="heads", verify=2, sample=1)
    >>> tuple(r.heads.shape), len(r.checked_kind)
    ((2, 2), 3)
    """
    arch = adapter(model)
    if not callable(metric):
        raise TypeError(f"metric must be a callable fn(logits) -> scalar tensor; got {type(metric).__name__}")
    kinds = _kinds(kinds)
    check_choice(method, ("atp", "ig"), "method")
    steps = check_int(steps, "steps", low=1)
    verify, sample = check_int(verify, "verify", low=0), check_int(sample, "sample", low=0)
    batch_size = check_int(batch_size, "batch_size", low=1)
    if graddrop and method != "atp":
        raise ValueError(f"graddrop=True goes with method='atp' (AtP*); got method={method!r}")
    batch = as_batch(clean, arch, tokenizer)
    batch, other, resid0_edit = _corruption(arch, batch, corrupt, noise, span, tokenizer)
    corrupt_st = corrupted_states(arch, other, kinds, resid0_edit)
    dropped: list[dict[str, torch.Tensor]] = []
    on_drop = ((lambda layer, g, states: dropped.append(estimates(arch, kinds, g, states, corrupt_st)))
               if graddrop else None)
    grads, clean_st, metric, clean_value = _gradients(arch, batch, kinds, metric, method, steps, corrupt_st,
                                                      on_drop)
    with torch.no_grad():
        corrupt_value = float(metric(wide(arch.unembed(corrupt_st.final))))
    est = estimates(arch, kinds, grads, clean_st, corrupt_st)
    scores = _graddrop(est, dropped) if graddrop else None
    rank = {k: v.abs() if scores is None else torch.maximum(v.abs(), scores[k]) for k, v in est.items()}
    cands, top = _candidates(rank, verify, sample, seed) if verify + sample else ([], [])
    exact = (exact_effects(arch, batch, cands, metric, clean_st, corrupt_st, batch_size=batch_size)
             if cands else torch.zeros(0))
    lookup = [float((est[k][:, None] if est[k].ndim == 1 else est[k])[lay, i]) for k, lay, i in cands]
    return AtPResult(
        method=method, steps=steps if method == "ig" else 1, metric=_name(metric),
        clean_metric=clean_value, corrupt_metric=corrupt_value,
        heads=est.get("heads"), mlp=est.get("mlp"), memories=est.get("memories"), resid=est.get("resid"),
        checked_kind=tuple(k for k, _, _ in cands),
        checked_layer=torch.tensor([lay for _, lay, _ in cands], dtype=torch.long),
        checked_index=torch.tensor([i for _, _, i in cands], dtype=torch.long),
        checked_estimate=torch.tensor(lookup, dtype=torch.float32),
        checked_exact=wide(exact), checked_top=torch.tensor(top, dtype=torch.bool),
        graddrop=None if scores is None else KindScores(**scores),
        model=model_name(arch), model_fingerprint=arch.fingerprint,
    )
