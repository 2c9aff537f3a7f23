"""The explorer page (reslens.explorer): what it carries, and what a real browser shows when a user hovers,
clicks and switches (headless Chromium over the DevTools Protocol, tests/cdp.py)."""

from __future__ import annotations

import base64
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

import reslens
from cdp import Browser, need_browser
from helpers import make_model
from reslens.explorer._lens import lens_view
from reslens.explorer._payload import RANK_CAP
from reslens.lens import LinearShortcut, lens_change_of, lens_of, logit_lens

IDS = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def shortcut(model):
    arch = reslens.adapter(model)
    g = torch.Generator().manual_seed(1)
    maps = torch.eye(arch.d_model) + 0.5 * torch.randn(arch.n_layer, arch.d_model, arch.d_model, generator=g)
    return LinearShortcut(maps, torch.zeros(arch.n_layer, arch.d_model))


@pytest.fixture(scope="module")
def page(model, shortcut, tmp_path_factory):
    explorer = reslens.explore(model, IDS, lenses={"logit": None, "shortcut": shortcut}, top_k=5, changes=200)
    path = explorer.save(tmp_path_factory.mktemp("explore") / "lens.html")
    return explorer, path


@pytest.fixture(scope="module")
def browser():
    path = need_browser()
    with Browser(path) as b:
        yield b


def decode(a: dict) -> np.ndarray:
    kind = {"f2": "<f2", "u1": "u1", "u2": "<u2", "u4": "<u4", "i4": "<i4"}[a["t"]]
    return np.frombuffer(base64.b64decode(a["b"]), dtype=kind).reshape(a["s"])


def unlog(prob: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The trajectories' uint8 log scales decoded, as the page decodes them."""
    p = np.where(prob == 0, np.nan, 10.0 ** (8 * (prob.astype(float) - 255) / 254))
    r = np.where(rank == 255, RANK_CAP, np.round(65536.0 ** (rank.astype(float) / 255) - 1))
    return p, r


def tip(browser) -> list[tuple[str, float]]:
    items = browser.eval("[...document.querySelectorAll('#tip .topk li')].map(li => "
                         "[li.querySelector('.tok').textContent, li.querySelector('.p').textContent])")
    return [(token, float(p)) for token, p in items]


# --- what the page carries ---------------------------------------------------------------------------


def test_the_page_is_self_contained_and_says_what_it_holds(page):
    explorer, _ = page
    html = explorer.html
    assert html.startswith("<!doctype html>") and "reslens explorer" in html
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html), "no network reference"
    assert "https://" not in html and "http://" not in html
    assert "2 lens(es) (logit, shortcut) of 16 positions x 4 rows" in explorer.holds
    assert "No vocabulary rows" in explorer.holds and "exact at every row" in explorer.holds
    frame = explorer._repr_html_()
    assert "<iframe srcdoc=" in frame and 'sandbox="allow-scripts"' in frame and "<table" in frame
    assert "Explorer([lens]" in repr(explorer) and len(repr(explorer)) < 200


def test_the_page_never_carries_a_vocabulary_row(page, model):
    explorer, _ = page
    (view,) = explorer.views
    k = view["k"]
    for lens in view["lenses"]:
        assert decode(lens["top"]).shape == (4, 16, k) and decode(lens["probs"]).shape == (4, 16, k)
        for a in lens["metrics"].values():
            assert decode(a).shape == (4, 16)


def test_trajectories_are_exact_probabilities_of_the_distinct_top1_tokens(page, model):
    explorer, _ = page
    view = explorer.views[0]
    lens = view["lenses"][0]
    result = logit_lens(model, IDS, top_k=5)
    off, tok = decode(lens["traj"]["off"]), decode(lens["traj"]["tok"])
    prob, rank = unlog(decode(lens["traj"]["prob"]), decode(lens["traj"]["rank"]))
    arch = reslens.adapter(model)
    res = reslens.capture(model, IDS)
    for p in (0, 7, 15):
        chosen = [int(view["tokens"][t]) for t in tok[off[p]:off[p + 1]]]
        assert set(chosen) == set(result.top_ids[:, 0, p, 0].tolist())
        logits = arch.logits(res.resid[:, 0, p]).float()  # [R, V]: the full rows, here only
        for j, token in enumerate(chosen):
            expect = logits.softmax(-1)[:, token]
            # carried at a chart's precision: log-scale steps of 7.5% (probability) and 2.2% (rank)
            np.testing.assert_allclose(prob[off[p] + j], expect.numpy(), rtol=0.04)
            expect_rank = (logits > logits[:, token : token + 1]).sum(-1).numpy()
            np.testing.assert_allclose(rank[off[p] + j], expect_rank, rtol=0.012, atol=0.5)


