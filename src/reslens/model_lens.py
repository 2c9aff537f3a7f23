"""The learned lens a model comes with: a linear shortcut fitted once on text the model writes itself.

reslens cannot ship the corpus a lens is usually fitted on, so :func:`fit_self_shortcut` lets the model
write its own: a fixed set of neutral seed prompts (:data:`SEED_PROMPTS`), continued by sampling with a
fixed seed (:func:`reslens.generate`, which records every layer's residual as it generates, equal to one
full forward), and the linear shortcut (Din et al. 2023; :mod:`reslens.lens.shortcut`) is fitted from
those recorded residuals at once: generating and fitting are one pass, nothing runs twice. Only the new
tokens are fitted on (the prompts' tokens repeat from round to round). The lens's ``config`` records
what it was fitted on: the text (self-generated), its tokens, prompts, seed and sampling, the reslens
version and the model's fingerprint, which every use checks.

Where it lives (:func:`model_lens_path`): for a model ``reslens download`` knows, beside the converted
weights in the cache (``$RESLENS_CACHE/<name>/shortcut.safetensors``), fitted when the model is first
downloaded (``reslens download NAME``, the first ``load_model(NAME)``, the first ``reslens lens --model
NAME``); for the embedded GPT-2, shipped in the package.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from reslens._checks import check_bool, check_float, check_int
from reslens.arch import adapter
from reslens.lens.values import LinearShortcut, load_lens

__all__ = ["SEED_PROMPTS", "N_TOKENS", "LENS_FILE", "fit_self_shortcut", "self_text_residuals",
           "model_lens_path", "model_lens", "fit_model_lens"]

logger = logging.getLogger(__name__)

#: what the model is asked to continue: neutral openings of stories, letters, articles, dialogue, lists
SEED_PROMPTS = (
    "The", "Once upon a time,", "Chapter 1\n\n", "Dear Sir,", "The history of", "Scientists have found that",
    "Here is a recipe for", "The old man", "It was a cold morning when", "Q: What is", "In the village of",
    "The following report", "When she opened the door,", "In 1854,", "The most important thing",
    "\"Come in,\"",
)
#: the tokens a model's lens is fitted on (:func:`fit_model_lens`): the first run's time budget (README)
N_TOKENS = 8_192
#: the file the lens is kept in, beside the model's weights
LENS_FILE = "shortcut.safetensors"
#: the sampling every self-text fit uses (transformers' sampling with its default top-k)
SAMPLING = {"do_sample": True, "temperature": 1.0, "generation_top_k": 50}


def _check_prompts(prompts: Any) -> tuple[str, ...]:
    if isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts or ()) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of non-empty texts; got {prompts!r:.80}")
    return tuple(prompts)


def _room(arch: Any, tokenizer: Any, prompts: tuple[str, ...]) -> int:
    """How many tokens the model's context leaves after the longest prompt (with its start tokens)."""
    from reslens._corpus import encode, start_ids

    width = len(start_ids(tokenizer)) + max(len(ids) for ids in encode(tokenizer, list(prompts)))
    if width >= arch.n_ctx:
        raise ValueError(f"prompts: the longest is {width} tokens; the model's context of {arch.n_ctx} "
                         "positions leaves no room to write")
    return arch.n_ctx - width


