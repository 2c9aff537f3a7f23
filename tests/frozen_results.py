"""Frozen results of the pre-refactor reslens (commit 1216a70) on the embedded GPT-2.

THE RULE: the numbers in ``tests/fixtures/gpt2_frozen.safetensors`` were computed by the
code at commit 1216a70 and are never regenerated after it. When a refactor changes a public
API (module paths, names of functions or keyword arguments, result types: a string-keyed
dict becoming a dataclass, ``through_ln_f=`` becoming ``through_final_norm=``,
``effective_embedding="wte+mlp0"`` becoming ``"embed+mlp0"``, ``kind="resid"`` becoming
``"hidden"``, new fields on LogitAttribution, ...), adapt ONLY the calls and the extraction
code in the per-area helpers below (``_capture``, ``_lens``, ``_lens_stats``, ``_pca``,
``_kv_memory``, ``_heads``, ``_tracing``) so that they compute the same quantities and return
them under the same keys, shapes and dtypes. Never edit the fixture, never rerun
``tests/make_frozen_fixture.py`` on a later commit, and never change the inputs
(texts, prompts, seeds, sizes) here: ``tests/test_frozen.py`` asserts bit-for-bit equality
with the fixture, and a difference means the refactor changed a number.

``compute_frozen_results()`` returns a flat ``dict[str, torch.Tensor]`` keyed
``"<area>/<call>/<field>"``: CPU, contiguous tensors; bool tensors are stored as uint8,
complex as ``view_as_real`` float pairs, Python ints as int64 and Python floats as float64
scalars (exact). It runs with ``torch.set_num_threads(_THREADS)`` and the global RNG forked
(both restored afterwards), so it neither depends on nor disturbs the caller's settings.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

#: Intra-op threads used while computing (restored afterwards); see make_frozen_fixture.py.
_THREADS = 1

#: The opening of Jack London's *White Fang* (public domain), as in
#: ../shared/corpus/910-white-fang.txt (Project Gutenberg 910), from "Dark spruce" on.
TEXT = """\
Dark spruce forest frowned on either side the frozen waterway.  The trees
had been stripped by a recent wind of their white covering of frost, and
they seemed to lean towards each other, black and ominous, in the fading
light.  A vast silence reigned over the land.  The land itself was a
desolation, lifeless, without movement, so lone and cold that the spirit
of it was not even that of sadness.  There was a hint in it of laughter,
but of a laughter more terrible than any sadness--a laughter that was
mirthless as the smile of the sphinx, a laughter cold as the frost and
partaking of the grimness of infallibility.  It was the masterful and
incommunicable wisdom of eternity laughing at the futility of life and
the effort of life.  It was the Wild, the savage, frozen-hearted
Northland Wild.

But there _was_ life, abroad in the land and defiant.  Down the frozen
waterway toiled a string of wolfish dogs.  Their bristly fur was rimed
with frost.  Their breath froze in the air as it left their mouths,
spouting forth in spumes of vapour that settled upon the hair of their
bodies and formed into crystals of frost.  Leather harness was on the
dogs, and leather traces attached them to a sled which dragged along
behind.  The sled was without runners.  It was made of stout birch-bark,
and its full surface rested on the snow.  The front end of the sled was
turned up, like a scroll, in order to force down and under the bore of
soft snow that surged like a wave before it.  On the sled, securely
lashed, was a long and narrow oblong box.  There were other things on the
sled--blankets, an axe, and a coffee-pot and frying-pan; but prominent,
occupying most of the space, was the long and narrow oblong box.

In advance of the dogs, on wide snowshoes, toiled a man.  At the rear of
the sled toiled a second man.  On the sled, in the box, lay a third man
whose toil was over,--a man whom the Wild had conquered and beaten down
until he would never move nor struggle again.  It is not the way of the
Wild to like movement.  Life is an offence to it, for life is movement;
and the Wild aims always to destroy movement.  It freezes the water to
prevent it running to the sea; it drives the sap out of the trees till
they are frozen to their mighty hearts; and most ferociously and terribly
of all does the Wild harry and crush into submission man--man who is the
most restless of life, ever in revolt against the dictum that all
movement must in the end come to the cessation of movement.

But at front and rear, unawed and indomitable, toiled the two men who
were not yet dead.  Their bodies were covered with fur and soft-tanned
leather.  Eyelashes and cheeks and lips were so coated with the crystals
from their frozen breath that their faces were not discernible.  This
gave them the seeming of ghostly masques, undertakers in a spectral world
at the funeral of some ghost.  But under it all they were men,
penetrating the land of desolation and mockery and silence, puny
adventurers bent on colossal adventure, pitting themselves against the
might of a world as remote and alien and pulseless as the abysses of
space.

