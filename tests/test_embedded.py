"""The embedded default model: tokenizer ids, loading, dtype, the card, and the wheel's contents."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

import reslens.models

EMBEDDED = reslens.models.embedded_model_dir()
REPO = Path(__file__).resolve().parents[1]
HELD_OUT_BOOKS = (
    "105-persuasion.txt",
    "2852-hound-of-the-baskervilles.txt",
    "12-through-the-looking-glass.txt",
)
PACKAGE_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "MODEL_CARD.md",
    "shortcut.safetensors",  # the learned lens it ships with (reslens.model_lens)
)


@pytest.fixture(scope="module")
def loaded():
    return reslens.models.load_model()


def test_tokenizer_has_gpt2_ids(loaded):
    _, tokenizer = loaded
    assert len(tokenizer) == 50257
    assert tokenizer.encode("Mr") == [5246]
    assert tokenizer.encode(" the") == [262]
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.eos_token_id == 50256


def test_tokenizer_round_trip(loaded):
    _, tokenizer = loaded
    text = (
        "“Well, Watson, what do you make of it?” said Mr. Holmes — and _then_ he smiled.\n\n  [Illustration]"
    )
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_load_model_defaults(loaded):
    model, _ = loaded
    assert isinstance(model, GPT2LMHeadModel)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.vocab_size == 50257
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_load_model_gives_finite_logits(loaded):
    model, tokenizer = loaded
    ids = torch.tensor([tokenizer.encode("It was a dark and stormy night")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 50257)
    assert torch.isfinite(logits).all()


def test_load_model_honours_dtype():
    model, _ = reslens.models.load_model(dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_weights_are_small_fp16_safetensors():
    from safetensors import safe_open

    path = EMBEDDED / "model.safetensors"
    assert path.stat().st_size <= 40_000_000
    with safe_open(str(path), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}


def test_card_names_held_out_books_and_licences():
    card = (EMBEDDED / "MODEL_CARD.md").read_text(encoding="utf-8")
    for name in HELD_OUT_BOOKS:
        assert name in card
    assert "MIT" in card and "public domain" in card.lower()
    assert "Copyright (c) 2020 AIDungeon" in (EMBEDDED / "TOKENIZER_LICENSE").read_text(encoding="utf-8")


def test_wheel_ships_the_embedded_model(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("reslens-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in PACKAGE_FILES + ("TOKENIZER_LICENSE",):
        assert f"reslens/data/embedded/{name}" in names

    # A non-editable install of that wheel loads the model offline.
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    code = (
        "import reslens.models as m; model, tok = m.load_model(); "
        "print(m.__file__); print(model.config.vocab_size, tok.encode('Mr'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
    )
    module_file, numbers = result.stdout.strip().splitlines()[-2:]
    assert module_file.startswith(str(target))
    assert numbers == "50257 [5246]"


def test_sdist_carries_what_its_tests_import_and_the_description_links_nothing_outside(tmp_path):
    import tarfile

    command = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(REPO)]
    subprocess.run(command, check=True, capture_output=True)
    (sdist,) = tmp_path.glob("reslens-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for needed in ("tests/conftest.py", "tests/helpers.py", "tests/real_model.py", "tests/frozen_results.py",
                   "tests/fixtures/gpt2_frozen.safetensors", "src/reslens/data/embedded/model.safetensors"):
        assert needed in names, needed
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "](../" not in readme and "](shared" not in readme  # no link out of the package in its description
