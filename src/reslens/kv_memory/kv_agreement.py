"""Key-value agreement (Geva et al. 2021, Figs. 4-5).

Does a key's value predict the token that follows the key's top trigger? Read from a
:class:`~reslens.kv_memory.TriggerIndex` and the MLP values; no forward runs. When the top
trigger's coefficient is negative (gated MLPs, a signed index) the memory wrote ``-v``, so the
value's *bottom* token is the one it promoted, and that is the token compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from reslens._checks import check_bool, check_int
from reslens._saving import Saveable
from reslens.arch import adapter
from reslens._text import html_table, pandas
from reslens.kv_memory.mining import model_fingerprint
from reslens.kv_memory.neurons import convention, value_directions, vocab_scores
from reslens.kv_memory.triggers import TriggerIndex

__all__ = ["KeyValueAgreement", "agreement"]

_HEADER = ("layer", "keys", "m < 0", "agreement", "x random", "shuffled", "opposite", "median rank")


@dataclass(frozen=True, repr=False)
class KeyValueAgreement(Saveable):
    """Does a key's value predict the token that follows the key's top trigger (Geva et al. Figs. 4-5)?

    For every mined key: ``next_token`` = the token after the activating token of its top
    trigger (``-1`` when the trigger ends its example: such keys are left out), the token the
    value promotes under ``convention`` and the next token's ``rank`` among the value's
    vocabulary scores from that side (0 = that token). The side is the top trigger's sign: a
    positive coefficient writes ``+v`` and promotes the value's top token; a negative one
    (``negative``, only in a signed index, i.e. a gated MLP's) writes ``-v`` and promotes its
    bottom token, so there ``value_top`` holds the bottom token and ``rank`` counts from the
    bottom. An unsigned index (GELU keys ranked by ``m`` itself, as Geva et al.) always reads
    the top side: its top score is the key's largest coefficient, and a negative largest
    coefficient is a key that barely fired, not one that wrote ``-v`` strongly.
    ``L = len(layers)``.

    - ``next_token``, ``value_top``, ``rank``: ``[L, d_mlp]`` (``-1`` = no next token)
    - ``negative: [L, d_mlp]`` bool: the top trigger's coefficient is negative (signed index)
    - ``value_other: [L, d_mlp]``: the value's token on the other side (the one the memory
      pushes down: its bottom token, or its top one where ``negative``); :meth:`opposite` is
      how often that is the next token (memories that suppress what follows their trigger)
    - ``agreement: [L]``: fraction of keys with ``value_top == next_token``
    - ``n_keys: [L]``: keys with a next token; ``baseline`` = ``1 / d_vocab`` (a random top token)
    - ``shuffled: [L]``: the agreement when each key's next token is paired with another key's
      value (mean over ``n_shuffles`` permutations within the layer): the chance level given
      how often frequent tokens such as ``' the'`` top both lists, a stricter baseline than ``1/|V|``
    """

    layers: tuple[int, ...]
    next_token: torch.Tensor
    value_top: torch.Tensor
    rank: torch.Tensor
    agreement: torch.Tensor
    n_keys: torch.Tensor
    shuffled: torch.Tensor
    d_vocab: int
    convention: str
    negative: torch.Tensor = None  # type: ignore[assignment]  # None: all False (a result saved before)
    value_other: torch.Tensor = None  # type: ignore[assignment]  # None: -1, unknown (a result saved before)

    def __post_init__(self) -> None:
        shape = tuple(self.next_token.shape)
        if len(shape) != 2 or shape[0] != len(self.layers):
            raise ValueError(f"next_token has shape {shape}; expected [len(layers), d_mlp]")
        if self.negative is None:  # a result saved before gated MLPs: every key read on the top side
            object.__setattr__(self, "negative", torch.zeros(shape, dtype=torch.bool))
        if self.value_other is None:
            object.__setattr__(self, "value_other", torch.full(shape, -1, dtype=torch.long))
        for name in ("value_top", "rank", "negative", "value_other"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected {shape}")
        for name in ("agreement", "n_keys", "shuffled"):
            if tuple(getattr(self, name).shape) != (len(self.layers),):
                got = tuple(getattr(self, name).shape)
                raise ValueError(f"{name} has shape {got}; expected ({len(self.layers)},)")

    @property
    def baseline(self) -> float:
        """The random baseline ``1 / d_vocab``."""
        return 1.0 / self.d_vocab

    def median_rank(self) -> torch.Tensor:
        """``[L]`` median rank of the next token in the value's distribution (valid keys only)."""
        nan = torch.tensor(float("nan"))
        return torch.stack([r[r >= 0].float().median() if bool((r >= 0).any()) else nan for r in self.rank])

    def to_frame(self):
        """``pandas.DataFrame``: one row per layer."""
        pd = pandas("KeyValueAgreement.to_frame")
        return pd.DataFrame({
            "layer": list(self.layers), "keys": self.n_keys.numpy(),
            "negative_keys": self.n_negative().numpy(), "agreement": self.agreement.numpy(),
            "opposite": self.opposite().numpy(),
            "baseline": self.baseline, "ratio_to_baseline": (self.agreement / self.baseline).numpy(),
            "shuffled": self.shuffled.numpy(), "median_rank": self.median_rank().numpy(),
        })

    def opposite(self) -> torch.Tensor:
        """``[L]``: fraction of keys whose value pushes *down* the token after their top trigger.

        The other side of :attr:`agreement`: ``value_other == next_token`` (suppression, e.g. in
        a model's last layers); compare it with ``agreement`` and the shuffled baseline.
        """
        valid = self.next_token >= 0
        return ((self.value_other == self.next_token) & valid).sum(-1).float() / valid.sum(-1).clamp(min=1)

    def n_negative(self) -> torch.Tensor:
        """``[L]``: keys (with a next token) whose top trigger's coefficient is negative."""
        return (self.negative & (self.next_token >= 0)).sum(-1)

    def _rows(self) -> list[tuple[str, ...]]:
        median, negative, opposite = self.median_rank(), self.n_negative(), self.opposite()
        return [(str(layer), str(int(self.n_keys[r])), str(int(negative[r])),
                 f"{float(self.agreement[r]):.4f}", f"{float(self.agreement[r]) / self.baseline:.1f}",
                 f"{float(self.shuffled[r]):.4f}", f"{float(opposite[r]):.4f}", f"{float(median[r]):.0f}")
                for r, layer in enumerate(self.layers)]

    def table(self) -> str:
        """One line per layer: keys, negative top triggers, agreement, x random, shuffled, median rank."""
        widths = (5, 6, 6, 10, 9, 9, 9, 12)
        head = " ".join(f"{h:>{w}}" for h, w in zip(_HEADER, widths))
        lines = [f"value's token (top; bottom where the top trigger's m < 0) == token after the top trigger "
                 f"({self.convention}); random = 1/{self.d_vocab}, shuffled = values paired with other keys' "
                 "next tokens, opposite = the value's other side == next token (suppression)",
                 head, "-" * len(head)]
        lines += [" ".join(f"{cell:>{w}}" for cell, w in zip(row, widths)) for row in self._rows()]
        return "\n".join(lines)

    def plot(self, *, ax=None):
        """The agreement per layer and the next token's rank (see :func:`reslens.plot.plot_agreement`)."""
        from reslens.plot import plot_agreement

        return plot_agreement(self, ax=ax)

    def __repr__(self) -> str:
        best = int(self.agreement.argmax()) if len(self.layers) else 0
        return (f"KeyValueAgreement(layers={list(self.layers)}, {self.convention}, best layer "
                f"{self.layers[best]}: {float(self.agreement[best]):.4f} vs random {self.baseline:.2g})")

    def _repr_html_(self) -> str:
        return html_table(f"KeyValueAgreement ({self.convention}; random = 1/{self.d_vocab})",
                          _HEADER, self._rows())


