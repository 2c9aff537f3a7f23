"""Causal traces of one prompt: :class:`Noise`, :func:`causal_trace` and :class:`TraceResult`.

The subject's token embeddings are corrupted with Gaussian noise, one clean state (or a window
of MLP / attention outputs) is restored, and the answer's probability at the last position is
measured: ``restored - corrupted`` is the *indirect effect* of that state (ROME's
``calculate_hidden_flow``). See :mod:`reslens.tracing` for where reslens follows and departs from ROME.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reslens._checks import check_choice, check_float, check_int
from reslens._prompts import (check_prompt_ids, check_span, prompt_ids, prompt_pieces, subject_span,
                              warn_unlikely_answer)
from reslens._saving import Saveable
from reslens._text import html_table, pandas, show
from reslens._tokens import decode_each, token_id
from reslens.arch import Arch, adapter
from reslens.tracing._engine import Engine, draw_noise

__all__ = ["KINDS", "Noise", "TraceResult", "causal_trace", "causal_trace_ids", "restored_prob",
           "embedding_std", "window_layers"]

#: What :func:`causal_trace` restores: block outputs (``resid`` layer ``l + 1``), or windows
#: of ``mlp_out`` / ``attn_out``.
KINDS = ("resid", "mlp", "attn")
_SITE_OF_KIND = {"resid": "resid", "mlp": "mlp_out", "attn": "attn_out"}
_SITES = ("resid", "mlp_out", "attn_out")


@dataclass(frozen=True)
class Noise:
    """How a causal trace corrupts the subject (ROME's ``noise`` and ``samples``).

    The noise ``[samples, subject tokens, d_model]`` of std ``scale x embedding_std`` is drawn
    once from ``torch.Generator().manual_seed(seed)`` and added to ``resid`` layer 0 at the
    subject's tokens in every corrupted row, so every restoration sees the same draws.

    >>> Noise(samples=4, scale=2)
    Noise(samples=4, scale=2.0, embedding_std=None, seed=0)
    """

    samples: int = 10                          # noise draws per restoration, averaged (ROME: 10)
    scale: float = 3.0                         # the noise std in units of embedding_std (ROME: 3)
    embedding_std: float | str | None = None   # None: the subject tokens' embedding std (ROME); "vocab": the
    #                                            whole token embedding's; a number: that std itself
    seed: int = 0                              # seed of the generator that draws the noise

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", check_int(self.samples, "samples", low=1))
        object.__setattr__(self, "scale", check_float(self.scale, "scale", low=0.0))
        object.__setattr__(self, "seed", check_int(self.seed, "seed"))
        std = self.embedding_std
        if isinstance(std, str):
            check_choice(std, ("vocab",), "embedding_std")
        elif std is not None:
            object.__setattr__(self, "embedding_std", check_float(std, "embedding_std", low=0.0))

    def _repr_html_(self) -> str:
        std = {None: "the subject tokens' embedding std", "vocab": "the whole token embedding's std"}
        rows = [("samples", self.samples), ("scale", self.scale),
                ("embedding_std", std.get(self.embedding_std, self.embedding_std)),  # type: ignore[arg-type]
                ("seed", self.seed)]
        return html_table("Noise", (), rows)


_LEGACY_NOISE = ("samples", "embedding_std", "seed")


def noise_of(noise: Any, legacy: dict[str, Any], where: str) -> Noise:
    """``noise`` as a :class:`Noise`; the older ``noise=3.0, samples=, embedding_std=, seed=`` still work."""
    unknown = sorted(set(legacy) - set(_LEGACY_NOISE))
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    if isinstance(noise, Noise):
        if legacy:
            raise TypeError(f"{where}(): give the noise settings once, in noise=Noise(...), not also as "
                            f"{', '.join(f'{k}=' for k in legacy)}")
        return noise
    if isinstance(noise, bool) or not isinstance(noise, (int, float)):
        raise TypeError(f"noise must be a reslens.tracing.Noise (e.g. Noise(samples=10, scale=3.0)); "
                        f"got {noise!r}")
    check_float(noise, "noise", low=0.0)  # the noise scale: named as the user gave it, not as Noise.scale
    warnings.warn(f"{where}(noise=<number>, samples=, embedding_std=, seed=) is deprecated; pass "
                  "noise=Noise(samples=..., scale=..., embedding_std=..., seed=...)", DeprecationWarning,
                  stacklevel=3)
    return Noise(scale=noise, **legacy)


def window_layers(layer: int, window: int, n_layer: int) -> range:
    """The blocks ROME restores for window cell ``layer`` (ROME's ``trace_important_window``).

    ``max(0, layer - window // 2)`` up to ``min(n_layer, layer - (-window // 2))`` (exclusive).

    >>> list(window_layers(6, 10, 12)), list(window_layers(0, 10, 12)), list(window_layers(3, 1, 12))
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 4], [3])
    """
    return range(max(0, layer - window // 2), min(n_layer, layer - (-window // 2)))


def embedding_std(model: Any, token_ids: Any = None) -> float:
    """Standard deviation of the token embeddings of ``token_ids`` (all coordinates), or of all of them.

    ROME's ``collect_embedding_std``; ``model``: a HuggingFace model or its adapter.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, hidden_size=16, n_head=2, vocab_size=50))
    >>> round(embedding_std(model), 2)  # HF initialises the token embedding with std 0.02
    0.02
    """
    w = adapter(model).W_E_in.detach()  # as the rows enter the residual (Gemma scales them)
    if token_ids is not None:
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=w.device).flatten()
        if ids.numel() == 0:
            raise ValueError("token_ids is empty")
        w = w[ids]
    return float(w.float().std())


def _noise_std(arch: Arch, ids: torch.Tensor, span: tuple[int, int], noise: Noise) -> float:
    """The embedding std ``noise.scale`` multiplies: of the subject's tokens, the vocabulary, or given."""
    if noise.embedding_std is None:
        return embedding_std(arch, ids[span[0] : span[1]])
    if noise.embedding_std == "vocab":
        return embedding_std(arch)
    return float(noise.embedding_std)


def _engine(arch: Arch, ids: torch.Tensor, span: tuple[int, int], answer_id: int,
            noise: Noise) -> tuple[Engine, float]:
    """The engine of one prompt with its noise drawn, and the embedding std the noise scales."""
    std = _noise_std(arch, ids, span, noise)
    drawn = draw_noise(arch, noise.samples, span, noise.scale * std, noise.seed)
    return Engine(arch, ids, span, answer_id, drawn), std


def _check_restoration(arch: Arch, restore: Iterable[Any], n_tokens: int) -> list[tuple[str, int, int]]:
    restoration = []
    for item in restore:
        if not (isinstance(item, tuple) and len(item) == 3):
            raise TypeError(f"restore items must be (site, layer, token) triples; got {item!r}")
        site, layer, token = item
        check_choice(site, _SITES, "restore site")
        n_max = arch.n_layer if site == "resid" else arch.n_layer - 1
        layer, token = check_int(layer, "restore layer"), check_int(token, "restore token")
        if not (0 <= layer <= n_max and 0 <= token < n_tokens):
            raise ValueError(f"restore item {item!r} is out of range (layer 0..{n_max}, "
                             f"token 0..{n_tokens - 1})")
        restoration.append((site, layer, token))
    return restoration


def restored_prob(model: Any, input_ids: Any, subject_span: tuple[int, int], answer_id: int,
                  restore: Iterable[tuple[str, int, int]] = (), *, noise: Noise | float = Noise(),
                  **legacy: Any) -> float:
    """ROME's ``trace_with_patch``: mean ``p(answer_id)`` at the last token over the corrupted runs.

    In every run, each ``(site, layer, token)`` of ``restore`` is set to its clean value. Sites:
    ``resid`` (layer ``0..n_layer``, reslens indexing), ``mlp_out``, ``attn_out``. The noise is
    the one :func:`causal_trace_ids` draws for the same :class:`Noise`.
    """
    noise = noise_of(noise, legacy, "restored_prob")
    arch = adapter(model)
    ids = check_prompt_ids(arch, input_ids)
    span = check_span(subject_span, ids.shape[0])
    answer_id = token_id(answer_id, d_vocab=arch.d_vocab, name="answer_id")
    restoration = _check_restoration(arch, restore, ids.shape[0])
    engine, _ = _engine(arch, ids, span, answer_id, noise)
    return float(engine.run([restoration], batch_size=engine.samples)[0])


# --- the result -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceResult(Saveable):
    """A causal trace of one prompt (ROME's ``calculate_hidden_flow``).

    - ``input_ids: [n_tokens]`` int64; ``tokens``: their strings; ``subject_span = (start, end)``
    - ``restored_prob: [n_layer, n_tokens]`` float32: mean p(answer) with cell ``(layer, token)``
      restored (``kind="resid"``: output of block ``layer``; ``"mlp"``/``"attn"``: the window
      of blocks around ``layer``, see :func:`window_layers`)
    - ``clean_prob``, ``corrupted_prob``: p(answer) of the clean run and of the corrupted run
    - ``noise`` (the multiplier), ``noise_std`` (the absolute noise std ``nu``), ``samples``, ``seed``,
      ``window``
    """

    kind: str
    input_ids: torch.Tensor
    tokens: tuple[str, ...]
    subject_span: tuple[int, int]
    answer_id: int
    answer: str
    restored_prob: torch.Tensor
    clean_prob: float
    corrupted_prob: float
    window: int
    samples: int
    noise: float
    noise_std: float
    seed: int

    def __post_init__(self) -> None:
        check_choice(self.kind, KINDS, "kind")
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "subject_span", tuple(int(x) for x in self.subject_span))
        if self.input_ids.ndim != 1:
            raise ValueError(f"input_ids must be [n_tokens]; got shape {tuple(self.input_ids.shape)}")
        n = self.input_ids.shape[0]
        if len(self.tokens) != n:
            raise ValueError(f"tokens has {len(self.tokens)} entries; expected {n} (one per input id)")
        if self.restored_prob.ndim != 2 or self.restored_prob.shape[1] != n:
            raise ValueError(f"restored_prob has shape {tuple(self.restored_prob.shape)}; "
                             f"expected [n_layer, {n}]")
        check_span(self.subject_span, n)

    @property
    def n_layer(self) -> int:
        """Rows of the trace: the model's blocks."""
        return self.restored_prob.shape[0]

    @property
    def n_tokens(self) -> int:
        """Columns of the trace: the prompt's tokens."""
        return self.input_ids.shape[0]

    @property
    def indirect_effect(self) -> torch.Tensor:
        """``restored_prob - corrupted_prob``: ``[n_layer, n_tokens]``."""
        return self.restored_prob - self.corrupted_prob

    @property
    def total_effect(self) -> float:
        """``clean_prob - corrupted_prob``."""
        return self.clean_prob - self.corrupted_prob

    @property
    def peak(self) -> tuple[int, int, float]:
        """``(layer, token, indirect effect)`` of the largest indirect effect."""
        ie = self.indirect_effect
        layer, token = divmod(int(ie.argmax()), self.n_tokens)
        return layer, token, float(ie[layer, token])

    @property
    def label(self) -> str:
        """What was restored, in words: hidden state, MLP or attention."""
        return {"resid": "hidden state", "mlp": "MLP", "attn": "attention"}[self.kind]

    def to_frame(self):
        """Long ``pandas.DataFrame``: one row per (layer, token) cell."""
        pd = pandas()
        start, end = self.subject_span
        layers, positions = torch.meshgrid(torch.arange(self.n_layer), torch.arange(self.n_tokens),
                                           indexing="ij")
        layers, positions = layers.flatten(), positions.flatten()
        return pd.DataFrame({
            "kind": self.kind,
            "layer": layers.numpy(),
            "pos": positions.numpy(),
            "token": [self.tokens[p] for p in positions.tolist()],
            "is_subject": ((positions >= start) & (positions < end)).numpy(),
            "restored_prob": self.restored_prob.flatten().numpy(),
            "indirect_effect": self.indirect_effect.flatten().numpy(),
        })

    def table(self, *, cell: int = 7) -> str:
        """Text heatmap: one line per token (subject tokens starred), indirect effect per layer."""
        width = max(len(show(t)) for t in self.tokens) + 2
        lines = [
            f"causal trace ({self.label}): p({show(self.answer)}) clean {self.clean_prob:.4f}, "
            f"corrupted {self.corrupted_prob:.4f}, total effect {self.total_effect:+.4f}",
            "indirect effect (restored - corrupted):",
            f"{'':<{width}}" + "".join(f"{f'L{layer}':>{cell}}" for layer in range(self.n_layer)),
        ]
        start, end = self.subject_span
        ie = self.indirect_effect
        for p, token in enumerate(self.tokens):
            mark = "*" if start <= p < end else " "
            values = "".join(f"{float(ie[layer, p]):>{cell}.3f}" for layer in range(self.n_layer))
            lines.append(f"{show(token) + mark:<{width}}" + values)
        layer, token, value = self.peak
        lines.append(f"peak: layer {layer}, token {token} ({show(self.tokens[token])!s}): {value:+.4f}")
        return "\n".join(lines)

    def plot(self, *, ax=None):
        """ROME's heatmap: tokens (subject starred) x layers, colour = p(answer) restored."""
        from reslens.plot import plot_trace

        return plot_trace(self, ax=ax)

    def explore(self, *others: TraceResult):
        """The explorer page of this trace (and ``others`` of the same prompt, e.g. MLP and attention)."""
        from reslens.explorer import explore

        return explore([self, *others])

    def __repr__(self) -> str:
        layer, token, value = self.peak
        return (
            f"TraceResult(kind={self.kind!r}, n_layer={self.n_layer}, n_tokens={self.n_tokens}, "
            f"answer={self.answer!r}, clean={self.clean_prob:.4f}, corrupted={self.corrupted_prob:.4f}, "
            f"peak=(layer {layer}, token {token}, {value:+.4f}))"
        )

    def _repr_html_(self) -> str:
        layer, token, value = self.peak
        start, end = self.subject_span
        tokens = " ".join(show(t) + ("*" if start <= i < end else "") for i, t in enumerate(self.tokens))
        rows = [("restored", self.label + (f" (window {self.window})" if self.kind != "resid" else "")),
                ("tokens", tokens), ("answer", show(self.answer)), ("clean p", self.clean_prob),
                ("corrupted p", self.corrupted_prob), ("total effect", self.total_effect),
                ("peak", f"layer {layer}, token {token} ({show(self.tokens[token])}): {value:+.4f}"),
                ("noise", f"{self.samples} samples x {self.noise:g} x std = {self.noise_std:.4g}, "
                          f"seed {self.seed}")]
        title = f"TraceResult [{self.n_layer} layers x {self.n_tokens} tokens]"
        window = f" (a window of {self.window} layers)" if self.kind != "resid" else ""
        note = (f"— a causal trace: p({show(self.answer)}) with the subject (*) noised, then with the "
                f"{self.label} at one layer{window} and token restored to its clean value; the peak is the "
                "restoration that brings most of it back (.plot() draws every cell).")
        return html_table(title, ("", "value"), rows, note=note)


