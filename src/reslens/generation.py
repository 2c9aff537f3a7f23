"""The lens in motion: HuggingFace generation with the KV cache, every position recorded as it is computed.

:func:`generate` runs ``model.generate`` itself (greedy or sampled, batched and left-padded, stop
tokens, any logits processor HF offers) inside a recorder that keeps the requested sites of every
forward step, and ``patches`` (:func:`reslens.patch` edits: steering along a direction, an ablation)
applied at every step. The steps are joined along the positions into one
:class:`~reslens.residuals.Residuals` over the whole sequence that equals one full forward over the
final sequence (to float rounding: the cached steps compute the same sums in other orders); nothing is
run twice. The token sampled last is run once more through the cache, so the last position is recorded
too (its lens row reads what the model would write next).

Rows stop at their first stop token (``eos_token_id`` or ``stop=``): what ``model.generate`` writes after
it (pads, while other rows go on) is marked as padding in the result's ``attention_mask``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch

from reslens._checks import check_dtype, check_int, check_layers, check_sites
from reslens._hooking import cache_length, takes_start
from reslens._inputs import Batch, as_batch, pad_token_id, positions_from_mask
from reslens._saving import Saveable
from reslens._text import html_table
from reslens._tokens import token_id
from reslens.arch import Arch, adapter
from reslens.hooks import Patch, Trace
from reslens.lens.result import LensResult, _check_lens, lens_of
from reslens.lens.values import LogitLens
from reslens.residuals import SITES, Residuals

__all__ = ["Generation", "generate", "GENERATE_SITES"]

#: Sites :func:`generate` records: all but ``attn_pattern``, whose row at a cached step needs the keys of
#: every earlier position, which the step's attention input does not hold.
GENERATE_SITES = tuple(site for site in SITES if site != "attn_pattern")

#: ``model.generate`` options that reorder or multiply the rows between steps, so one row's steps would
#: not be one sequence
_REFUSED = ("num_beams", "num_return_sequences", "assistant_model", "prompt_lookup_num_tokens", "use_cache",
            "past_key_values", "cache", "return_dict_in_generate", "streamer", "attention_mask",
            "position_ids")


@dataclass(frozen=True, repr=False)
class Generation(Saveable):
    """What :func:`generate` wrote and recorded.

    - ``residuals``: the sites over the whole left-padded sequence ``[batch, prompt + new]``, as one full
      forward over ``sequences`` records them; ``residuals.attention_mask`` marks the real tokens (the
      prompt's, then the new ones up to and including each row's stop token)
    - ``prompt_length``: the padded prompt's width (the first new token is at this column)
    - ``new_tokens``: per row, how many tokens it wrote (its stop token included)
    - ``stopped``: per row, whether it ended at a stop token (else at ``max_new_tokens``)
    - ``texts``: per row, the new text (with a tokenizer), else ``()``
    - ``lens``: the :class:`~reslens.lens.LensResult` of the whole sequence when asked for (``lens=``)
    """

    residuals: Residuals
    prompt_length: int
    new_tokens: tuple[int, ...]
    stopped: tuple[bool, ...]
    texts: tuple[str, ...] = ()
    lens: LensResult | None = None

    @property
    def sequences(self) -> torch.Tensor:
        """The token ids ``[batch, prompt + new]`` (left-padded prompt, then the new tokens)."""
        return self.residuals.input_ids

    def new_ids(self, seq: int = 0) -> list[int]:
        """The ids row ``seq`` wrote (its stop token included)."""
        start = self.prompt_length
        return self.sequences[seq, start : start + self.new_tokens[seq]].tolist()

    def __repr__(self) -> str:
        batch, n_pos = self.residuals.shape
        shown = f", text 0 {self.texts[0][:40]!r}" if self.texts else ""
        return (f"Generation({batch} rows, prompt {self.prompt_length} columns, new tokens "
                f"{list(self.new_tokens)}{shown}; {self.residuals!r})")

    def _repr_html_(self) -> str:
        rows = [(seq, self.new_tokens[seq], "stop token" if self.stopped[seq] else "max_new_tokens",
                 self.texts[seq] if self.texts else " ".join(map(str, self.new_ids(seq)[:24])))
                for seq in range(len(self.new_tokens))]
        note = f"prompt width {self.prompt_length}; recorded: {', '.join(self.residuals.sites)}" + (
            f"; lens: {self.lens.lens_name}" if self.lens is not None else "")
        return html_table("Generation", ("row", "new tokens", "ended by", "new text"), rows, note=note)


class _Recorder(Trace):
    """A trace that keeps every forward of a generation (the prompt, then one step per token) in order."""

    def _setup(self, *args: Any, **kwargs: Any) -> None:
        super()._setup(*args, **kwargs)
        self.steps: list[dict[str, torch.Tensor]] = []
        self._seen = 0  # positions recorded so far: the cache length the next forward must continue

    def _on_forward_start(self, args: tuple, kwargs: dict) -> None:
        inputs = self.arch.forward_inputs(args, kwargs)
        cached = cache_length(inputs.cache)
        if cached != self._seen:
            raise RuntimeError(f"internal error: a forward continues a cache of {cached} tokens; the "
                               f"recorder holds {self._seen}")
        self._reset(inputs.input_ids, inputs.attention_mask, inputs.position_ids)

    def _finish(self) -> None:
        tensors = {site: buffer.result() for site, buffer in self._buffers.items()}
        for site in ("final", "logits"):
            if site in tensors:
                tensors[site] = tensors[site][0]
        self.steps.append(tensors)
        self._seen += self._inputs[0].shape[1]

    def joined(self) -> dict[str, torch.Tensor]:
        """Every site over all positions recorded: the steps joined along the position dimension."""
        return {site: torch.cat([step[site] for step in self.steps], dim=-2 if site in ("final", "logits")
                                else 2) for site in self.sites}


def _pad_id(arch: Arch, tokenizer: Any) -> int:
    """The id generation pads with: the tokenizer's, else the model's generation config's, else 0."""
    if tokenizer is not None:
        return pad_token_id(tokenizer)
    config = getattr(arch.model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def _left_padded(batch: Batch, pad: int) -> Batch:
    """``batch`` with every row's real tokens moved to the right end (what generation needs), pads ``pad``."""
    mask = batch.attention_mask
    lengths, first = mask.sum(-1), mask.long().argmax(-1)
    starts = (mask[:, 1:] & ~mask[:, :-1]).sum(-1) + mask[:, 0].long()  # runs of real tokens per row
    if bool((starts != 1).any()):
        raise ValueError("inputs: every row needs one run of real tokens (padding only before or after it)")
    width = mask.shape[1]
    ids, special = torch.full_like(batch.input_ids, pad), torch.zeros_like(mask)
    new_mask = torch.zeros_like(mask)
    for row in range(mask.shape[0]):
        n, f = int(lengths[row]), int(first[row])
        ids[row, width - n:] = batch.input_ids[row, f : f + n]
        special[row, width - n:] = batch.special_mask[row, f : f + n]
        new_mask[row, width - n:] = True
    return Batch(ids, new_mask, None, special)


def _stop_ids(stop: Any, arch: Arch, tokenizer: Any) -> list[int]:
    """The stop tokens: ``stop`` (ids or one-token texts), else the model's end-of-sequence ids."""
    if stop is None:
        config = getattr(arch.model, "generation_config", None) or arch.config
        eos = getattr(config, "eos_token_id", None)
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if isinstance(stop, (int, str)) or (isinstance(stop, torch.Tensor) and stop.ndim == 0):
        stop = [stop]
    if isinstance(stop, torch.Tensor):
        stop = stop.tolist()
    return [token_id(s, d_vocab=arch.d_vocab, tokenizer=tokenizer, name="stop") for s in stop]


def _check_patches(patches: Any) -> dict:
    """``patches`` as :func:`reslens.patch` edits of every step (a function without ``start`` ignores it)."""
    if patches is None:
        return {}
    if not isinstance(patches, Mapping):
        raise TypeError(f"patches must be a mapping {{(site, layer): fn}} as reslens.patch takes; got "
                        f"{type(patches).__name__}")
    out = {}
    for key, fn in patches.items():
        if not callable(fn):
            raise TypeError(f"patches[{key!r}] must be a function of the site's tensor; "
                            f"got {type(fn).__name__}")
        out[key] = fn if takes_start(fn) else (lambda t, start, fn=fn: fn(t))
    return out


def _check_kwargs(kwargs: dict) -> None:
    refused = sorted(set(kwargs) & set(_REFUSED))
    if refused:
        raise ValueError(f"generate() records one row per sequence through the KV cache and sets the cache, "
                         f"mask and positions itself; it does not take {refused}")


def generate(
    model: Any,
    inputs: Any,
    *,
    max_new_tokens: int,
    tokenizer: Any = None,
    sites: Any = ("resid",),
    layers: Any = None,
    lens: Any = None,
    top_k: int = 5,
    patches: Mapping[tuple[str, int], Any] | None = None,
    stop: Any = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    **generate_kwargs: Any,
) -> Generation:
    """Generate with the KV cache and record ``sites`` at every position; optionally the lens of it all.

    ``inputs``: texts with ``tokenizer=``, ids ``[batch, pos]``, a :class:`~reslens.Batch` or a tokenizer
    output (padding on either side: rows are left-padded for generation). ``max_new_tokens``: the most
    tokens a row writes. ``sites`` (any of :data:`GENERATE_SITES`) and ``layers`` as in
    :func:`reslens.capture`. ``lens``: ``None`` (none), ``"logit"`` or a learned lens from
    :mod:`reslens.lens`: its :class:`~reslens.lens.LensResult` over the whole sequence (``top_k`` per
    cell, targets the next token) is computed from the recorded residuals, no forward again.
    ``patches``: :func:`reslens.patch` edits applied at every step; a function with a parameter ``start``
    gets the column of its tensor's first entry (the prompt's forward starts at 0, step ``i`` at
    ``prompt + i``), one without it is applied to each step's tensor alone (right for what acts on each
    position alone: adding a direction, zeroing a site). ``stop``: stop tokens (ids or one-token texts;
    default the model's end-of-sequence ids). ``seed``: sampling draws from it (the global RNG is left
    as it was). Other keywords go to ``model.generate`` (``do_sample=True``, ``temperature``, ``top_p``,
    ...; the sampling ``top_k`` is ``generation_top_k``); beam search is refused.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, stop=[], lens="logit")
    >>> tuple(out.residuals.resid.shape), out.new_tokens, out.lens.row_labels
    ((3, 1, 7, 16), (4,), ['0', '1', '2'])
    """
    arch = adapter(model)
    check_int(max_new_tokens, "max_new_tokens", low=1)
    sites = check_sites(sites, GENERATE_SITES, name="sites")
    if "generation_top_k" in generate_kwargs:
        generate_kwargs["top_k"] = generate_kwargs.pop("generation_top_k")
    _check_kwargs(generate_kwargs)
    edits = _check_patches(patches)
    batch = _left_padded(as_batch(inputs, arch, tokenizer), _pad_id(arch, tokenizer))
    total = batch.input_ids.shape[1] + max_new_tokens
    if total > arch.n_ctx:
        raise ValueError(f"max_new_tokens={max_new_tokens} after a prompt of {batch.input_ids.shape[1]} "
                         f"columns exceeds the model's context of {arch.n_ctx} positions")
    kept = check_layers(layers, arch.n_layer, what=f"a {arch.n_layer}-layer model's residual stream")
    if lens is not None:  # checked now, read after the generation
        lens = _check_lens(LogitLens() if lens == "logit" else lens, arch, ("resid",))
        check_int(top_k, "top_k", low=1, high=arch.d_vocab)
        sites, kept = ("resid", *(s for s in sites if s != "resid")), tuple(sorted({*kept, arch.n_layer}))
    recorder = _Recorder._checked(arch, sites, kept, check_dtype(dtype), None, True)
    stops = _stop_ids(stop, arch, tokenizer)
    sequences = _run(arch, batch, recorder, edits, stops, max_new_tokens, seed, generate_kwargs, tokenizer)
    return _result(arch, batch, recorder, sequences, stops, tokenizer, lens, top_k)


def _run(arch: Arch, batch: Batch, recorder: _Recorder, edits: dict, stops: list[int], max_new_tokens: int,
         seed: int | None, kwargs: dict, tokenizer: Any) -> torch.Tensor:
    """``model.generate`` inside the patch and the recorder, then the last token through the cache."""
    model = arch.model
    logits = "logits" in recorder.sites and arch.lm_head is not None
    options = dict(max_new_tokens=max_new_tokens, use_cache=True, return_dict_in_generate=True,
                   eos_token_id=stops or None, pad_token_id=_pad_id(arch, tokenizer), **kwargs)
    if logits and "logits_to_keep" in inspect.signature(model.forward).parameters:
        options["logits_to_keep"] = 0  # every prompt position's logits, not the last only
    mask = batch.attention_mask.long()
    devices = [arch.device] if arch.device.type == "cuda" else []
    fork = torch.random.fork_rng(devices=devices) if seed is not None else nullcontext()
    with fork, Patch(arch, edits), recorder, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=batch.input_ids, attention_mask=mask, **options)
        sequences = out.sequences
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], sequences.shape[1] - mask.shape[1])], -1)
        position = positions_from_mask(full_mask)[:, -1:]
        runner = model if logits else arch.body
        key = "cache" if "cache" in inspect.signature(runner.forward).parameters else "past_key_values"
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # the old name (< 5.25)
        runner(input_ids=sequences[:, -1:], attention_mask=full_mask, position_ids=position, use_cache=True,
               **{key: cache})
    return sequences