def _next_tokens(index: TriggerIndex) -> torch.Tensor:
    """``[L, d_mlp]``: the token after each key's top trigger (``-1`` when there is none)."""
    n_layers, d_mlp = len(index.layers), index.d_mlp
    example, position = index.example[..., 0], index.position[..., 0]  # [L, d_mlp]
    if not len(index.example_ids):
        return torch.full((n_layers, d_mlp), -1, dtype=torch.long)
    # example_ids are sorted: find each example's offset
    slot = torch.searchsorted(index.example_ids, example.clamp(min=0)).clamp(max=len(index.example_ids) - 1)
    after = index.example_offsets[slot] + position + 1
    valid = (example >= 0) & (after < index.example_offsets[slot + 1])
    return torch.where(valid, index.example_tokens[after.clamp(0, len(index.example_tokens) - 1)], -1)


def _check_model(index: TriggerIndex, arch: Any) -> None:
    sizes = {"n_layer": arch.n_layer, "d_mlp": arch.d_mlp, "d_vocab": arch.d_vocab}
    mined = {"n_layer": index.n_layer, "d_mlp": index.d_mlp, "d_vocab": index.d_vocab}
    if mined != sizes:
        raise ValueError(f"index was mined on a model with {mined}; this model has {sizes}")
    if index.model_fingerprint and model_fingerprint(arch, index.layers) != index.model_fingerprint:
        raise ValueError(f"index was mined on a model with other weights ({index.model_name or 'unnamed'}): "
                         "the sizes match, but the weights that shape its keys differ")


