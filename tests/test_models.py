"""load_model with a local directory, and the errors for what cannot load."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

import reslens
from reslens.models import embedded_model_dir
from helpers import make_model


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_model(vocab_size=50257).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((embedded_model_dir() / name).read_bytes())
    return path


def test_local_directory_loads_in_eval_mode(local_dir):
    model, tokenizer = reslens.load_model(local_dir, dtype=torch.bfloat16)
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert tokenizer("Mr")["input_ids"] == [5246]
    reference = make_model(vocab_size=50257)
    assert torch.equal(
        model.transformer.h[0].mlp.c_fc.weight.float(),
        reference.transformer.h[0].mlp.c_fc.weight.bfloat16().float(),
    )


def test_missing_local_path_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="looks like a local path"):
        reslens.load_model(str(tmp_path / "nothing" / "here"))


def test_bad_arguments():
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        reslens.load_model(dtype="float16")
    with pytest.raises(TypeError, match="name must be"):
        reslens.load_model(123)


def test_a_device_this_machine_lacks_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="device='cuda': CUDA is not available on this machine"):
        reslens.load_model(device="cuda")


def test_unreachable_hub_suggests_a_local_path_or_the_default():
    code = "\n".join(["import reslens", "try:", "    reslens.load_model('gpt2-no-such-model')",
                      "except OSError as e:", "    print(e)", ""])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    ).stdout
    assert "hub may be unreachable" in out and "local directory" in out and "load_model() with no name" in out


def _load_in_a_process(name: str, **env: str) -> tuple[str, float]:
    """``load_model(name)``'s outcome in a new process (hub settings are read at import) and its time."""
    import time

    code = "\n".join(["import reslens", "try:", f"    reslens.load_model({name!r}); print('loaded')",
                      "except OSError as e:", "    print(e)", ""])
    clean = {k: v for k, v in os.environ.items()
             if "PROXY" not in k.upper() and not k.startswith("HF_HUB_OFFLINE")}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**clean, **env}).stdout
    return out, time.perf_counter() - start


def test_a_mistyped_name_fails_at_once_with_the_closest_known_one(tmp_path):
    """``load_model("smolm2")`` spent ~25 s in the hub's retries; a hub that does not answer is found at once
    (here one whose port refuses connections) and the closest name reslens knows is suggested."""
    out, seconds = _load_in_a_process("smolm2", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))
    assert "could not load 'smolm2': it is neither a model reslens knows (smollm2, gemma3-270m) nor a " \
        "local path (did you mean 'smollm2'?)" in out
    assert "127.0.0.1:9 does not answer" in out and "local directory" in out
    assert seconds < 20, seconds


def test_a_cached_hub_model_loads_without_the_hub(tmp_path):
    """A hub name in the HuggingFace cache loads from it when the hub does not answer, without retries."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / ("0" * 40)
    make_model(vocab_size=50257).save_pretrained(snapshot)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).write_bytes((embedded_model_dir() / name).read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    out, seconds = _load_in_a_process("someone/tiny-gpt2", HF_ENDPOINT="http://127.0.0.1:9",
                                      HF_HOME=str(tmp_path))
    assert out.strip() == "loaded" and seconds < 20, (out, seconds)


def test_another_familys_checkpoint_is_refused_before_loading(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(
        BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50
        )
    ).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((embedded_model_dir() / name).read_bytes())
    with pytest.raises(TypeError, match="'bert' model; reslens supports the families gemma, .*gpt2, .*qwen3"):
        reslens.load_model(tmp_path)


def test_a_checkpoint_missing_weights_is_refused(local_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    for f in local_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [k for k in weights if k.endswith("h.1.mlp.c_fc.weight")]
    assert dropped
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="lacks 1 of the model's weights.*c_fc"):
        reslens.load_model(tmp_path)


def test_loading_prints_no_weights_bar(local_dir, capfd):
    reslens.load_model(local_dir)
    reslens.load_model()
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
