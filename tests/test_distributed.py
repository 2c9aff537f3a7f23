"""Data-parallel data-set passes: under torchrun (2 gloo processes) every rank gets the one-process result.

Each test launches a worker of tests/distributed/ with ``torch.distributed.run``, reads what each rank
returned, and compares it with the same case (tests/distributed/cases.py) run here with no group.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reslens._distributed import Shard, shard_of

WORKERS = Path(__file__).resolve().parent / "distributed"


def _gloo() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


needs_gloo = pytest.mark.skipif(not _gloo(), reason="torch.distributed with gloo is not available")


def _cases():
    spec = importlib.util.spec_from_file_location("reslens_distributed_cases", WORKERS / "cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cases = _cases()


def _torchrun(worker: str, tmp_path: Path) -> Path:
    """Run ``tests/distributed/<worker>.py OUT`` on 2 gloo processes; ``OUT`` (a path prefix)."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(WORKERS / f"{worker}.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"torchrun {worker}.py exited with {done.returncode}:\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-6000:]}")
    return out


def _ranks(out: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(f"{out}.{rank}.safetensors") for rank in range(2)]


@pytest.fixture
def one_thread():
    """The reference on one thread, as the workers run (OMP_NUM_THREADS=1): the same kernels' blocking."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shard_of_alone_is_one_process():
    assert shard_of() == Shard(None, 0, 1) and shard_of(False) == Shard(None, 0, 1)
    with pytest.raises(TypeError, match="group must be None, False or a torch.distributed ProcessGroup"):
        shard_of(True)
    alone = shard_of()
    assert [i for i, _ in alone.take("abc")] == [0, 1, 2] and alone.primary and not alone.parallel
    t = torch.ones(3, dtype=torch.float64)
    assert alone.sum(t) is t and alone.cat(t) is t and alone.gather_objects(5) == [5]
    with pytest.raises(ValueError, match="^bad$"), alone.together():  # alone: the error as it is
        raise ValueError("bad")


@needs_gloo
def test_primitives_under_torchrun(tmp_path):
    out = _torchrun("primitives", tmp_path)
    seen = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]
    assert [s["mine"] for s in seen] == [[0, 2, 4, 6], [1, 3, 5]]
    for rank, s in enumerate(seen):
        assert (s["rank"], s["world"], s["sum"]) == (rank, 2, 3.0)
        assert s["cat"] == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
        assert s["objects"] == [{"rank": 0}, {"rank": 1}]
        assert s["top_i"] == [[1, 2, 6]] and s["top_v"] == [[3.0, 3.0, 3.0]]  # ties: the smaller id
        assert s["refused"]  # same() refuses ranks that disagree


@needs_gloo
def test_under_torchrun_reslens_starts_the_default_group_itself(tmp_path):
    out = _torchrun("autostart", tmp_path)
    seen = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]
    assert [(s["rank"], s["world"], s["backend"]) for s in seen] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert all(s["alone"] == [0, 1] for s in seen)  # group=False: one process even under torchrun


def _assert_stats_equal(got: dict, want: dict, prefix: str) -> None:
    for key in (k for k in got if k.startswith(prefix + ".")):
        if ".mean." in key:  # float64 sums in another order, then float32: at most an ulp apart
            torch.testing.assert_close(got[key], want[key], rtol=2.4e-7, atol=0, msg=key)
        else:  # counts, agreements, and the quantiles of the very same values
            assert torch.equal(got[key], want[key]), key


@needs_gloo
@pytest.mark.slow
def test_lens_stats_under_torchrun_equal_one_process(tmp_path, one_thread):
    ranks = _ranks(_torchrun("lens_stats", tmp_path))
    want = cases.lens_stats_case()
    assert bool(want["text.exact"]) and bool(want["ids.exact"]) and not bool(want["sampled.exact"])
    for got in ranks:
        assert got.keys() == want.keys()
        _assert_stats_equal(got, want, "text")  # windows of text, 5 batches over 2 ranks
        _assert_stats_equal(got, want, "ids")  # the caller's 3 id batches
        sampled = {k: v for k, v in got.items() if k.startswith("sampled.") and ".quantiles." not in k}
        _assert_stats_equal(sampled, want, "sampled")  # more than max_samples: the sums still exact
        for key in (k for k in got if k.startswith("sampled.quantiles.")):
            exact = want[key.replace("sampled.", "text.")]
            median = got[key][:, 2]  # a uniform sample of 120 of ~390 positions: within q25..q75
            assert bool(((exact[:, 1] <= median) & (median <= exact[:, 3])).all()), key
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in want)  # every rank returns the same


@needs_gloo
@pytest.mark.slow
def test_second_moment_under_torchrun_equal_one_process_and_rank_0_writes_the_cache(tmp_path, one_thread):
    ranks = _ranks(_torchrun("second_moment", tmp_path))
    want = cases.second_moment_case()
    scale = float(want["mom2"].abs().max())
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].name.startswith("mom2-"), files
    for got in ranks:
        assert torch.equal(got["n_tokens"], want["n_tokens"])
        torch.testing.assert_close(got["mom2"], want["mom2"], rtol=2.4e-7, atol=1e-12 * scale)
        assert torch.equal(got["cached.mom2"], got["mom2"]) and torch.equal(got["again.mom2"], got["mom2"])
    assert torch.equal(ranks[0]["mom2"], ranks[1]["mom2"])


@needs_gloo
@pytest.mark.slow
def test_shortcut_under_torchrun_equal_one_process(tmp_path, one_thread):
    ranks = _ranks(_torchrun("shortcut", tmp_path))
    want = cases.shortcut_case()
    for got in ranks:
        assert torch.equal(got["n_tokens"], want["n_tokens"])
        for key in ("weight", "bias"):
            scale = float(want[key].abs().max())
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6 * scale, msg=key)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ("weight", "bias"))  # every rank the same


@needs_gloo
@pytest.mark.slow
def test_jacobian_lens_under_torchrun_equals_one_process(tmp_path, one_thread):
    ranks = _ranks(_torchrun("jacobian_lens", tmp_path))
    want = cases.jacobian_lens_case()
    assert int(want["n_windows"]) == 8
    for got in ranks:
        assert all(torch.equal(got[k], want[k]) for k in ("n_windows", "n_tokens"))
        scale = float(want["weight"].abs().max())
        torch.testing.assert_close(got["weight"], want["weight"], rtol=1e-6, atol=1e-7 * scale)
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])  # every rank the same


@needs_gloo
@pytest.mark.slow
def test_tuned_lens_under_torchrun_equal_one_process_and_its_checkpoint_resumes_alone(tmp_path, one_thread):
    ranks = _ranks(_torchrun("tuned_lens", tmp_path))
    want = cases.tuned_lens_case()
    for got in ranks:
        assert torch.equal(got["steps"], want["steps"]) and int(want["steps"]) == 5
        torch.testing.assert_close(got["weight"], want["weight"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["bias"], want["bias"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["loss"], want["loss"], rtol=0, atol=2e-5)  # global means, 5 decimals
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ("weight", "bias"))  # every rank the same
    checkpoint = tmp_path / "tuned.ckpt.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name) == [checkpoint.name]  # no temp file
    resumed = cases.tuned_lens_case(checkpoint=checkpoint)  # one process, all steps done: the ranks' lens
    assert all(torch.equal(resumed[k], ranks[0][k]) for k in ("weight", "bias", "loss"))


@needs_gloo
@pytest.mark.slow
def test_mining_under_torchrun_equals_one_process_and_an_interrupted_run_resumes_to_it(tmp_path, one_thread):
    out = _torchrun("mining", tmp_path)
    ranks = _ranks(out)
    want = cases.mining_case()
    assert int(want["gpt2.counts"][0]) == 42 and int(want["llama.counts"][0]) > 100
    ties = want["gpt2.scores"][..., 1:] == want["gpt2.scores"][..., :-1]  # repeated sentences tie exactly
    assert bool(ties.any())
    names = ("scores", "example", "position", "example_ids", "example_offsets", "example_tokens", "counts",
             "corpus_fingerprint")
    for got in ranks:
        for family in ("gpt2", "llama"):  # ungated (max m) and signed (max |m|) mining
            for name in names:
                assert torch.equal(got[f"{family}.{name}"], want[f"{family}.{name}"]), (family, name)
        assert got["snapshot.counts"].tolist() == [32, 597]  # the interrupted run's last good snapshot
        for name in names:  # resumed by 2 ranks: the uninterrupted index
            assert torch.equal(got[f"resumed.{name}"], want[f"gpt2.{name}"]), name
    from reslens import kv_memory as kv

    written = kv.TriggerIndex.load(f"{out}.index.safetensors")  # rank 0 wrote it: the same index
    assert torch.equal(written.example, want["gpt2.example"]) and written.n_examples == 42
    import reslens

    model, tokenizer = reslens.load_model()  # the 2-rank run's interrupted snapshot resumes in one process
    alone = kv.mine_triggers(model, tokenizer, cases.MINING_TEXTS, top_k=5, batch_size=2, progress=False,
                             resume=f"{out}.index.safetensors.interrupted")
    for name in ("scores", "example", "position", "example_tokens"):
        assert torch.equal(getattr(alone, name), want[f"gpt2.{name}"]), name


@needs_gloo
@pytest.mark.slow
def test_trace_many_under_torchrun_equals_one_process(tmp_path, one_thread):
    ranks = _ranks(_torchrun("trace_many", tmp_path))
    want = cases.trace_many_case()
    assert want["resid.skipped"].tolist() == [3] and want["resid.probs"].shape[0] == 4  # 4 traced, 1 skipped
    for got in ranks:
        assert got.keys() == want.keys()
        for key in want:  # every fact traced where it ran, with its own noise: the very same numbers
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True, msg=key)


@needs_gloo
@pytest.mark.slow
def test_pca_experiment_under_torchrun_equals_one_process(tmp_path, one_thread):
    ranks = _ranks(_torchrun("pca", tmp_path))
    want = cases.pca_case()
    assert want["examples"].shape == (40, 2) and len(set(want["examples"][:, 0].tolist())) > 9  # > 3 batches
    for got in ranks:
        assert got.keys() == want.keys()
        for key in want:  # every batch captured as one process captures it, every PCA run on all of them
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True, msg=key)


@needs_gloo
@pytest.mark.slow
def test_the_memories_command_mines_under_torchrun_and_rank_0_alone_reports(tmp_path, one_thread):
    from reslens import kv_memory as kv
    from reslens.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(cases.MINING_TEXTS), encoding="utf-8")
    out = tmp_path / "two.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "reslens.cli", "memories", "--mine", str(corpus), "--out", str(out), "--top-k", "5"]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    assert done.stdout.count("TriggerIndex(") == 1 and done.stdout.count("agreement") == 1  # rank 0 alone
    one = tmp_path / "one.safetensors"
    assert main(["memories", "--mine", str(corpus), "--out", str(one), "--top-k", "5"]) == 0
    two, alone = kv.TriggerIndex.load(out), kv.TriggerIndex.load(one)
    for name in ("scores", "example", "position", "example_tokens"):
        assert torch.equal(getattr(two, name), getattr(alone, name)), name
    assert two.corpus_fingerprint == alone.corpus_fingerprint and two.n_examples == alone.n_examples


def test_under_torchrun_a_plain_cuda_device_is_the_local_rank_s_gpu(monkeypatch):
    from reslens._distributed import local_device

    assert local_device("cuda") == "cuda" and local_device(None) is None  # not under torchrun: as given
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert local_device("cuda") == torch.device("cuda", 1) == local_device(torch.device("cuda"))
    assert local_device("cuda:0") == "cuda:0" and local_device("cpu") == "cpu" and local_device(None) is None


REFUSED = {  # case -> what rank 1 alone was given, as every rank must report it
    "lens_stats": "on rank 1 of 2: quantiles must be levels strictly between 0 and 1; got (2.0,)",
    "fit_shortcut": "on rank 1 of 2: ridge=-1.0 is out of range",
    "train_tuned_lens": "on rank 1 of 2: optimizer",
    "compare_lenses": "on rank 1 of 2: lenses is empty",
    "second_moment": "on rank 1 of 2: layer",
    "pca_experiment": "on rank 1 of 2: n=0",
    "mine_triggers": "on rank 1 of 2: top_k=0",
    "trace_many": "on rank 1 of 2: kind",
    "a bad batch mid-pass": "on rank 1 of 2: ",
    "lens_stats, other weights": "the ranks hold different models (rank 0: ",
    "fit_shortcut, other weights": "the ranks hold different models (rank 0: ",
    "lens_stats, another lens": "the ranks were given different lenses (rank 0: tuned lens (fingerprint ",
}


@needs_gloo
@pytest.mark.slow
def test_what_one_rank_refuses_every_rank_refuses_at_once_with_the_same_error(tmp_path):
    out = _torchrun("refusals", tmp_path)
    seen = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]
    assert list(seen[0]) == list(REFUSED) == list(seen[1])
    for case, expected in REFUSED.items():
        first, second = seen[0][case], seen[1][case]
        assert first["raised"] == second["raised"] == "ValueError", (case, first, second)
        assert first["message"] == second["message"] and first["message"].startswith(expected), (case, first)
        assert first["seconds"] < 15 and second["seconds"] < 15, (case, first, second)  # no rank left waiting
    assert "different models (rank 0: " in seen[0]["lens_stats, other weights"]["message"]
    assert "fingerprint" in seen[0]["lens_stats, other weights"]["message"]
