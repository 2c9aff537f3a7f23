"""Frozen results of the pre-refactor reslens (commit 8098230) on two Llama-family models.

THE RULE (as in tests/frozen_results.py): the numbers in ``tests/fixtures/llama_frozen.safetensors``
and ``tests/fixtures/smollm2_frozen.safetensors`` were computed by the code at commit 8098230 and
are never regenerated after it. When a refactor changes a public API (``reslens.lens`` becoming a
package, ``LensResult.lens`` renamed ``lens_name``, ``kv.contributions`` renamed, ``Arch`` made an
abstract base, a corpus pass moved into one stream, ...), adapt ONLY the calls and the extraction
code in the per-area helpers below (``_capture``, ``_lens``, ``_lens_stats``, ``_pca``, ``_kv``,
``_lenses``, ``_rome``) so that they compute the same quantities and return them under the same keys,
shapes and dtypes. Never edit the fixtures, never rerun ``tests/make_llama_frozen_fixture.py`` on a
later commit, and never change the inputs here (texts, sentences, slices of ``TEXT``, seeds, sizes,
the tiny model's config and weights): ``tests/test_frozen_llama.py`` asserts bit-for-bit equality with
the fixtures, and a difference means the refactor changed a number.

The two models both read text without a start token (the embedded GPT-2 tokenizer and SmolLM2's add
none), so a refactor that makes every pass follow the tokenizer's start-token convention must leave
every number here unchanged:

- ``"llama"``: a tiny seeded random ``LlamaForCausalLM`` (3 layers, d_model 32, grouped-query
  attention, untied head, vocabulary 50257) built by :func:`tiny_llama`, whose weights are drawn
  here from one seeded generator (not by transformers' initialiser), read with the embedded GPT-2
  tokenizer from ``reslens.load_model()``;
- ``"smollm2"``: the real SmolLM2-135M-Instruct, ``reslens.load_model("smollm2")`` (cached).

``compute_llama_frozen(kind)`` returns a flat ``dict[str, torch.Tensor]`` keyed
``"<area>/<call>/<field>"`` with the conventions of frozen_results.py (CPU contiguous tensors, bool
as uint8, Python ints int64, floats float64). A tensor too large to store whole (more than
``_WHOLE`` elements: SmolLM2's captures, shortcut weights, second moments, ...) is stored as a
fingerprint instead (:func:`_put_big`): ``<key>/sha256`` (the SHA-256 of its dtype, shape and bytes
as 32 uint8, NaNs made one pattern first: bit equality of the whole tensor as ``bits_equal`` reads
it), ``<key>/shape``, ``<key>/sample`` (every ``stride``-th element, for a readable diff) and
``<key>/sum`` (float64). It runs with ``torch.set_num_threads(_THREADS)`` and the global RNG forked
(both restored afterwards).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable

import torch

from frozen_results import TEXT, _put, _tensor, _text

__all__ = ["KINDS", "AREAS", "compute_llama_frozen", "tiny_llama", "TEXT"]

#: Intra-op threads used while computing (restored afterwards).
_THREADS = 1
#: Tensors with more elements than this are stored as a fingerprint (see the module docstring).
_WHOLE = 16384
_SAMPLES = 1024

#: Short sentences written for this fixture (no corpus text).
SENTENCES = [
    "The old lighthouse keeper climbed the stairs every night to light the lamp.",
    "Two plus two is four, and three plus three is",
    "She opened the letter, read it twice, and",
]

#: Sizes per model (SmolLM2's part stays well under a minute on one thread). ``text_*`` are
#: ``(start, stop)`` character slices of TEXT; a list of slices is a list of texts.
SIZES: dict[str, dict[str, Any]] = {
    "llama": dict(
        lens_layers=[0, 1, 3],
        kv_layer=2,
        stats_texts=[(0, 800), (800, 1600)],
        stats_max_length=32,
        stats_layers=[1, 2, 3],
        pca_texts=[(0, 3000), (3000, 5000)],
        pca_n=24,
        pca_max_length=32,
        mine_texts=[(0, 3500), (3500, 6000)],
        mine_layers=None,
        mine_window=24,
        shortcut_texts=[(0, 4000)],
        shortcut_max_tokens=500,
        shortcut_max_length=32,
        compare_texts=[(6000, 8000)],
        compare_max_tokens=300,
        tuned_max_tokens=256,
        tuned_tokens_per_step=64,
        tuned_max_length=32,
        rome_texts=[(0, 3000), (3000, 6000)],
        rome_layers=(0, 2),
        rome_max_tokens=800,
    ),
    "smollm2": dict(
        lens_layers=[0, 10, 20, 30],
        kv_layer=29,
        stats_texts=[(0, 300), (300, 600)],
        stats_max_length=64,
        stats_layers=[0, 5, 15, 29, 30],
        pca_texts=[(0, 1200), (1200, 2000)],
        pca_n=16,
        pca_max_length=64,
        mine_texts=[(0, 1300), (1300, 2500)],
        mine_layers=[0, 14, 29],
        mine_window=32,
        shortcut_texts=[(0, 4000)],
        shortcut_max_tokens=700,
        shortcut_max_length=128,
        compare_texts=[(6000, 8000)],
        compare_max_tokens=32,
        tuned_max_tokens=64,
        tuned_tokens_per_step=32,
        tuned_max_length=32,
        rome_texts=[(0, 1500), (1500, 3000)],
        rome_layers=(3, 20),
        rome_max_tokens=500,
    ),
}
KINDS = tuple(SIZES)


# --- conversion -----------------------------------------------------------------------------


def _put_big(out: dict[str, torch.Tensor], key: str, value: Any) -> None:
    """``out[key]`` whole if it has at most ``_WHOLE`` elements, else its fingerprint (module docstring)."""
    t = _tensor(value)
    if t.numel() <= _WHOLE:
        out[key] = t
        return
    flat = t.reshape(-1)
    if flat.is_floating_point():  # one NaN bit pattern, as bits_equal ignores NaN payloads
        flat = torch.where(flat.isnan(), torch.full_like(flat, math.nan), flat)
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    out[f"{key}/sha256"] = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8).clone()
    out[f"{key}/shape"] = _tensor(list(t.shape))
    out[f"{key}/sample"] = t.reshape(-1)[:: math.ceil(t.numel() / _SAMPLES)].clone()
    out[f"{key}/sum"] = t.double().sum().reshape(())


def _put_all(out: dict[str, torch.Tensor], prefix: str, obj: Any, names: tuple[str, ...]) -> None:
    """:func:`_put_big` of ``obj.name`` for each name (``name?``: skipped when None)."""
    for name in names:
        value = getattr(obj, name.rstrip("?"))
        if value is None and name.endswith("?"):
            continue
        if value is None:
            raise ValueError(f"{prefix}/{name} is None")
        _put_big(out, f"{prefix}/{name.rstrip('?')}", value)


def _texts(slices: list[tuple[int, int]]) -> list[str]:
    text = _text()
    return [text[a:b] for a, b in slices]


# --- the tiny model ---------------------------------------------------------------------------


def tiny_llama(vocab_size: int = 50257) -> Any:
    """The tiny Llama: every weight drawn from one generator seeded 0, in parameter-name order.

    Norm weights ``1 + 0.1 N(0, 1)``, other vectors ``0.1 N(0, 1)``, matrices ``N(0, 1) / sqrt(fan_in)``
    (the last dimension; embeddings included), so nothing depends on transformers' initialiser.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=64, bos_token_id=50256,
        eos_token_id=50256, pad_token_id=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
    return model