They travelled on without speech, saving their breath for the work of
their bodies.  On every side was the silence, pressing upon them with a
tangible presence.  It affected their minds as the many atmospheres of
deep water affect the body of the diver.  It crushed them with the weight
of unending vastness and unalterable decree.  It crushed them into the
remotest recesses of their own minds, pressing out of them, like juices
from the grape, all the false ardours and exaltations and undue
self-values of the human soul, until they perceived themselves finite and
small, specks and motes, moving with weak cunning and little wisdom
amidst the play and inter-play of the great blind elements and forces.

An hour went by, and a second hour.  The pale light of the short sunless
day was beginning to fade, when a faint far cry arose on the still air.
It soared upward with a swift rush, till it reached its topmost note,
where it persisted, palpitant and tense, and then slowly died away.  It
might have been a lost soul wailing, had it not been invested with a
certain sad fierceness and hungry eagerness.  The front man turned his
head until his eyes met the eyes of the man behind.  And then, across the
narrow oblong box, each nodded to the other.

A second cry arose, piercing the silence with needle-like shrillness.
Both men located the sound.  It was to the rear, somewhere in the snow
expanse they had just traversed.  A third and answering cry arose, also
to the rear and to the left of the second cry.

"They're after us, Bill," said the man at the front.

His voice sounded hoarse and unreal, and he had spoken with apparent
effort.

"Meat is scarce," answered his comrade.  "I ain't seen a rabbit sign for
days."

Thereafter they spoke no more, though their ears were keen for the
hunting-cries that continued to rise behind them.

At the fall of darkness they swung the dogs into a cluster of spruce
trees on the edge of the waterway and made a camp.  The coffin, at the
side of the fire, served for seat and table.  The wolf-dogs, clustered on
the far side of the fire, snarled and bickered among themselves, but
evinced no inclination to stray off into the darkness.

"Seems to me, Henry, they're stayin' remarkable close to camp," Bill
commented.

Henry, squatting over the fire and settling the pot of coffee with a
piece of ice, nodded.  Nor did he speak till he had taken his seat on the
coffin and begun to eat.

"They know where their hides is safe," he said.  "They'd sooner eat grub
than be grub.  They're pretty wise, them dogs."

Bill shook his head.  "Oh, I don't know."

His comrade looked at him curiously.  "First time I ever heard you say
anything about their not bein' wise."

"Henry," said the other, munching with deliberation the beans he was
eating, "did you happen to notice the way them dogs kicked up when I was
a-feedin' 'em?"

"They did cut up more'n usual," Henry acknowledged.

"How many dogs 've we got, Henry?"

"Six."

"Well, Henry . . . " Bill stopped for a moment, in order that his words
might gain greater significance.  "As I was sayin', Henry, we've got six
dogs.  I took six fish out of the bag.  I gave one fish to each dog, an',
Henry, I was one fish short."

"You counted wrong."

"We've got six dogs," the other reiterated dispassionately.  "I took out
six fish.  One Ear didn't get no fish.  I came back to the bag afterward
an' got 'm his fish."

"We've only got six dogs," Henry said.

"Henry," Bill went on.  "I won't say they was all dogs, but there was
seven of 'm that got fish."

Henry stopped eating to glance across the fire and count the dogs.

"There's only six now," he said.

"I saw the other one run off across the snow," Bill announced with cool
positiveness.  "I saw seven."

Henry looked at him commiseratingly, and said, "I'll be almighty glad
when this trip's over."\
"""
TEXT_SHA256 = "9e72a7ac0cf483f50391568f3f91b81594749c0c98d396e5d593ddc851dcfbc3"

#: Short fixed sentences (written for this fixture) for the lens, capture and kv areas.
SENTENCES = [
    "When the old sailor came back to the inn, he asked for a glass of rum.",
    "“Yes,” said White",
    "The cat sat on the",
]
#: Causal tracing / ROME: a fact the embedded model knows (README: "said White" -> " Fang").
TRACE_PROMPT, TRACE_SUBJECT = "“Yes,” said White", "White"
EDIT_PROMPT, EDIT_SUBJECT, EDIT_ANSWER = "said White", "White", " Holmes"
EDIT_CHECK_PROMPTS = ["said White", "“Yes,” said White", "I saw White", "the White", "said Mr.", "Mr. Knight"]


