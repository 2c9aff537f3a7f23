"""Lens statistics over a data set against the per-batch lens; non-finite cells left out; files."""

import math

import matplotlib
import pytest
import torch

from reslens.lens import logit_lens
from reslens.lens_stats import LensStats, MetricStats, lens_stats
from helpers import VOCAB, count_calls

matplotlib.use("Agg")


def test_lens_stats_match_the_per_batch_lens(model):
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, VOCAB, (2, 10), generator=gen) for _ in range(3)]
    stats = lens_stats(model, batches, progress=False)
    lenses = [logit_lens(model, b, top_k=1) for b in batches]
    entropy = torch.cat([lens.entropy.flatten(1) for lens in lenses], 1)
    torch.testing.assert_close(stats.mean.entropy, entropy.mean(1))
    torch.testing.assert_close(stats.quantiles.entropy[:, 2], entropy.median(1).values, atol=1e-3, rtol=1e-3)
    rank = torch.cat([lens.target_rank[..., :-1].flatten(1) for lens in lenses], 1).float()
    torch.testing.assert_close(stats.mean.target_rank, rank.mean(1))
    agree = (
        torch.cat([(lens.top_ids[..., 0] == lens.final_top1).flatten(1) for lens in lenses], 1)
        .float()
        .mean(1)
    )
    torch.testing.assert_close(stats.top1_agreement, agree)
    assert stats.top1_agreement[-1] == 1 and stats.n_tokens == 60 and stats.exact_quantiles
    is_input = (
        torch.cat([(lens.top_ids[..., 0] == lens.input_ids).flatten(1) for lens in lenses], 1).float().mean(1)
    )
    torch.testing.assert_close(stats.input_token_top1, is_input)
    assert len(stats.to_frame()) == model.config.n_layer + 1
    assert "top1=final" in stats.table() and "<table>" in stats._repr_html_()
    assert (stats.n_non_finite == 0).all() and isinstance(stats.mean, MetricStats)
    assert not hasattr(stats, "final_token_prob")  # the duplicate of mean.final_top1_prob is gone
    stats.plot()


def test_lens_stats_sample_bounds_memory(model):
    batches = [torch.randint(0, VOCAB, (4, 20), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    stats = lens_stats(model, batches, max_samples=50, progress=False)
    assert not stats.exact_quantiles and stats.n_tokens == 320
    assert math.isfinite(float(stats.quantiles.js.sum()))


def test_lens_stats_bad_input(model):
    with pytest.raises(ValueError, match="max_samples"):
        lens_stats(model, [torch.ones(1, 3, dtype=torch.long)], max_samples=0)
    with pytest.raises(TypeError, match="tokenizer"):
        lens_stats(model, "some text")
    with pytest.raises(ValueError, match="quantiles"):
        lens_stats(model, [torch.ones(1, 3, dtype=torch.long)], quantiles=(0.5, 1.0))
    one = [torch.ones(1, 3, dtype=torch.long)]
    for name in ("max_length", "batch_size", "chunk_size"):  # refused up front, not a range() failure
        with pytest.raises(ValueError, match=rf"{name}=0 is out of range"):
            lens_stats(model, one, **{name: 0})
    with pytest.raises(TypeError, match="batch_size must be an int"):
        lens_stats(model, one, batch_size=2.0)


def test_lens_stats_leave_non_finite_cells_out(model):
    from reslens.hooks import patch

    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, VOCAB, (2, 10), generator=gen) for _ in range(3)]
    clean = [logit_lens(model, b, top_k=1) for b in batches]

    def nan_late(t):  # the final raw residual is NaN from position 6 on (nothing runs after it but the norm)
        t = t.clone()
        t[:, 6:] = float("nan")
        return t

    with (
        patch(model, {("resid", 3): nan_late}),
        pytest.warns(RuntimeWarning, match="left out of the statistics"),
    ):
        stats = lens_stats(model, batches, progress=False)
    assert stats.n_tokens == 60 and stats.n_non_finite.tolist() == [24, 24, 24, 24]
    for name in ("entropy", "max_prob", "kl_final_layer", "js", "final_top1_prob"):
        # layers 0..2 keep their own metrics at 6..9; nothing is compared with the NaN final layer there
        keep = slice(None, 6) if name not in ("entropy", "max_prob") else slice(None)
        ref = torch.cat([getattr(c, name)[:3, :, keep].flatten(1) for c in clean], 1).mean(1)
        torch.testing.assert_close(getattr(stats.mean, name)[:3], ref, msg=name)
    agree = torch.cat([(c.top_ids[:3, :, :6, 0] == c.final_top1[:, :6]).flatten(1) for c in clean], 1).float()
    torch.testing.assert_close(stats.top1_agreement[:3], agree.mean(1))
    assert torch.isfinite(stats.quantiles.kl_final_layer).all() and "non-finite" in stats.table()