def _load(kind: str) -> tuple[Any, Any]:
    import reslens

    if kind == "smollm2":
        return reslens.load_model("smollm2")
    _, tokenizer = reslens.load_model()  # the embedded model's GPT-2 tokenizer (no start token)
    return tiny_llama(len(tokenizer)), tokenizer


# --- per-area extraction (adapt ONLY these to a refactored API) -----------------------------

_CAPTURE_SITES = ("resid", "resid_mid", "attn_out", "mlp_out", "mlp_act", "attn_pattern")


def _capture(model: Any, tokenizer: Any, sizes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """reslens.tokenize (left-padded) and reslens.capture of every block site."""
    import reslens

    out: dict[str, torch.Tensor] = {}
    batch = reslens.tokenize(tokenizer, SENTENCES, padding_side="left")
    _put(out, "capture/batch", batch, ("input_ids", "attention_mask", "position_ids"))
    res = reslens.capture(model, batch, sites=_CAPTURE_SITES)
    for site in _CAPTURE_SITES:
        _put_big(out, f"capture/{site}", getattr(res, site))
        _put_big(out, f"capture/{site}/last", getattr(res, site)[..., -1, :])  # the last position
    return out


_LENS_FIELDS = (
    "input_ids", "attention_mask", "targets?", "top_ids", "top_probs", "target_logprob?", "target_rank?",
    "entropy", "kl_final_layer", "kl_layer_final", "js", "max_prob", "final_top1_prob", "final_top1",
    "convergence_layer",
)  # fmt: skip


def _put_lens(out: dict[str, torch.Tensor], prefix: str, lens: Any) -> None:
    """Every numeric field of a LensResult, and its rows (layer, whether resid_mid)."""
    _put_all(out, prefix, lens, _LENS_FIELDS)
    out[f"{prefix}/row_layer"] = _tensor(list(lens.layer_of_row))
    out[f"{prefix}/row_is_resid_mid"] = _tensor([int(s == "resid_mid") for s in lens.site_of_row])


def _lens(model: Any, tokenizer: Any, sizes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """reslens.lens.logit_lens: text batch with both sites, a left-padded subset, no targets."""
    import reslens
    from reslens.lens import logit_lens

    out: dict[str, torch.Tensor] = {}
    calls = {
        "both_sites": dict(
            inputs=SENTENCES[:2], kwargs=dict(tokenizer=tokenizer, sites=("resid", "resid_mid"))
        ),
        "left_subset": dict(
            inputs=reslens.tokenize(tokenizer, SENTENCES[1:], padding_side="left"),
            kwargs=dict(layers=sizes["lens_layers"], top_k=3, sites=("resid",)),
        ),
        "no_targets": dict(
            inputs=[SENTENCES[2]],
            kwargs=dict(tokenizer=tokenizer, sites=("resid_mid",), targets=None, chunk_size=32),
        ),
    }
    for name, call in calls.items():
        _put_lens(out, f"lens/{name}", logit_lens(model, call["inputs"], **call["kwargs"]))
    return out


def _put_stats(out: dict[str, torch.Tensor], prefix: str, stats: Any) -> None:
    from reslens.lens import METRICS

    for metric in METRICS:
        out[f"{prefix}/mean/{metric}"] = _tensor(getattr(stats.mean, metric))
        out[f"{prefix}/quantiles/{metric}"] = _tensor(getattr(stats.quantiles, metric))
    _put(
        out,
        prefix,
        stats,
        ("top1_agreement", "input_token_top1", "n_tokens", "n_sequences", "exact_quantiles", "n_non_finite"),
    )
    out[f"{prefix}/layers"] = _tensor(list(stats.layers))
    out[f"{prefix}/quantile_levels"] = _tensor(list(stats.quantile_levels))


def _lens_stats(model: Any, tokenizer: Any, sizes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """reslens.lens_stats.lens_stats over two slices of TEXT: all layers (exact quantiles), and a
    layer subset with other levels from a 50-position sample (the reservoir)."""
    from reslens.lens_stats import lens_stats

    out: dict[str, torch.Tensor] = {}
    texts = _texts(sizes["stats_texts"])
    common = dict(tokenizer=tokenizer, max_length=sizes["stats_max_length"], progress=False)
    _put_stats(out, "lens_stats/all", lens_stats(model, texts, batch_size=4, **common))
    sampled = lens_stats(
        model,
        texts,
        layers=sizes["stats_layers"],
        quantiles=(0.05, 0.5, 0.95),
        max_samples=50,
        batch_size=3,
        **common,
    )
    _put_stats(out, "lens_stats/sampled", sampled)
    return out


_TRAJECTORY_FIELDS = (
    "seq", "pos", "explained_variance_ratio", "pc1", "final_prediction", "pc1_top_token", "pc1_final_rank",
    "pc1_top_token_raw", "pc1_final_rank_raw", "pc1_top_token_flipped",
)  # fmt: skip
_CONDITION_FIELDS = (
    "explained_variance_ratio", "pc1_top_token", "pc1_final_rank", "pc1_top_token_raw", "pc1_final_rank_raw",
    "pc1_top_token_flipped", "match", "match_raw", "match_flipped",
)  # fmt: skip


def _pca(model: Any, tokenizer: Any, sizes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """reslens.pca.pca_experiment (seed 0) on two slices of TEXT, and trajectory_pca of the sentences."""
    import reslens
    from reslens.pca import CONDITIONS, pca_experiment, trajectory_pca

    out: dict[str, torch.Tensor] = {}
    experiment = pca_experiment(
        model,
        tokenizer,
        _texts(sizes["pca_texts"]),
        n=sizes["pca_n"],
        seed=0,
        max_length=sizes["pca_max_length"],
        batch_size=4,
        progress=False,
    )
    out["pca/experiment/examples"] = _tensor(experiment.examples)
    out["pca/experiment/final_prediction"] = _tensor(experiment.final_prediction)
    for condition, _, _ in CONDITIONS:
        _put_all(out, f"pca/experiment/{condition}", experiment.condition(condition), _CONDITION_FIELDS)

    batch = reslens.tokenize(tokenizer, SENTENCES, padding_side="right")
    for name, kwargs in (("last", dict()), ("all_final_norm", dict(positions="all", normalize="final_norm"))):
        r = trajectory_pca(model, batch, **kwargs)
        _put_all(out, f"pca/trajectory/{name}", r, _TRAJECTORY_FIELDS)
        out[f"pca/trajectory/{name}/layers"] = _tensor(list(r.layers))
    return out


_INDEX_FIELDS = (
    "scores", "example", "position", "example_ids", "example_offsets", "example_tokens", "n_examples",
    "n_tokens", "top_k", "window", "signed",
)  # fmt: skip
_CONTRIBUTION_FIELDS = (
    "layer", "seq", "position", "coefficients", "value_norms", "magnitude", "bias", "order", "token_effect?",
)  # fmt: skip


def _kv(model: Any, tokenizer: Any, sizes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """reslens.kv_memory: mine_triggers (sentences; windows; unsigned), contributions, agreement (tiny)."""
    import reslens
    from reslens import kv_memory as kv

    out: dict[str, torch.Tensor] = {}
    texts = _texts(sizes["mine_texts"])
    calls = {
        "sentence": dict(unit="sentence", top_k=3, batch_size=8),
        "window": dict(unit="window", window=sizes["mine_window"], top_k=3, batch_size=4),
        "unsigned_max_tokens": dict(unit="sentence", top_k=2, batch_size=16, signed=False, max_tokens=300),
    }
    for name, kwargs in calls.items():
        index = kv.mine_triggers(
            model, tokenizer, texts, layers=sizes["mine_layers"], progress=False, **kwargs
        )
        _put_all(out, f"kv/mine/{name}", index, _INDEX_FIELDS)
        out[f"kv/mine/{name}/layers"] = _tensor(list(index.layers))
        out[f"kv/mine/{name}/start_ids"] = _tensor(list(index.start_ids))
        if sizes["mine_layers"] is None:  # the tiny model: agreement of values with their triggers
            a = kv.agreement(index, model)
            _put_all(
                out, f"kv/agreement/{name}", a, ("next_token", "value_top", "rank", "agreement", "n_keys")
            )

    batch = reslens.tokenize(tokenizer, SENTENCES[:2], padding_side="right")
    res = reslens.capture(model, batch, sites=("mlp_act", "resid"))
    said = tokenizer(" said", add_special_tokens=False)["input_ids"][0]
    last = sizes["kv_layer"]
    for name, kwargs in (
        ("magnitude", dict(layer=1, position=None)),
        ("token_raw", dict(layer=last, position=None, seq=1, token=said)),
        ("token_final_norm", dict(layer=last, position=3, token=said, through_final_norm=True)),
    ):
        c = kv.contributions(model, res, **kwargs)
        _put_all(out, f"kv/contributions/{name}", c, _CONTRIBUTION_FIELDS)
        _put_big(out, f"kv/contributions/{name}/total", c.total())
    return out


def _lenses(model: Any, tokenizer: Any, sizes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """reslens.lenses: fit_shortcut, the lens read through it, compare_lenses, a short train_tuned_lens."""
    from reslens.lens import logit_lens
    from reslens.lenses import compare_lenses, fit_shortcut, train_tuned_lens

    out: dict[str, torch.Tensor] = {}
    shortcut = fit_shortcut(
        model,
        _texts(sizes["shortcut_texts"]),
        tokenizer=tokenizer,
        max_tokens=sizes["shortcut_max_tokens"],
        max_length=sizes["shortcut_max_length"],
        batch_size=4,
        progress=False,
    )
    _put_all(out, "lenses/shortcut", shortcut, ("weight", "bias"))
    out["lenses/shortcut/n_tokens"] = _tensor(shortcut.config["n_tokens"])
    _put_lens(
        out, "lenses/shortcut_lens", logit_lens(model, SENTENCES[:2], tokenizer=tokenizer, lens=shortcut)
    )

    held_out = _texts(sizes["compare_texts"])
    comparison = compare_lenses(
        model,
        held_out,
        [None, shortcut],
        tokenizer=tokenizer,
        max_tokens=sizes["compare_max_tokens"],
        max_length=32,
        batch_size=2,
        progress=False,
    )
    _put_all(
        out, "lenses/compare", comparison, ("kl_final_layer", "cross_entropy", "top1_agreement", "n_tokens")
    )
    out["lenses/compare/layers"] = _tensor(list(comparison.layers))

    tuned = train_tuned_lens(
        model,
        _texts(sizes["shortcut_texts"]),
        tokenizer=tokenizer,
        max_tokens=sizes["tuned_max_tokens"],
        tokens_per_step=sizes["tuned_tokens_per_step"],
        max_length=sizes["tuned_max_length"],
        batch_size=2,
        chunk_size=16,
        progress=False,
    )
    _put_all(out, "lenses/tuned", tuned, ("weight", "bias"))
    out["lenses/tuned/loss"] = _tensor(torch.tensor(tuned.config["loss"], dtype=torch.float64))
    out["lenses/tuned/steps"] = _tensor(tuned.config["steps"])
    out["lenses/tuned/n_tokens"] = _tensor(tuned.config["n_tokens"])
    return out


def _rome(model: Any, tokenizer: Any, sizes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """reslens.rome: SecondMoment.compute and mlp_key_second_moment on two slices of TEXT."""
    from reslens.rome import SecondMoment, mlp_key_second_moment

    out: dict[str, torch.Tensor] = {}
    texts = _texts(sizes["rome_texts"])
    first, second = sizes["rome_layers"]
    stats = SecondMoment.compute(
        model, first, texts, tokenizer=tokenizer, max_tokens=sizes["rome_max_tokens"]
    )
    _put_all(out, "rome/second_moment", stats, ("mom2", "n_tokens", "layer"))
    _put_big(out, "rome/second_moment/mom2_diagonal", stats.mom2.diagonal())
    mom2 = mlp_key_second_moment(
        model,
        second,
        texts,
        tokenizer=tokenizer,
        max_tokens=sizes["rome_max_tokens"],
        max_length=48,
        batch_size=3,
    )
    _put_big(out, "rome/mlp_key_second_moment/mom2", mom2)
    _put_big(out, "rome/mlp_key_second_moment/mom2_diagonal", mom2.diagonal())
    return out


#: The areas, in the order they run.
AREAS: dict[str, Callable[[Any, Any, dict[str, Any]], dict[str, torch.Tensor]]] = {
    "capture": _capture,
    "lens": _lens,
    "lens_stats": _lens_stats,
    "pca": _pca,
    "kv": _kv,
    "lenses": _lenses,
    "rome": _rome,
}


def compute_llama_frozen(model_kind: str, areas: Any = None) -> dict[str, torch.Tensor]:
    """Load model ``model_kind`` (``"llama"`` or ``"smollm2"``) and compute its frozen results.

    ``areas`` (names in :data:`AREAS`, default all) is for debugging one area at a time.
    """
    if model_kind not in SIZES:
        raise ValueError(f"model_kind must be one of {list(SIZES)}; got {model_kind!r}")
    chosen = list(AREAS) if areas is None else list(areas)
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, tokenizer = _load(model_kind)
            results: dict[str, torch.Tensor] = {}
            for area in chosen:
                for key, value in AREAS[area](model, tokenizer, SIZES[model_kind]).items():
                    if not key.startswith(area + "/") or key in results:
                        raise KeyError(f"key {key!r} of area {area!r}: keys are '<area>/...' and unique")
                    results[key] = _tensor(value)
    finally:
        torch.set_num_threads(threads)
    return results
