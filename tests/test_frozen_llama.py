"""The refactored reslens must reproduce, bit for bit, what the pre-refactor code (commit 8098230)
computed on a tiny random Llama and on SmolLM2: tests/fixtures/{llama,smollm2}_frozen.safetensors.

A failure here means a number changed. Do not regenerate the fixtures to make it pass: if only an
API moved or was renamed, adapt the extraction helpers in tests/frozen_llama.py (see its
docstring); otherwise the refactor changed the arithmetic. Where the running torch or transformers
is not the build that made the fixture, the failure says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from frozen_llama import _put_big, compute_llama_frozen, tiny_llama
from test_frozen import assert_bit_identical, bits_equal

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FROZEN_COMMIT = "8098230634cf40e8238e4cb485ec59470eef23fb"


def _load_fixture(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURES / f"{kind}_frozen.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})


def _assert_bit_identical(kind: str, compute=compute_llama_frozen, load=_load_fixture) -> None:
    frozen, metadata = load(kind)
    assert_bit_identical(frozen, metadata, compute(kind), label=f"{kind}: ")


@pytest.mark.parametrize("kind", ["llama", "smollm2"])
def test_fixture_comes_from_the_frozen_commit(kind):
    frozen, metadata = _load_fixture(kind)
    assert metadata.get("commit") == FROZEN_COMMIT
    assert metadata.get("model") == kind
    assert metadata.get("n_keys") == str(len(frozen))
    assert {"torch", "transformers", "threads"} <= metadata.keys()
    assert all(t.is_contiguous() for t in frozen.values())
    areas = {key.split("/", 1)[0] for key in frozen}
    assert areas == {"capture", "lens", "lens_stats", "pca", "kv", "lenses", "rome"}


def test_a_changed_number_fails_and_names_a_different_build():
    frozen = {"lens/x": torch.tensor([1.0, 2.0]), "rome/n": torch.tensor(3)}
    now = {"lens/x": torch.tensor([1.0, 2.5]), "rome/n": torch.tensor(3)}
    made = {"torch": "0.0.1+cpu", "transformers": __import__("transformers").__version__}
    with pytest.raises(AssertionError) as failure:
        _assert_bit_identical("llama", compute=lambda kind: now, load=lambda kind: (frozen, made))
    message = str(failure.value)
    assert "1 of 2 frozen results changed" in message and "lens/x: 1/2 elements differ" in message
    assert (
        f"fixture made with torch 0.0.1+cpu, running {torch.__version__}: "
        "bit-exactness across builds is not guaranteed"
    ) in message
    assert "transformers" not in message.split("changed")[1]
    same = {**made, "torch": torch.__version__}
    with pytest.raises(AssertionError) as failure:
        _assert_bit_identical("llama", compute=lambda kind: now, load=lambda kind: (frozen, same))
    assert "bit-exactness" not in str(failure.value)
    _assert_bit_identical("llama", compute=lambda kind: dict(frozen), load=lambda kind: (frozen, made))


def test_a_large_tensor_is_stored_as_its_fingerprint():
    out: dict[str, torch.Tensor] = {}
    x = torch.arange(20_000, dtype=torch.float32).reshape(200, 100)
    _put_big(out, "x", x)
    assert set(out) == {"x/sha256", "x/shape", "x/sample", "x/sum"}
    assert out["x/shape"].tolist() == [200, 100] and out["x/sum"].item() == float(x.double().sum())
    changed: dict[str, torch.Tensor] = {}
    y = x.clone()
    y[123, 45] = torch.nextafter(y[123, 45], torch.tensor(1e9))  # one bit of one element not in the sample
    _put_big(changed, "x", y)
    assert not bits_equal(out["x/sha256"], changed["x/sha256"])
    nan_payload: dict[str, torch.Tensor] = {}
    a, b = x.clone(), x.clone()
    a[0, 0], b[0, 0] = float("nan"), -float("nan")  # NaN bits differ: bits_equal calls them equal
    _put_big(out, "a", a)
    _put_big(nan_payload, "a", b)
    assert bits_equal(out["a/sha256"], nan_payload["a/sha256"])


def test_tiny_llama_weights_are_seeded_here():
    a, b = tiny_llama(), tiny_llama()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.config.vocab_size == 50257 and not a.config.tie_word_embeddings


@pytest.mark.slow
def test_tiny_llama_results_are_bit_identical_to_the_frozen_fixture():
    _assert_bit_identical("llama")


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_results_are_bit_identical_to_the_frozen_fixture(smollm2):
    _assert_bit_identical("smollm2")  # computed on a freshly loaded model; the fixture only skips