def _result(arch: Arch, batch: Batch, recorder: _Recorder, sequences: torch.Tensor, stops: list[int],
            tokenizer: Any, lens: Any, top_k: int) -> Generation:
    prompt = batch.input_ids.shape[1]
    new = sequences[:, prompt:]
    is_stop = torch.isin(new, torch.tensor(stops or [-1], device=new.device))
    stopped = is_stop.any(-1)
    # a row is real up to and including its first stop token
    real_new = (is_stop.long().cumsum(-1) - is_stop.long()) == 0
    mask = torch.cat([batch.attention_mask, real_new], -1)
    special = torch.cat([batch.special_mask, torch.zeros_like(real_new)], -1)
    tensors = recorder.joined()
    on = arch.device
    res = Residuals(attention_mask=mask.to(on), layers=recorder.layers, blocks=recorder.blocks,
                    input_ids=sequences.to(on), position_ids=positions_from_mask(mask).to(on),
                    special_mask=special.to(on) if bool(special.any()) else None, **tensors)
    counts = tuple(int(n) for n in real_new.sum(-1))
    texts = () if tokenizer is None else tuple(
        tokenizer.decode(sequences[row, prompt : prompt + n].tolist()) for row, n in enumerate(counts))
    result = Generation(res, prompt, counts, tuple(bool(s) for s in stopped), texts)
    if lens is not None:
        result = replace(result, lens=lens_of(res, arch, lens=lens, top_k=top_k, tokenizer=tokenizer))
    return result