def agreement(
    index: TriggerIndex, model: Any, *, through_final_norm: bool = False, n_shuffles: int = 100,
    seed: int = 0, chunk_size: int = 256, cosine: bool = False,
) -> KeyValueAgreement:
    """Per layer, the fraction of keys whose value promotes the token after their top trigger.

    Values are read as ``W_U v`` (Geva et al.) or, with ``through_final_norm=True``,
    ``W_U final_norm(v)``; under an MLP output norm (Gemma 2/3, OLMo 2) ``v`` is the direction the
    value writes, ``γ_out ⊙ v`` (:func:`~reslens.kv_memory.value_directions`); ``cosine=True`` reads
    them by their cosine with the unembedding rows instead (the norm-aware readout, which keeps the
    rows of largest norm from topping every value: :func:`~reslens.kv_memory.vocab_scores`).
    The token a value promotes is its top token, or, where the top
    trigger of a signed index (a gated MLP's, see :func:`~reslens.kv_memory.mine_triggers`)
    has a negative coefficient, its bottom token: ``m < 0`` writes ``-v``, whose top token is
    ``v``'s bottom one (exactly so for the raw ``W_U v``; with the final norm, RMSNorm has no
    centring or bias and ``final_norm(-v) = -final_norm(v)`` too, while LayerNorm's bias
    breaks the symmetry; GPT-2's index is unsigned, so this does not arise there). Two
    baselines: ``1/|V|`` (Geva et al.'s) and ``shuffled`` (next tokens permuted across the
    layer's keys, ``n_shuffles >= 1`` times, seeded). The model must be the one the index was
    mined on (same sizes and, when the index records it, the same weights behind the keys).
    """
    if not isinstance(index, TriggerIndex):
        raise TypeError(f"index must be a TriggerIndex (from mine_triggers or TriggerIndex.load); "
                        f"got {type(index).__name__}")
    arch = adapter(model)
    check_bool(through_final_norm, "through_final_norm")
    check_bool(cosine, "cosine")
    check_int(n_shuffles, "n_shuffles", low=1)
    check_int(seed, "seed")
    check_int(chunk_size, "chunk_size", low=1)
    _check_model(index, arch)
    next_token = _next_tokens(index)
    negative = (index.scores[..., 0] < 0) & (index.example[..., 0] >= 0) if index.signed else (
        torch.zeros(next_token.shape, dtype=torch.bool))
    readout = (through_final_norm, cosine)
    value_top, value_other, rank = _value_sides(arch, index, next_token, negative, readout, chunk_size)
    valid = next_token >= 0
    n_keys = valid.sum(-1)
    hits = ((value_top == next_token) & valid).sum(-1)
    gen = torch.Generator().manual_seed(seed)
    shuffled = torch.zeros(len(index.layers))
    for r in range(len(index.layers)):
        keys_ = valid[r].nonzero().flatten()
        for _ in range(n_shuffles if len(keys_) else 0):
            perm = keys_[torch.randperm(len(keys_), generator=gen)]
            shuffled[r] += (value_top[r, keys_] == next_token[r, perm]).float().mean() / n_shuffles
    return KeyValueAgreement(
        layers=index.layers, next_token=next_token, value_top=value_top, rank=rank,
        agreement=hits.float() / n_keys.clamp(min=1), n_keys=n_keys, shuffled=shuffled, d_vocab=arch.d_vocab,
        convention=convention(through_final_norm, arch.out_norm("mlp", index.layers[0]) is not None, cosine),
        negative=negative, value_other=value_other,
    )


def _value_sides(arch: Any, index: TriggerIndex, next_token: torch.Tensor, negative: torch.Tensor,
                 readout: tuple[bool, bool], chunk_size: int) -> tuple[torch.Tensor, ...]:
    """``(value_top, value_other, rank)`` ``[L, d_mlp]``: promoted and suppressed tokens, next token's rank.

    The promoted token is the top one, or the bottom one where ``negative``; the rank counts
    from that side (``-1`` without a next token). ``readout``: ``(through_final_norm, cosine)``.
    """
    n_layers, d_mlp = len(index.layers), index.d_mlp
    value_top = torch.full((n_layers, d_mlp), -1, dtype=torch.long)
    value_other = torch.full((n_layers, d_mlp), -1, dtype=torch.long)
    rank = torch.full((n_layers, d_mlp), -1, dtype=torch.long)
    with torch.no_grad():
        for r, layer in enumerate(index.layers):
            for start in range(0, d_mlp, chunk_size):
                part = slice(start, start + chunk_size)
                rows = torch.arange(start, min(start + chunk_size, d_mlp))
                scores = vocab_scores(arch, value_directions(arch, layer, rows), *readout).cpu()
                nxt, neg = next_token[r, part], negative[r, part]
                valid = nxt >= 0
                target = scores.gather(-1, nxt.clamp(min=0)[:, None])
                top, bottom = scores.argmax(-1), scores.argmin(-1)
                if bool(neg.any()):
                    value_top[r, part] = torch.where(neg, bottom, top)
                    value_other[r, part] = torch.where(neg, top, bottom)
                    ranks = torch.where(neg, (scores < target).sum(-1), (scores > target).sum(-1))
                else:  # an unsigned index, or no negative trigger here: as Geva et al.
                    value_top[r, part], value_other[r, part] = top, bottom
                    ranks = (scores > target).sum(-1)
                rank[r, part] = torch.where(valid, ranks, -1)
    return value_top, value_other, rank