def test_a_31_by_512_top10_page_fits_in_2_mb():
    """The encoding at the budget's size: SmolLM2's 49,152-token vocabulary, random probabilities and ids
    drawn as in text (Zipf: 1/rank), over 20,000 distinct; each row's top-1 distinct (8 trajectories each)."""
    g = torch.Generator().manual_seed(0)
    R, P, k, V = 31, 512, 10, 49152
    zipf = 1 / torch.arange(1, V + 1)
    ids = torch.multinomial(zipf, P, replacement=True, generator=g)[None]
    top_ids = torch.multinomial(zipf, R * P * k, replacement=True, generator=g).reshape(R, 1, P, k)
    top_ids[:, 0, :, 0] = torch.arange(R * P).reshape(R, P)  # distinct top-1 at every row
    top_probs = torch.rand(R, 1, P, k, generator=g).sort(-1, descending=True).values
    floats = {name: torch.rand(R, 1, P, generator=g) for name in
              ("target_logprob", "entropy", "kl_final_layer", "kl_layer_final", "js", "max_prob",
               "final_top1_prob")}
    ranks = torch.randint(0, V, (R, 1, P), generator=g)
    result = reslens.lens.LensResult(
        site_of_row=("resid",) * R, layer_of_row=tuple(range(R)), input_ids=ids,
        attention_mask=torch.ones(1, P, dtype=torch.bool), targets=ids, top_ids=top_ids, top_probs=top_probs,
        target_rank=ranks, final_top1=ids, convergence_layer=ids, final_top1_rank=ranks, **floats,
        token_strings={i: f" w{i:05d}" for i in range(V)})
    explorer = reslens.explore(result)
    assert len(explorer.views[0]["tokens"]) > 20_000
    assert explorer.size < 2_000_000, explorer.size


def test_whitespace_tokens_show_visibly(model, browser, tmp_path):
    result = logit_lens(model, IDS, top_k=3)
    top1 = int(result.top_ids[-1, 0, -1, 0])
    strings = {i: f"t{i}" for i in range(97)}
    strings[top1] = "\u00a0"
    path = reslens.explore(dataclasses.replace(result, token_strings=strings)).save(tmp_path / "ws.html")
    browser.open(path)
    cell = browser.eval("document.querySelector('td.c[data-r=\"3\"][data-p=\"15\"]').textContent")
    assert cell == "⍽"
    strings[top1] = "  "
    path = reslens.explore(dataclasses.replace(result, token_strings=strings)).save(tmp_path / "ws2.html")
    browser.open(path)
    assert browser.eval("document.querySelector('td.c[data-r=\"3\"][data-p=\"15\"]').textContent") == "␣␣"


def test_bad_input_is_refused(model):
    result = logit_lens(model, IDS, top_k=3)
    with pytest.raises(TypeError, match="explore needs a model with inputs="):
        reslens.explore(42)
    with pytest.raises(TypeError, match="without inputs"):
        reslens.explore(model)
    with pytest.raises(ValueError, match="inputs= is for a model"):
        reslens.explore(result, IDS)
    other = logit_lens(model, IDS, top_k=3, layers=[0, 2])
    with pytest.raises(ValueError, match="same rows"):
        reslens.explore({"a": result, "b": other})
    scores = reslens.heads.previous_token_scores(model, IDS)
    with pytest.raises(ValueError, match="patterns must be a"):
        scores.explore(patterns=torch.zeros(3, 3))
    with pytest.raises(TypeError, match="lenses must be"):
        reslens.explore(model, IDS, lenses="logit")


def test_trajectories_from_results_alone_know_only_the_top_k(model):
    result = logit_lens(model, IDS, top_k=3)
    view = lens_view({"logit": result})
    traj = view["lenses"][0]["traj"]
    prob, rank = unlog(decode(traj["prob"]), decode(traj["rank"]))
    assert not traj["exact"]
    assert ((rank == RANK_CAP) == np.isnan(prob)).all() and (rank[rank < RANK_CAP] < 3).all()


# --- in the browser ----------------------------------------------------------------------------------


def test_hover_shows_the_cells_top_k_rank_and_log_prob(page, model, browser):
    _, path = page
    browser.open(path)
    result = logit_lens(model, IDS, top_k=5)
    for r, p in ((1, 3), (3, 15), (0, 0)):
        browser.hover(f'td.c[data-r="{r}"][data-p="{p}"]')
        shown = tip(browser)
        assert [t for t, _ in shown] == [str(i) for i in result.top_ids[r, 0, p].tolist()]
        np.testing.assert_allclose([v for _, v in shown], result.top_probs[r, 0, p].numpy(),
                                   rtol=6e-3)  # 3 digits of a float16
        if p < 15:
            assert browser.eval("document.querySelector('#tip .rank').textContent") == str(
                int(result.target_rank[r, 0, p]))
            logp = float(browser.eval("document.querySelector('#tip .logp').textContent"))
            assert logp == pytest.approx(float(result.target_logprob[r, 0, p]), rel=3e-3)