def test_lens_stats_of_all_nan_layers_are_nan_not_zero(model):
    from reslens.hooks import patch

    batches = [torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))]
    with (
        patch(model, {("resid", 1): lambda t: torch.full_like(t, float("nan"))}),
        pytest.warns(RuntimeWarning),
    ):
        stats = lens_stats(model, batches, progress=False)
    assert stats.n_non_finite.tolist() == [20, 20, 20, 20]
    assert torch.isfinite(stats.mean.entropy[0]) and stats.mean.entropy[1:].isnan().all()
    assert stats.mean.kl_final_layer.isnan().all() and stats.top1_agreement.isnan().all()
    assert stats.quantiles.entropy[1:].isnan().all()


def test_lens_stats_round_trip(model, tmp_path):
    batches = [torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stats = lens_stats(model, batches, progress=False)
    stats.save(tmp_path / "sub" / "stats.safetensors")
    back = LensStats.load(tmp_path / "sub" / "stats.safetensors")
    assert back.layers == stats.layers and back.quantile_levels == stats.quantile_levels
    assert torch.equal(back.mean.entropy, stats.mean.entropy) and torch.equal(
        back.quantiles.js, stats.quantiles.js
    )
    assert back.exact_quantiles == stats.exact_quantiles and torch.equal(
        back.n_non_finite, stats.n_non_finite
    )
    with pytest.raises(ValueError, match="not a reslens LensResult file"):
        from reslens.lens import LensResult

        LensResult.load(tmp_path / "sub" / "stats.safetensors")


def test_long_text_is_read_without_the_tokenizer_length_warning(capfd, caplog):
    import reslens

    from helpers import make_model

    _, tokenizer = reslens.load_model()  # the GPT-2 tokenizer: model_max_length 128
    model = make_model(n_layer=1, n_embd=8, n_head=2, vocab_size=len(tokenizer), n_positions=32)
    text = " ".join(
        ["The old sailor came back to the inn and asked for a glass of rum."] * 10
    )  # > 128 tokens
    assert (
        len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        > tokenizer.model_max_length
    )
    capfd.readouterr()
    stats = lens_stats(model, text, tokenizer=tokenizer, max_length=32, batch_size=8, progress=False)
    out, err = capfd.readouterr()
    assert "longer than the specified maximum" not in out + err + caplog.text
    assert stats.n_tokens > tokenizer.model_max_length


def test_to_frame_names_the_extra_when_pandas_is_missing(model, monkeypatch):
    import sys

    stats = lens_stats(
        model, [torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))], progress=False
    )
    lens = logit_lens(model, torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0)))
    monkeypatch.setitem(sys.modules, "pandas", None)
    for result in (stats, lens):
        with pytest.raises(ImportError, match=r'pip install "reslens\[frame\]"'):
            result.to_frame()


