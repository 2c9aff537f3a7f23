"""The refactored reslens must reproduce, bit for bit, what the pre-refactor code (commit
1216a70) computed on the embedded GPT-2: tests/fixtures/gpt2_frozen.safetensors.

A failure here means a number changed. Do not regenerate the fixture to make it pass: if only
an API moved or was renamed, adapt the extraction helpers in tests/frozen_results.py (see its
docstring); otherwise the refactor changed the arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from frozen_results import compute_frozen_results

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpt2_frozen.safetensors"
FROZEN_COMMIT = "1216a7065bb1bc9364a5ed5e41705f6557039f17"
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _load_fixture() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURE), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits; for floating point, NaN positions must match (NaN == NaN,
    whatever its payload) and every other element must have the same bit pattern (so -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    nan_a, nan_b = a.isnan(), b.isnan()
    if not torch.equal(nan_a, nan_b):
        return False
    as_int = _INT_OF_SIZE[a.element_size()]
    return torch.equal(a[~nan_a].view(as_int), b[~nan_b].view(as_int))


def _describe(key: str, frozen: torch.Tensor, now: torch.Tensor) -> str:
    if frozen.dtype != now.dtype or frozen.shape != now.shape:
        return f"{key}: frozen {frozen.dtype} {tuple(frozen.shape)}, now {now.dtype} {tuple(now.shape)}"
    if frozen.dtype.is_floating_point:
        nan_f, nan_n = frozen.isnan(), now.isnan()
        if not torch.equal(nan_f, nan_n):
            return f"{key}: NaN at {int((nan_f ^ nan_n).sum())} different positions"
        f, n = frozen[~nan_f].double(), now[~nan_n].double()
        differ = int((f != n).sum())
        if differ == 0:
            return f"{key}: equal values but different bits (signed zeros)"
        return f"{key}: {differ}/{f.numel()} elements differ, max |diff| {float((f - n).abs().max()):.3g}"
    return f"{key}: {int((frozen != now).sum())}/{frozen.numel()} elements differ"


def build_note(metadata: dict[str, str]) -> str:
    """Say so where the running torch or transformers is not the build the fixture was made with.

    Bit equality is only promised on the build that made the fixture (metadata ``torch`` and
    ``transformers``); "" when both match.
    """
    import transformers

    notes = [
        f"fixture made with {name} {metadata.get(name, '?')}, running {running}: "
        "bit-exactness across builds is not guaranteed"
        for name, running in (("torch", torch.__version__), ("transformers", transformers.__version__))
        if metadata.get(name) != running
    ]
    return "\n".join(notes)


def test_bits_equal_helper():
    x = torch.tensor([1.0, float("nan"), 0.0])
    assert bits_equal(x, x.clone())
    assert not bits_equal(x, torch.tensor([1.0, 2.0, 0.0]))
    assert not bits_equal(x, torch.tensor([1.0, float("nan"), -0.0]))
    assert not bits_equal(x, x.double())
    assert bits_equal(torch.tensor([3, -1]), torch.tensor([3, -1]))


def test_fixture_comes_from_the_frozen_commit():
    frozen, metadata = _load_fixture()
    assert metadata.get("commit") == FROZEN_COMMIT
    assert metadata.get("n_keys") == str(len(frozen))
    assert all(t.is_contiguous() for t in frozen.values())


@pytest.mark.slow
def assert_bit_identical(frozen: dict, metadata: dict, now: dict, label: str = "") -> None:
    """Every key of ``now`` is a contiguous CPU tensor bit-equal to ``frozen``'s; a failure says the build."""
    missing, extra = sorted(frozen.keys() - now.keys()), sorted(now.keys() - frozen.keys())
    assert not missing and not extra, f"key sets differ: missing {missing}, unexpected {extra}"
    for key, value in now.items():
        assert value.device.type == "cpu" and value.is_contiguous(), f"{key} is not a contiguous CPU tensor"
    failures = [
        _describe(key, frozen[key], now[key])
        for key in sorted(frozen)
        if not bits_equal(frozen[key], now[key])
    ]
    note = build_note(metadata) if failures else ""
    changed = f"{label}{len(failures)} of {len(frozen)} frozen results changed:\n"
    assert not failures, (changed + "\n".join(failures) + f"\n{note}").rstrip()


def test_results_are_bit_identical_to_the_frozen_fixture():
    frozen, metadata = _load_fixture()
    assert_bit_identical(frozen, metadata, compute_frozen_results())


def test_build_note_names_a_different_build():
    import transformers

    same = {"torch": torch.__version__, "transformers": transformers.__version__}
    assert build_note(same) == ""
    note = build_note({**same, "torch": "0.0.1+cpu"})
    assert note == (
        f"fixture made with torch 0.0.1+cpu, running {torch.__version__}: "
        "bit-exactness across builds is not guaranteed"
    )
    assert "transformers" in build_note({"torch": torch.__version__})