# --- conversion -----------------------------------------------------------------------------


def _tensor(value: Any) -> torch.Tensor:
    """A CPU, contiguous, stored-as-is tensor from a tensor, a Python number or a list of numbers."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    elif isinstance(value, bool):
        t = torch.tensor(int(value), dtype=torch.uint8)
    elif isinstance(value, int):
        t = torch.tensor(value, dtype=torch.int64)
    elif isinstance(value, float):
        t = torch.tensor(value, dtype=torch.float64)
    elif isinstance(value, (list, tuple)):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            t = torch.tensor(list(value), dtype=torch.int64)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            t = torch.tensor([float(v) for v in value], dtype=torch.float64)
        else:
            raise TypeError(f"cannot store a list of {sorted({type(v).__name__ for v in value})}")
    else:
        raise TypeError(f"cannot store {type(value).__name__}")
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.clone().contiguous()


def _put(out: dict[str, torch.Tensor], prefix: str, obj: Any, names: list[str] | tuple[str, ...]) -> None:
    """``out[prefix/name] = obj.name`` (attribute, or key of a mapping) for each name; None is skipped
    only where the name is listed as optional with a trailing ``?``."""
    for name in names:
        optional = name.endswith("?")
        name = name.rstrip("?")
        value = obj[name] if isinstance(obj, dict) else getattr(obj, name)
        if value is None:
            if not optional:
                raise ValueError(f"{prefix}/{name} is None")
            continue
        out[f"{prefix}/{name}"] = _tensor(value)


def _text() -> str:
    digest = hashlib.sha256(TEXT.encode("utf-8")).hexdigest()
    if digest != TEXT_SHA256:
        raise AssertionError(f"TEXT was edited (sha256 {digest}); the fixture was computed from the original")
    return TEXT


def _last_logits(logits: torch.Tensor, k: int = 20) -> dict[str, torch.Tensor]:
    """Top-k ids and values, and log-sum-exp, of a ``[..., vocab]`` row (a compact, exact fingerprint)."""
    logits = logits.detach().float()
    top = logits.topk(k, dim=-1)
    return {"top_ids": top.indices, "top_values": top.values, "logsumexp": logits.logsumexp(-1)}


# --- per-area extraction (adapt ONLY these to a refactored API) -----------------------------


def _capture(model: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """reslens.tokenize / capture / patch / trace on a left-padded batch."""
    import reslens

    out: dict[str, torch.Tensor] = {}
    batch = reslens.tokenize(tokenizer, SENTENCES[:2], padding_side="left")
    _put(out, "capture/batch", batch, ("input_ids", "attention_mask", "position_ids"))
    sites = (
        "resid",
        "resid_mid",
        "attn_out",
        "mlp_out",
        "mlp_act",
        "attn_pattern",
        "attn_z",
        "final",
        "logits",
    )
    res = reslens.capture(model, batch, sites=sites)
    for site in sites:
        if site == "logits":
            for name, value in _last_logits(res.logits[:, -1]).items():
                out[f"capture/logits_last/{name}"] = _tensor(value)
        else:
            out[f"capture/{site}"] = _tensor(getattr(res, site))
    part = reslens.capture(model, batch, sites=("resid", "mlp_act"), layers=[1, 3])
    out["capture/layers13/resid"], out["capture/layers13/mlp_act"] = (
        _tensor(part.resid),
        _tensor(part.mlp_act),
    )

    ids = torch.tensor([tokenizer(SENTENCES[0], add_special_tokens=False)["input_ids"]])
    with reslens.patch(model, {("mlp_out", 2): torch.zeros_like, ("resid", 1): lambda t: t * 0.5}):
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    for name, value in _last_logits(logits[0, -1]).items():
        out[f"capture/patch/logits_last/{name}"] = _tensor(value)
    with reslens.trace(model, sites=("resid", "attn_pattern")) as tr:
        with torch.no_grad():
            model(input_ids=ids)
    _put(out, "capture/trace", tr.residuals, ("resid", "attn_pattern"))
    return out


_LENS_FIELDS = (
    "input_ids",
    "attention_mask",
    "targets?",
    "top_ids",
    "top_probs",
    "target_logprob?",
    "target_rank?",
    "entropy",
    "kl_final_layer",
    "kl_layer_final",
    "js",
    "max_prob",
    "final_top1_prob",
    "final_top1",
    "convergence_layer",
)


def _lens(model: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """reslens.lens.logit_lens: every numeric field of LensResult, plus its rows as ints."""
    import reslens
    from reslens.lens import logit_lens

    out: dict[str, torch.Tensor] = {}
    calls = {
        # text batch (right-padded by the lens), both sites, the README's call
        "both_sites": dict(inputs=SENTENCES, kwargs=dict(tokenizer=tokenizer, sites=("resid", "resid_mid"))),
        # left-padded Batch, resid only, top_k=3, a layer subset without the final layer
        "left_subset": dict(
            inputs=reslens.tokenize(tokenizer, SENTENCES[1:], padding_side="left"),
            kwargs=dict(layers=[0, 2, 3], top_k=3, sites=("resid",)),
        ),
        # no targets; a small chunk_size forces several unembedding blocks
        "no_targets": dict(
            inputs=[SENTENCES[0]],
            kwargs=dict(tokenizer=tokenizer, sites=("resid", "resid_mid"), targets=None, chunk_size=32),
        ),
    }
    for name, call in calls.items():
        lens = logit_lens(model, call["inputs"], **call["kwargs"])
        _put(out, f"lens/{name}", lens, _LENS_FIELDS)
        out[f"lens/{name}/row_layer"] = _tensor(list(lens.layer_of_row))
        out[f"lens/{name}/row_is_resid_mid"] = _tensor([int(s == "resid_mid") for s in lens.site_of_row])
    return out


def _lens_stats(model: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """reslens.lens.lens_stats on the first 2,000 characters of TEXT (windows of 48 tokens)."""
    from reslens.lens import METRICS, lens_stats

    out: dict[str, torch.Tensor] = {}
    stats = lens_stats(
        model, _text()[:2000], tokenizer=tokenizer, max_length=48, batch_size=4, progress=False
    )
    for metric in METRICS:
        out[f"lens_stats/mean/{metric}"] = _tensor(getattr(stats.mean, metric))
        out[f"lens_stats/quantiles/{metric}"] = _tensor(getattr(stats.quantiles, metric))
    # the old duplicate LensStats.final_token_prob is mean.final_top1_prob
    out["lens_stats/final_token_prob"] = _tensor(stats.mean.final_top1_prob)
    _put(
        out,
        "lens_stats",
        stats,
        (
            "top1_agreement",
            "input_token_top1",
            "n_sequences",
            "exact_quantiles",
        ),
    )
    out["lens_stats/n_positions"] = _tensor(stats.n_tokens)  # LensStats.n_positions is now n_tokens
    out["lens_stats/layers"] = _tensor(list(stats.layers))
    out["lens_stats/quantile_levels"] = _tensor(list(stats.quantile_levels))
    return out


_TRAJECTORY_FIELDS = (
    "seq",
    "pos",
    "explained_variance_ratio",
    "pc1",
    "final_prediction",
    "pc1_top_token",
    "pc1_final_rank",
    "pc1_top_token_raw",
    "pc1_final_rank_raw",
    "pc1_top_token_flipped",
)


def _pca(model: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """reslens.pca: trajectory_pca under several options, pca_experiment (n=20, seed 0), ResidualPCA."""
    import reslens
    from reslens.pca import CONDITIONS, ResidualPCA, pca_experiment, trajectory_pca

    out: dict[str, torch.Tensor] = {}
    batch = reslens.tokenize(tokenizer, SENTENCES, padding_side="right")
    calls = {
        "last": dict(),
        "all": dict(positions="all"),
        "unit": dict(normalize="unit"),
        "ln_f": dict(normalize="final_norm"),  # the option value "ln_f" is now "final_norm"
        "uncentred": dict(center=False),
        "no_embedding": dict(layers=[1, 2, 3, 4]),
        "pos3": dict(positions=3),
    }
    for name, kwargs in calls.items():
        r = trajectory_pca(model, batch, **kwargs)
        _put(out, f"pca/trajectory/{name}", r, _TRAJECTORY_FIELDS)
        out[f"pca/trajectory/{name}/layers"] = _tensor(list(r.layers))

    experiment = pca_experiment(model, tokenizer, _text(), n=20, seed=0, progress=False)
    out["pca/experiment/examples"] = _tensor(experiment.examples)
    for condition, _, _ in CONDITIONS:
        r = experiment.condition(condition)
        condition = "ln_f" if condition == "final_norm" else condition  # the condition's old name
        for field in (
            "explained_variance_ratio",
            "pc1_top_token",
            "pc1_final_rank",
            "pc1_top_token_raw",
            "pc1_final_rank_raw",
            "pc1_top_token_flipped",
            "match",
            "match_raw",
            "match_flipped",
        ):
            out[f"pca/experiment/{condition}/{field}"] = _tensor(getattr(r, field))

    res = reslens.capture(model, batch, sites=("resid",), layers=[2])
    x = res.resid[0][batch.attention_mask]  # [real tokens, d_model]
    for name, pca in (
        ("centred", ResidualPCA(n_components=4)),
        ("uncentred", ResidualPCA(n_components=4, center=False)),
    ):
        pca.fit(x)
        _put(
            out,
            f"pca/residual/{name}",
            pca,
            ("components_", "explained_variance_", "explained_variance_ratio_", "mean_"),
        )
        out[f"pca/residual/{name}/transform"] = _tensor(pca.transform(x))
    return out


def _kv_memory(model: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """reslens.kv_memory: keys/values, contributions (raw and through ln_f), value_tokens,
    deletion_neurons, edit_coefficients, mine_triggers (sentences and windows of TEXT), agreement."""
    import reslens
    from reslens import kv_memory as kv

    out: dict[str, torch.Tensor] = {}
    out["kv/keys_1"], out["kv/values_1"] = _tensor(kv.keys(model, 1)), _tensor(kv.values(model, 1))

    batch = reslens.tokenize(tokenizer, SENTENCES[:2], padding_side="right")
    res = reslens.capture(model, batch, sites=("mlp_act", "resid"))
    out["kv/coefficients_2"] = _tensor(kv.coefficients(res, 2))
    said = tokenizer(" said", add_special_tokens=False)["input_ids"][0]
    calls = {
        "magnitude_l3": dict(layer=3, position=-1),
        "token_raw_l3": dict(layer=3, position=-1, token=said),
        "token_ln_f_l3": dict(layer=3, position=-1, token=said, through_final_norm=True),
        "token_ln_f_l1_seq1": dict(layer=1, position=2, seq=1, token=said, through_final_norm=True),
        "magnitude_token_l0": dict(layer=0, position=4, token=said, rank_by="magnitude"),
    }
    for name, kwargs in calls.items():
        c = kv.contributions_of(res, model, **kwargs)
        _put(
            out,
            f"kv/contributions/{name}",
            c,
            (
                "layer",
                "seq",
                "position",
                "coefficients",
                "value_norms",
                "magnitude",
                "bias",
                "order",
                "token_effect?",
            ),
        )
        out[f"kv/contributions/{name}/total"] = _tensor(c.total())

    for name, args, kwargs in (
        ("l3_raw", (3, [17, 42, 335]), dict(k=10)),
        ("l3_ln_f", (3, [17, 42, 335]), dict(k=10, through_final_norm=True)),
        ("l0_all", (0,), dict(k=5)),
    ):
        vt = kv.value_tokens(model, *args, **kwargs)
        _put(
            out,
            f"kv/value_tokens/{name}",
            vt,
            ("neurons", "top_ids", "top_scores", "bottom_ids", "bottom_scores"),
        )

    deletion = kv.deletion_neurons(model)
    out["kv/deletion/cos"], out["kv/deletion/summary"] = _tensor(deletion.cos), _tensor(deletion.summary())

    ids = torch.tensor([tokenizer(SENTENCES[0], add_special_tokens=False)["input_ids"]])
    for name, kwargs in (("all_positions", dict()), ("positions", dict(positions=[2, -1]))):
        with kv.edit_coefficients(model, {3: {17: None, 42: 5.0}, 1: {7: -1.5}}, **kwargs):
            with torch.no_grad():
                logits = model(input_ids=ids).logits
        for field, value in _last_logits(logits[0, -1]).items():
            out[f"kv/edit_coefficients/{name}/{field}"] = _tensor(value)

    text = _text()
    for name, kwargs in (
        ("sentence", dict(unit="sentence", top_k=5, batch_size=8)),
        ("window", dict(unit="window", window=32, top_k=3, batch_size=4, layers=[0, 3])),
        ("sentence_max_tokens", dict(unit="sentence", top_k=4, batch_size=16, max_tokens=600)),
    ):
        index = kv.mine_triggers(model, tokenizer, [text[:3500], text[3500:]], progress=False, **kwargs)
        _put(
            out,
            f"kv/mine/{name}",
            index,
            (
                "scores",
                "example",
                "position",
                "example_ids",
                "example_offsets",
                "example_tokens",
                "n_examples",
                "n_tokens",
                "top_k",
                "window",
            ),
        )
        out[f"kv/mine/{name}/layers"] = _tensor(list(index.layers))
        for sub, akw in (("raw", dict()), ("ln_f", dict(through_final_norm=True, n_shuffles=20, seed=3))):
            a = kv.agreement(index, model, **akw)
            _put(
                out,
                f"kv/agreement/{name}/{sub}",
                a,
                ("next_token", "value_top", "rank", "agreement", "n_keys", "shuffled", "d_vocab"),
            )
            out[f"kv/agreement/{name}/{sub}/median_rank"] = _tensor(a.median_rank())
    return out


#: THE ONE EXCEPTION to bit equality, for the keys ``heads/ov/*`` only: issue 18 item 10 (precision).
#: ``ov_eigen_summary`` now forms ``W_U^T W_E`` and the ``d_head x d_head`` eigenproblems in float64; the
#: frozen code formed them in float32, which on this model (top singular value of ``W_U^T W_E`` 594,433 vs
#: 910 for the next) put eigenvalues off by up to 2.0e-4 of a head's largest modulus and copying scores by
#: up to 3.4e-5 (measured against a float64 reference; the float64 code is off by < 1e-7, complex64
#: rounding). So for these keys ``_heads`` checks the new numbers against the fixture with the tolerances
#: below (eigenvalues as a set per head, relative to that head's largest modulus; copying absolute) and,
#: once they pass, hands the fixture's own tensors to test_frozen.py's bit comparison. A larger difference
#: is an AssertionError naming the key. Every other key is still compared bit for bit.
OV_TOLERANCE = {"eigenvalues": 1e-3, "copying": 1e-4}


def _ov_checked_against_fixture(key: str, now: torch.Tensor) -> torch.Tensor:
    """The fixture's tensor for OV key ``key``, once ``now`` is within :data:`OV_TOLERANCE` of it."""
    from pathlib import Path

    from safetensors import safe_open

    fixture = Path(__file__).resolve().parent / "fixtures" / "gpt2_frozen.safetensors"
    with safe_open(str(fixture), framework="pt") as f:
        frozen = f.get_tensor(key)
    if frozen.shape != now.shape or frozen.dtype != now.dtype:
        raise AssertionError(
            f"{key}: frozen {frozen.dtype} {tuple(frozen.shape)}, now {now.dtype} {tuple(now.shape)}"
        )
    if key.endswith("/copying"):
        error = float((frozen.double() - now.double()).abs().max())
        tolerance = OV_TOLERANCE["copying"]
    else:  # [L, H, d_head, 2]: view_as_real of complex eigenvalues; compare as sets per head
        a, b = (torch.view_as_complex(t.contiguous()).to(torch.complex128) for t in (frozen, now))
        distance = (a[..., :, None] - b[..., None, :]).abs()  # [L, H, d_head, d_head]
        nearest = torch.maximum(distance.amin(-1).amax(-1), distance.amin(-2).amax(-1))  # [L, H]
        error = float((nearest / a.abs().amax(-1).clamp(min=1e-30)).max())
        tolerance = OV_TOLERANCE["eigenvalues"]
    if not error <= tolerance:
        raise AssertionError(f"{key}: differs from the frozen float32 result by {error:.3g} > {tolerance:g} "
                             "(see OV_TOLERANCE: the float64 fix explains differences below it, not above)")
    return frozen