def test_switching_the_lens_keeps_the_selected_cell(page, model, shortcut, browser):
    _, path = page
    browser.open(path)
    browser.click('td.c[data-r="2"][data-p="6"]')
    selected = "[document.querySelector('td.sel').dataset.r, document.querySelector('td.sel').dataset.p]"
    assert browser.eval(selected) == ["2", "6"]
    browser.select("select.lens", "1")
    assert browser.eval(selected) == ["2", "6"]
    res = reslens.capture(model, IDS)
    other = lens_of(res, model, top_k=5, lens=shortcut)
    expect = str(int(other.top_ids[2, 0, 6, 0]))
    assert browser.eval("document.querySelector('td.sel').textContent") == expect
    browser.hover('td.c[data-r="2"][data-p="6"]')
    assert [t for t, _ in tip(browser)] == [str(i) for i in other.top_ids[2, 0, 6].tolist()]
    assert "Trajectories at position 6" in browser.eval("document.querySelector('.traj h2').textContent")
    keys = browser.eval("[...document.querySelectorAll('.traj li')].map(li => li.dataset.token)")
    assert set(keys) == {str(i) for i in other.top_ids[:, 0, 6, 0].tolist()}


def test_a_click_shows_pieces_that_sum_to_the_change(page, model, browser):
    explorer, path = page
    browser.open(path)
    marked = browser.eval("[...document.querySelectorAll('td.c.has')].map(td => "
                          "[+td.dataset.r, +td.dataset.p])")
    n_changes = len(explorer.views[0]["lenses"][0]["changes"])
    assert len(marked) == n_changes > 0
    res = reslens.capture(model, IDS, sites=("resid", "attn_z", "mlp_out", "mlp_act"))
    result = logit_lens(model, IDS, top_k=1)
    for r, p in marked[:3]:
        browser.click(f'td.c[data-r="{r}"][data-p="{p}"]')
        values = browser.eval("[...document.querySelectorAll('.cause li')].map(li => +li.dataset.v)")
        change = float(browser.eval("document.querySelector('.cause .change').textContent"))
        assert sum(values) == pytest.approx(change, abs=1e-3)
        expect = lens_change_of(res, model, int(result.top_ids[r, 0, p, 0]),
                                against=int(result.top_ids[r - 1, 0, p, 0]), layers=(r - 1, r), position=p)
        assert change == pytest.approx(expect.change, abs=1e-4)
        labels = browser.eval("[...document.querySelectorAll('.cause li > span:first-child')].map(s => "
                              "s.textContent)")
        assert labels[:3] == [label for label, _ in expect.top(3)]
    unmarked = browser.eval("(() => { const td = document.querySelector('td.c:not(.has)[data-r=\"0\"]'); "
                            "return [td.dataset.r, td.dataset.p]; })()")
    browser.click(f'td.c[data-r="{unmarked[0]}"][data-p="{unmarked[1]}"]')
    assert "row 0 is the embedding" in browser.eval("document.querySelector('.cause').textContent")


def test_the_trace_view_hovers(model, browser, tmp_path):
    from reslens.tracing import Noise, causal_trace_ids

    ids = IDS[0, :8]
    traces = [causal_trace_ids(model, ids, (1, 3), kind=kind, window=1, noise=Noise(samples=2))
              for kind in ("resid", "mlp", "attn")]
    path = traces[0].explore(*traces[1:]).save(tmp_path / "trace.html")
    browser.open(path)
    assert browser.eval("document.querySelectorAll('table.trace').length") == 3
    browser.hover('table.trace[data-map="1"] td.c[data-l="1"][data-p="2"]')
    restored = float(browser.eval("document.querySelector('#tip .restored').textContent"))
    assert restored == pytest.approx(float(traces[1].restored_prob[1, 2]), rel=2e-3)
    effect = float(browser.eval("document.querySelector('#tip .ie').textContent"))
    assert effect == pytest.approx(float(traces[1].indirect_effect[1, 2]), rel=5e-3, abs=1e-6)


def test_the_head_view_hovers_and_draws_the_heads_pattern(model, browser, tmp_path):
    from reslens.heads import attention_patterns, previous_token_scores

    scores = previous_token_scores(model, IDS)
    pattern = attention_patterns(model, IDS)[:, 0]  # [n_layer, n_head, q, k]
    path = scores.explore(patterns=pattern).save(tmp_path / "heads.html")
    browser.open(path)
    browser.hover('table.heads td.c[data-l="1"][data-h="1"]')
    shown = float(browser.eval("document.querySelector('#tip .score').textContent"))
    assert shown == pytest.approx(float(scores.scores[1, 1]), rel=4e-3)  # 3 significant digits
    assert browser.eval("document.querySelector('canvas.pattern').dataset.head") == "1.1"
    # the canvas's darkest pixel of each query row is where the head attends most (blue: low red channel)
    red = browser.eval("(() => { const c = document.querySelector('canvas.pattern'); const d = "
                       "c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const out = []; "
                       "for (let i = 0; i < d.length; i += 4) out.push(d[i]); return out; })()")
    red = np.array(red).reshape(16, 16)
    expect = pattern[1, 1].numpy()
    rows = [q for q in range(16) if np.sort(expect[q])[-1] - np.sort(expect[q])[-2] > 0.05]
    assert rows and all(red[q].argmin() == expect[q].argmax() for q in rows)