# --- causal_trace ---------------------------------------------------------------------------


def _cells(arch: Arch, kind: str, window: int, start: int,
           n: int) -> tuple[list[tuple[int, int]], list[list]]:
    """The traced cells ``(layer, token)`` (tokens from the subject's first on) and their restorations."""
    site = _SITE_OF_KIND[kind]
    cells = [(layer, token) for layer in range(arch.n_layer) for token in range(start, n)]
    if kind == "resid":
        return cells, [[("resid", layer + 1, token)] for layer, token in cells]
    return cells, [[(site, j, token) for j in window_layers(layer, window, arch.n_layer)]
                   for layer, token in cells]


def causal_trace_ids(model: Any, input_ids: Any, subject_span: tuple[int, int], *,
                     answer_id: int | None = None, kind: str = "resid", window: int = 10,
                     noise: Noise | float = Noise(), batch_size: int = 256, progress: bool = False,
                     tokenizer: Any = None, token_strings: Sequence[str] | None = None,
                     **legacy: Any) -> TraceResult:
    """Causal trace of a prompt given as token ids ``[pos]`` with the subject's token span.

    See :func:`causal_trace` (the string version, which calls this) and :mod:`reslens.tracing`
    for the procedure. ``batch_size`` bounds the rows (``cells x samples``) of one forward;
    ``tokenizer`` (optional) only names the tokens (``token_strings`` names them directly).

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> _ = torch.manual_seed(0)
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> result = causal_trace_ids(model, torch.tensor([5, 6, 7, 8]), (1, 3), noise=Noise(samples=4))
    >>> tuple(result.restored_prob.shape), result.subject_span
    ((2, 4), (1, 3))
    >>> abs(float(result.restored_prob[-1, -1]) - result.clean_prob) < 1e-6  # last block, last token
    True
    """
    noise = noise_of(noise, legacy, "causal_trace_ids")
    arch = adapter(model)
    if arch.model.training:
        warnings.warn("the model is in training mode, so dropout makes the trace random; call model.eval()",
                      stacklevel=2)
    kind = check_choice(kind, KINDS, "kind")
    window = check_int(window, "window", low=1)
    batch_size = check_int(batch_size, "batch_size", low=1)
    ids = check_prompt_ids(arch, input_ids)
    n = ids.shape[0]
    span = check_span(subject_span, n)
    if answer_id is None:
        with torch.no_grad():
            answer_id = int(arch.unembed(arch.final_hidden(ids[None])[0, -1]).argmax())
    answer_id = token_id(answer_id, d_vocab=arch.d_vocab, name="answer_id")

    engine, std = _engine(arch, ids, span, answer_id, noise)
    clean = engine.clean_prob()
    corrupted = float(engine.run([[]], batch_size=noise.samples)[0])
    cells, restorations = _cells(arch, kind, window, span[0], n)
    # tokens before the subject: restoring them is a no-op (the corrupted probability)
    restored = torch.full((arch.n_layer, n), corrupted, dtype=torch.float32)
    if cells:
        probs = engine.run(restorations, batch_size=batch_size, progress=progress)
        for (layer, token), p in zip(cells, probs.tolist()):
            restored[layer, token] = p

    ids_cpu = ids.cpu()
    tokens = decode_each(tokenizer, ids_cpu.tolist()) if token_strings is None else list(token_strings)
    return TraceResult(
        kind=kind, input_ids=ids_cpu, tokens=tuple(tokens), subject_span=span, answer_id=answer_id,
        answer=decode_each(tokenizer, [answer_id])[0], restored_prob=restored, clean_prob=clean,
        corrupted_prob=corrupted, window=window if kind != "resid" else 1, samples=noise.samples,
        noise=noise.scale, noise_std=noise.scale * std, seed=noise.seed,
    )