def _heads(model: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """reslens.heads: pattern scores, OV eigenvalues, composition, circuits, logit attribution."""
    from reslens import attribution, heads

    out: dict[str, torch.Tensor] = {}
    text = _text()[:500]  # 117 tokens: one sequence within n_positions=128
    out["heads/repeated_tokens"] = _tensor(heads.repeated_tokens(model, seq_len=20, n=4, seed=1))
    scores = {
        "induction": heads.induction_scores(model),
        "induction_bos": heads.induction_scores(model, seq_len=30, n=4, seed=2, bos_token_id=50256),
        "previous": heads.previous_token_scores(model, text, tokenizer=tokenizer),
        "previous_batch": heads.previous_token_scores(model, SENTENCES, tokenizer=tokenizer),
        "duplicate_repeated": heads.duplicate_token_scores(
            model, heads.repeated_tokens(model, seq_len=20, n=4, seed=1)
        ),
        "duplicate_text": heads.duplicate_token_scores(model, text, tokenizer=tokenizer),
        "current": heads.current_token_scores(model, text, tokenizer=tokenizer),
        "current_batch": heads.current_token_scores(model, SENTENCES, tokenizer=tokenizer),
    }
    for name, s in scores.items():
        out[f"heads/scores/{name}"] = _tensor(s.scores)
    out["heads/attention_patterns"] = _tensor(
        heads.attention_patterns(model, SENTENCES[1:], tokenizer=tokenizer)
    )

    for name, kwargs in (
        ("plain", dict()),
        ("fold_ln", dict(fold_ln=True)),
        ("wte_mlp0", dict(effective_embedding="embed+mlp0")),
        ("fold_ln_wte_mlp0", dict(fold_ln=True, effective_embedding="embed+mlp0")),
    ):
        ov = heads.ov_eigen_summary(model, **kwargs)
        for field in ("eigenvalues", "copying"):  # tolerance, not bits: see OV_TOLERANCE
            key = f"heads/ov/{name}/{field}"
            out[key] = _ov_checked_against_fixture(key, _tensor(getattr(ov, field)))

    for name, kind, kwargs in (
        ("q", "q", {}),
        ("k", "k", {}),
        ("v", "v", {}),
        ("k_fold_ln", "k", dict(fold_ln=True)),
        ("q_seed1", "q", dict(n_baseline=50, seed=1)),
    ):
        comp = heads.composition_scores(model, kind, **kwargs)
        _put(out, f"heads/composition/{name}", comp, ("scores", "raw", "baseline", "baseline_std", "mask"))

    out["heads/ov_circuit_1_2"] = _tensor(heads.ov_circuit(model, 1, 2))
    out["heads/qk_circuit_2_0"] = _tensor(heads.qk_circuit(model, 2, 0))

    sentences = [TRACE_PROMPT, "“Well,” he said, and the dog was", "The men said"]
    for name, args, kwargs in (
        ("said_vs_was", (sentences, " said"), dict(against=" was", tokenizer=tokenizer)),
        ("fang", ([TRACE_PROMPT], " Fang"), dict(tokenizer=tokenizer)),
        ("ids_position", (sentences[1:2], 262), dict(position=3, against=[257], tokenizer=tokenizer)),
    ):
        dla = attribution.logit_attribution(model, *args, **kwargs)
        _put(
            out,
            f"heads/logit_attribution/{name}",
            dla,
            (
                "contributions",
                "logit",
                "input_ids",
                "attention_mask",
                "position",
                "target",
                "against?",
                "scale",
            ),
        )
        out[f"heads/logit_attribution/{name}/sum"] = _tensor(dla.sum())
        out[f"heads/logit_attribution/{name}/heads"] = _tensor(dla.heads())
    return out


def _tracing(model: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """reslens.tracing: causal_trace for the three kinds, restored_prob, trace_many, and
    rank_one_edit at layer 0 (its delta and the probabilities with it applied)."""
    from reslens import tracing
    from reslens.arch import adapter
    from reslens.rome import SecondMoment, rank_one_edit
    from reslens.tracing import Noise

    out: dict[str, torch.Tensor] = {}
    calls = {
        "hidden": dict(kind="resid", noise=Noise(samples=5)),
        "mlp_w1": dict(kind="mlp", window=1, noise=Noise(samples=5)),
        "attn_w1": dict(kind="attn", window=1, noise=Noise(samples=5)),
        "mlp_w10": dict(kind="mlp", noise=Noise(samples=4, seed=1)),
        "attn_w3_fang": dict(
            kind="attn", window=3, answer=" Fang", noise=Noise(samples=4, scale=2.0, embedding_std="vocab")
        ),
        "hidden_std": dict(kind="resid", noise=Noise(samples=3, embedding_std=0.05), batch_size=7),
    }
    for name, kwargs in calls.items():
        t = tracing.causal_trace(model, tokenizer, TRACE_PROMPT, TRACE_SUBJECT, **kwargs)
        _put(
            out,
            f"tracing/trace/{name}",
            t,
            (
                "input_ids",
                "subject_span",
                "answer_id",
                "restored_prob",
                "clean_prob",
                "corrupted_prob",
                "window",
                "samples",
                "noise",
                "noise_std",
                "seed",
            ),
        )

    ids = torch.tensor(tokenizer(TRACE_PROMPT, add_special_tokens=False)["input_ids"])
    span = tracing.subject_span(tokenizer, TRACE_PROMPT, TRACE_SUBJECT)
    out["tracing/subject_span"] = _tensor(list(span))
    out["tracing/embedding_std_subject"] = _tensor(tracing.embedding_std(model, ids[span[0] : span[1]]))
    out["tracing/embedding_std_vocab"] = _tensor(tracing.embedding_std(model))
    fang = tokenizer(" Fang", add_special_tokens=False)["input_ids"][0]
    last = len(ids) - 1
    five = Noise(samples=5)
    probs = [
        tracing.restored_prob(model, ids, span, fang, [], noise=five),
        tracing.restored_prob(model, ids, span, fang, [("mlp_out", 0, span[1] - 1)], noise=five),
        tracing.restored_prob(
            model, ids, span, fang, [("resid", 2, span[1] - 1), ("attn_out", 1, last)], noise=five
        ),
    ]
    out["tracing/restored_prob"] = _tensor(probs)

    facts = [
        ("said White", "White", " Fang"),
        ("I saw White", "White", " Fang"),
        ("Mr. Knight", "Knight", "ley"),
        ("the cat", "cat", " zebra"),
    ]
    summary = tracing.trace_many(
        model, tokenizer, facts, kind="mlp", window=1, noise=Noise(samples=3), progress=False
    )
    _put(out, "tracing/trace_many", summary, ("mean", "low", "high", "count", "clean_prob", "corrupted_prob"))
    out["tracing/trace_many/skipped"] = _tensor(list(summary.skipped) or torch.zeros(0, dtype=torch.int64))

    texts = [_text()[:3500], _text()[3500:]]
    stats = SecondMoment.compute(model, 0, texts, tokenizer=tokenizer, max_tokens=1500)
    out["tracing/mom2_l0_diag"] = _tensor(stats.mom2.diagonal())
    edit = rank_one_edit(
        model,
        tokenizer,
        EDIT_PROMPT,
        EDIT_SUBJECT,
        EDIT_ANSWER,
        layer=0,
        second_moment=stats,
    )
    _put(out, "tracing/rank_one_edit", edit, ("u", "v", "key", "value", "delta"))
    out["tracing/rank_one_edit/nll"] = _tensor(edit.nll)
    out["tracing/rank_one_edit/steps"] = _tensor(edit.steps)

    weight = adapter(model).mlp_out_param(0)
    before = weight.detach().clone()
    check = [torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]]) for p in EDIT_CHECK_PROMPTS]
    holmes = tokenizer(EDIT_ANSWER, add_special_tokens=False)["input_ids"][0]
    with edit:
        out["tracing/rank_one_edit/weight_delta"] = _tensor(weight.detach() - before)
        with torch.no_grad():
            rows = [model(input_ids=c).logits[0, -1].softmax(-1) for c in check]
    if not torch.equal(weight, before):
        raise AssertionError("rank_one_edit did not restore the MLP output projection weight bit-exactly")
    probs = torch.stack(rows)  # [prompts, vocab]
    top = probs.topk(5, dim=-1)
    out["tracing/rank_one_edit/after_top_ids"] = _tensor(top.indices)
    out["tracing/rank_one_edit/after_top_probs"] = _tensor(top.values)
    out["tracing/rank_one_edit/after_p_answer"] = _tensor(probs[:, holmes])
    out["tracing/rank_one_edit/after_p_fang"] = _tensor(probs[:, fang])
    return out


#: The areas, in the order they run.
AREAS: dict[str, Callable[[Any, Any], dict[str, torch.Tensor]]] = {
    "capture": _capture,
    "lens": _lens,
    "lens_stats": _lens_stats,
    "pca": _pca,
    "kv": _kv_memory,
    "heads": _heads,
    "tracing": _tracing,
}


def compute_frozen_results(areas: Any = None) -> dict[str, torch.Tensor]:
    """Load the embedded model and compute every frozen result: ``{key: CPU contiguous tensor}``.

    ``areas`` (names in :data:`AREAS`, default all) is for debugging one area at a time.
    """
    import reslens

    chosen = list(AREAS) if areas is None else list(areas)
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, tokenizer = reslens.load_model()
            results: dict[str, torch.Tensor] = {}
            for area in chosen:
                part = AREAS[area](model, tokenizer)
                for key, value in part.items():
                    if not key.startswith(area + "/") or key in results:
                        raise KeyError(f"key {key!r} of area {area!r}: keys are '<area>/...' and unique")
                    results[key] = _tensor(value)
    finally:
        torch.set_num_threads(threads)
    return results