def _brute_force_stats(model, batches):
    """Per-layer means from HuggingFace ``hidden_states`` through the final norm and the head, computed
    over every real, non-special position of every batch (plain HF, no reslens lens)."""
    norm, head = model.model.norm, model.lm_head
    cells = {k: [] for k in ("entropy", "kl", "agree", "is_input", "logp", "rank")}
    for batch in batches:
        keep = batch.attention_mask & ~batch.special_mask  # [B, P]
        with torch.no_grad():
            out = model(batch.input_ids, attention_mask=batch.attention_mask.long(),
                        output_hidden_states=True)
            z = torch.stack([head(norm(h)) for h in out.hidden_states[:-1]] + [out.logits]).float()
        logp = z.log_softmax(-1)
        p, logq = logp.exp(), logp[-1]
        final = z[-1].argmax(-1)
        cells["entropy"].append((-(p * logp).sum(-1))[:, keep])
        cells["kl"].append((logq.exp() * (logq - logp)).sum(-1)[:, keep])
        cells["agree"].append((z.argmax(-1) == final)[:, keep].float())
        cells["is_input"].append((z.argmax(-1) == batch.input_ids)[:, keep].float())
        has_next = keep[:, :-1] & batch.attention_mask[:, 1:]
        nxt = batch.input_ids[:, 1:].expand(z.shape[0], -1, -1)[..., None]
        target_logit = z[:, :, :-1].gather(-1, nxt)
        cells["logp"].append(logp[:, :, :-1].gather(-1, nxt)[..., 0][:, has_next])
        cells["rank"].append((z[:, :, :-1] > target_logit).sum(-1)[:, has_next].float())
    return {k: torch.cat(v, 1) for k, v in cells.items()}


def test_lens_stats_equal_brute_force_on_a_llama_model_leaving_out_pads_and_bos():
    from reslens import Batch
    from helpers import make_family

    model = make_family("llama")
    gen = torch.Generator().manual_seed(7)
    batches = []
    for lengths in ((9, 6), (7, 9)):  # right padding; a BOS (id 1) first, marked special as tokenize does
        ids = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros(2, 9, dtype=torch.bool)
        for row, n in enumerate(lengths):
            ids[row, :n] = torch.cat([torch.tensor([1]), torch.randint(3, VOCAB, (n - 1,), generator=gen)])
            mask[row, :n] = True
        special = torch.zeros_like(mask)
        special[:, 0] = True
        batches.append(Batch(ids, mask, special_mask=special))
    stats = lens_stats(model, batches, progress=False)
    ref = _brute_force_stats(model, batches)
    assert stats.n_tokens == 15 + 16 - 4 and ref["entropy"].shape == (4, 27)  # the 4 BOS are not scored
    torch.testing.assert_close(stats.mean.entropy, ref["entropy"].mean(1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(stats.mean.kl_final_layer, ref["kl"].mean(1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(stats.top1_agreement, ref["agree"].mean(1))
    torch.testing.assert_close(stats.input_token_top1, ref["is_input"].mean(1))
    torch.testing.assert_close(stats.mean.target_logprob, ref["logp"].mean(1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(stats.mean.target_rank, ref["rank"].mean(1))
    torch.testing.assert_close(stats.quantiles.entropy[:, 2], ref["entropy"].quantile(0.5, dim=1))
    assert stats.top1_agreement[-1] == 1 and float(stats.mean.kl_final_layer[-1]) == 0
    with_bos = lens_stats(model, [Batch(b.input_ids, b.attention_mask) for b in batches], progress=False)
    assert with_bos.n_tokens == 31  # unmarked, the BOS positions are scored like any token


def test_data_that_is_no_text_nor_batches_and_one_token_sequences_are_refused_by_name(model):
    for bad in (123, torch.tensor([[1, 2, 3]]), b"bytes"):
        with pytest.raises(TypeError, match=r"data must be a text, a list of texts, or an iterable of Batch"):
            lens_stats(model, bad, progress=False)
    with pytest.raises(ValueError, match=r"data holds 2 sequences of 1 real token each.*at least 2 tokens"):
        lens_stats(model, [torch.tensor([[5], [7]])], progress=False)


def test_lens_stats_checks_its_options_once_not_per_batch(model, monkeypatch):
    import reslens.lens.result
    import reslens.lens.stats

    calls = count_calls(monkeypatch, (
        (reslens.lens.result, ("_check_options", "_check_residuals", "check_layers")),
        (reslens.lens.stats, ("check_layers", "_check_lens", "_check_quantiles")),
    ), qualified=True)
    batches = [torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    stats = lens_stats(model, batches, progress=False)
    assert stats.n_sequences == 8
    assert calls == {"stats.check_layers": 1, "stats._check_lens": 1, "stats._check_quantiles": 1}, calls