def test_the_cli_writes_the_pages(tmp_path):
    from reslens.cli import main

    lens_page, trace_page, heads_page = (tmp_path / f"{name}.html" for name in ("lens", "trace", "heads"))
    assert main(["lens", "The old sailor came back.", "--lens", "logit", "--html", str(lens_page)]) == 0
    assert main(["trace", "The old sailor came back", "--subject", "sailor", "--samples", "2",
                 "--window", "1", "--html", str(trace_page)]) == 0
    assert main(["heads", "--n", "2", "--seq-len", "8", "--html", str(heads_page)]) == 0
    for path, kind in ((lens_page, "lens"), (trace_page, "trace"), (heads_page, "heads")):
        text = path.read_text(encoding="utf-8")
        data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text,
                                    re.S).group(1).replace("<\\/", "</"))
        assert [v["kind"] for v in data["views"]] == [kind]
    data = json.loads(re.search(r'id="data">(.*?)</script>', trace_page.read_text(), re.S).group(1))
    assert [m["kind"] for m in data["views"][0]["maps"]] == ["resid", "mlp", "attn"]


def _synthetic(R: int, P: int, k: int, V: int, seed: int = 0):
    """A LensResult of ``R`` rows x ``P`` positions with random ids (``V`` tokens named ``w<id>``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (1, P), generator=g)
    top_probs = torch.rand(R, 1, P, k, generator=g).sort(-1, descending=True).values
    floats = {name: torch.rand(R, 1, P, generator=g) for name in
              ("target_logprob", "entropy", "kl_final_layer", "kl_layer_final", "js", "max_prob",
               "final_top1_prob")}
    ranks = torch.randint(0, V, (R, 1, P), generator=g)
    return reslens.lens.LensResult(
        site_of_row=("resid",) * R, layer_of_row=tuple(range(R)), input_ids=ids,
        attention_mask=torch.ones(1, P, dtype=torch.bool), targets=ids,
        top_ids=torch.randint(0, V, (R, 1, P, k), generator=g), top_probs=top_probs, target_rank=ranks,
        final_top1=ids, convergence_layer=ids, final_top1_rank=ranks, **floats,
        token_strings={i: f"w{i}" for i in range(V)})


def test_a_long_text_is_built_end_first_then_whole_and_scrolls(browser, tmp_path):
    """The last 96 positions are painted first, the earlier ones after, and the view stays at the end."""
    result = _synthetic(3, 300, 4, 500)
    browser.open(reslens.explore(result).save(tmp_path / "long.html"))  # waits for the whole grid
    assert browser.eval("document.querySelectorAll('td.c').length") == 3 * 300
    order = browser.eval("[...document.querySelectorAll('tr')[1].querySelectorAll('td.c')]"
                         ".map(td => +td.dataset.p)")
    assert order == list(range(300))
    at_end = browser.eval("(() => { const s = document.querySelector('.scroll'); "
                          "return s.scrollWidth - s.clientWidth - s.scrollLeft; })()")
    assert at_end < 60 and browser.eval("document.querySelector('.scroll').scrollLeft") > 1000
    browser.hover('td.c[data-r="1"][data-p="0"]')
    assert [t for t, _ in tip(browser)] == [f"w{i}" for i in result.top_ids[1, 0, 0].tolist()]


def test_the_kl_scale_is_not_swamped_by_the_embedding_row(browser, tmp_path):
    result = _synthetic(31, 20, 3, 100)
    kl = torch.rand(31, 1, 20) * 2
    kl[0] = 100.0  # the embedding row, as on SmolLM2
    result = dataclasses.replace(result, kl_final_layer=kl)
    browser.open(reslens.explore(result).save(tmp_path / "kl.html"))
    browser.select("select.metric", "kl_fl")
    hi = float(browser.eval("document.querySelector('.legend .hi').textContent"))
    assert hi <= 2 and "max 100" in browser.eval("document.querySelector('.legend .what').textContent")
    dark = browser.eval("getComputedStyle(document.querySelector('td.c[data-r=\"0\"][data-p=\"0\"]')).color")
    assert dark == "rgb(255, 255, 255)"  # clipped to the darkest blue, white text