def causal_trace(model: Any, tokenizer: Any, prompt: str, subject: str, *, answer: str | int | None = None,
                 kind: str = "resid", window: int = 10, noise: Noise | float = Noise(), batch_size: int = 256,
                 progress: bool = False, **legacy: Any) -> TraceResult:
    """Causal trace (ROME) of ``prompt``: corrupt ``subject``, restore each (layer, token) cell.

    ``answer``: the token whose probability is measured, its text as it follows the prompt
    (e.g. ``" Holmes"``; it must be exactly one token, an answer of several is refused) or its id;
    ``None`` = the model's own top-1. ``kind``: ``"resid"`` restores single block outputs,
    ``"mlp"`` / ``"attn"`` windows of ``window`` MLP / attention outputs (ROME: ``l - 5 .. l + 4``
    for ``window=10``, clipped). ``noise``: a :class:`Noise` (``samples`` draws of std
    ``scale x embedding_std`` from ``seed``, the same for every cell). Returns a
    :class:`TraceResult` ``[n_layer, n_tokens]``.

    ``causal_trace(model, tokenizer, "said White", "White")`` traces the embedded model's
    top-1 " Fang" (see ``examples/causal_trace.py``).
    """
    noise = noise_of(noise, legacy, "causal_trace")
    arch = adapter(model)
    ids = prompt_ids(arch, tokenizer, prompt)
    span = subject_span(tokenizer, prompt, subject)
    answer_id = None if answer is None else token_id(answer, d_vocab=arch.d_vocab, tokenizer=tokenizer,
                                                     name="answer")
    if answer_id is not None:
        warn_unlikely_answer(arch, tokenizer, prompt, ids, answer, answer_id)
    return causal_trace_ids(
        arch, torch.tensor(ids), span, answer_id=answer_id, kind=kind, window=window, noise=noise,
        batch_size=batch_size, progress=progress, tokenizer=tokenizer,
        token_strings=prompt_pieces(tokenizer, prompt, ids),
    )