def self_text_residuals(model: Any, tokenizer: Any, *, n_tokens: int, new_tokens: int = 128,
                        batch_size: int = 32, seed: int = 0, prompts: Any = SEED_PROMPTS,
                        on_step: Callable[[int], Any] | None = None) -> Iterator[torch.Tensor]:
    """Per round of generation: ``resid: [n_layer + 1, tokens, d_model]`` at the tokens the model wrote.

    Round ``r`` continues ``batch_size`` prompts (``prompts`` in turn, from ``r * batch_size``) by
    ``new_tokens`` sampled tokens (:data:`SAMPLING`, seed ``seed + r``, no stop token), recorded as they
    are generated; the rounds stop at ``n_tokens`` tokens (the last round cut to fit). A model whose
    context is shorter than the longest prompt and ``new_tokens`` writes as many as its context holds.
    ``on_step``: called with ``batch_size`` at every generation step (e.g. a progress bar's ``update``).
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    from reslens.generation import generate

    class Ticker(LogitsProcessor):  # leaves the scores as they are; says that a step ran
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            on_step(scores.shape[0])
            return scores

    arch = adapter(model)
    check_int(n_tokens, "n_tokens", low=1)
    check_int(new_tokens, "new_tokens", low=1)
    check_int(batch_size, "batch_size", low=1)
    check_int(seed, "seed", low=0)
    new_tokens = min(new_tokens, _room(arch, tokenizer, _check_prompts(prompts)))
    left = n_tokens
    prompts = tuple(prompts)
    for r in range(math.ceil(n_tokens / (batch_size * new_tokens))):
        rows = [prompts[(r * batch_size + i) % len(prompts)] for i in range(batch_size)]
        ticks = {} if on_step is None else {"logits_processor": LogitsProcessorList([Ticker()])}
        out = generate(arch, rows, tokenizer=tokenizer, max_new_tokens=new_tokens, seed=seed + r, stop=[],
                       **SAMPLING, **ticks)
        res = out.residuals
        wrote = res.attention_mask.clone()
        wrote[:, : out.prompt_length] = False  # the prompts' tokens repeat: only the new ones
        resid = res.resid[:, wrote.to(res.resid.device)][:, :left]  # [L + 1, tokens, d_model]
        left -= resid.shape[1]
        yield resid
        del out, res


def fit_self_shortcut(
    model: Any,
    tokenizer: Any,
    *,
    n_tokens: int = N_TOKENS,
    new_tokens: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    prompts: Any = SEED_PROMPTS,
    ridge: float = 1e-6,
    progress: bool = True,
    name: str | None = None,
) -> LinearShortcut:
    """The linear shortcut of every layer, fitted on ``n_tokens`` tokens the model writes itself.

    The model continues ``prompts`` by sampling (see :func:`self_text_residuals`; the same ``seed`` gives
    the same text and the same lens), and each round's recorded residuals go straight into the
    shortcut's moments (:class:`~reslens.lens.ShortcutMoments`): one generation pass, no second forward.
    ``ridge`` as :func:`~reslens.lens.fit_shortcut`. ``name``: what ``config["model"]`` records (default:
    the checkpoint's name or path). The lens's ``config`` says what it was fitted on (``text``:
    ``"self-generated"``, ``n_tokens``, ``prompts``, ``seed``, ``sampling``, ``reslens_version``,
    ``model_fingerprint``) and how long the fit took (``seconds``).
    """
    from tqdm.auto import tqdm

    from reslens import __version__
    from reslens.lens._data import model_name
    from reslens.lens.shortcut import ShortcutMoments

    arch = adapter(model)
    check_int(n_tokens, "n_tokens", low=arch.d_model + 1)
    check_float(ridge, "ridge", low=0.0)
    check_bool(progress, "progress")
    prompts = _check_prompts(prompts)
    new_tokens = min(new_tokens, _room(arch, tokenizer, prompts))
    moments = ShortcutMoments(arch.n_layer, arch.d_model, arch.device)
    start = time.perf_counter()
    written = math.ceil(n_tokens / (batch_size * new_tokens)) * batch_size * new_tokens
    with tqdm(total=written, desc="the model writes, the lens is fitted", unit="tok", unit_scale=True,
              disable=not progress) as bar:
        for resid in self_text_residuals(arch, tokenizer, n_tokens=n_tokens, new_tokens=new_tokens,
                                         batch_size=batch_size, seed=seed, prompts=prompts,
                                         on_step=bar.update if progress else None):
            for part in resid.split(2048, dim=1):  # bounded temporaries in the moments' products
                moments.add(part)
    weight, bias = moments.solve(ridge)
    seconds = time.perf_counter() - start
    config = {
        "model": name or model_name(arch),
        "model_fingerprint": arch.fingerprint,
        "source": f"fitted by reslens on {moments.n:,} tokens the model wrote itself",
        "text": "self-generated",
        "n_tokens": moments.n,
        "prompts": list(prompts),
        "seed": seed,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "sampling": {k.removeprefix("generation_"): v for k, v in SAMPLING.items()},
        "ridge": ridge,
        "fit": "least squares (Din et al.)",
        "reslens_version": __version__,
        "seconds": round(seconds, 1),
    }
    return LinearShortcut(weight, bias, config)


def model_lens_path(name: str | None) -> Path:
    """Where the lens of ``name`` lives: ``None`` = the embedded GPT-2 (shipped), else the model's cache."""
    if name is None:
        return Path(__file__).resolve().parent / "data" / "embedded" / LENS_FILE
    from reslens.hub import model_dir

    return model_dir(name) / LENS_FILE


def model_lens(name: str | None, model: Any = None) -> LinearShortcut | None:
    """The lens kept for ``name`` (see :func:`model_lens_path`), or None where there is none yet.

    With ``model=``, a lens fitted on another model is refused: a ``ValueError`` naming both models and
    how to fit it again (``reslens download NAME --refit``).
    """
    path = model_lens_path(name)
    if not path.is_file():
        return None
    lens = load_lens(path)
    if model is not None:
        try:
            lens.check(adapter(model))
        except ValueError as error:
            again = "reinstall reslens" if name is None else f"reslens download {name} --refit"
            raise ValueError(f"{path}: {error}; fit it again for this model with: {again}") from None
    return lens


def fit_model_lens(name: str, model: Any, tokenizer: Any, *, progress: bool = True,
                   **options: Any) -> LinearShortcut:
    """Fit the lens of the known model ``name`` (:func:`fit_self_shortcut` with ``options``) and keep it.

    The file is written atomically beside the model's weights (:func:`model_lens_path`), replacing any
    lens there; ``name=None`` (the embedded model, whose lens ships) is refused.
    """
    if name is None:
        raise ValueError("name=None is the embedded model, whose lens ships with reslens; give a known name")
    path = model_lens_path(name)
    logger.info("fitting the linear shortcut of %s on its own text (once; kept in %s)", name, path)
    options.setdefault("n_tokens", N_TOKENS)
    lens = fit_self_shortcut(model, tokenizer, progress=progress, name=name, **options)
    lens.save(path)
    return lens
