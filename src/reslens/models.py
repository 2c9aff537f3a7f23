"""Load a model of a supported family and its tokenizer.

The embedded default shipped in the package, or any ``from_pretrained`` name or local directory.

The embedded default lives in ``reslens/data/embedded/`` (``config.json``,
``model.safetensors``, the tokenizer files written by ``save_pretrained`` and
``MODEL_CARD.md``). It loads offline, as float32 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import contextlib
import os
from importlib import resources
from pathlib import Path
import torch

from reslens._checks import check_dtype
from reslens._distributed import local_device

__all__ = ["load_model", "embedded_model_dir"]


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


def _hub_error(name: object, error: Exception) -> OSError:
    return OSError(
        f"could not load {name!r} with from_pretrained: the HuggingFace hub may be unreachable "
        f"from here ({error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
        "Pass a local directory that holds the model (config.json, weights, tokenizer files), "
        "or call reslens.load_model() with no name for the embedded offline model."
    )


def _load_config(name: object, source: str | Path, local_only: bool):
    """The checkpoint's config, read first: an unsupported family is refused before any weight loads."""
    from transformers import AutoConfig

    from reslens.arch import FAMILIES

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except OSError as error:
        if isinstance(source, Path):
            raise
        raise _hub_error(name, error) from error
    except ValueError as error:
        raise ValueError(f"cannot read the config of {str(source)!r}: {error}") from None
    if config.model_type not in FAMILIES:
        raise TypeError(
            f"{str(source)!r} holds a {config.model_type!r} model; reslens supports the families "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return config


def _known_models() -> tuple[str, ...]:
    from reslens.hub import KNOWN

    return tuple(KNOWN)


def _load_gguf(path: Path, *, device: str | torch.device | None, dtype: torch.dtype | None):
    """``(model, tokenizer)`` from one GGUF file, dequantised by transformers' GGUF loader."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from reslens.arch import FAMILIES
    from reslens.hub import _need_gguf_extra

    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    _need_gguf_extra()
    folder, file = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if config.model_type not in FAMILIES:
        raise TypeError(f"{str(path)!r} holds a {config.model_type!r} model; reslens supports the families "
                        f"{', '.join(sorted(FAMILIES))}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(local_device(device))
    return model.eval(), tokenizer


def embedded_model_dir() -> Path:
    """The folder inside the installed package that holds the embedded default model."""
    return Path(str(resources.files("reslens") / "data" / "embedded"))


def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Return ``(model, tokenizer)`` in eval mode.

    - ``name=None``: the small GPT-2 embedded in the package (offline, float32 by default; a weak
      CPU-trained stand-in, right for tests).
    - a name reslens knows (``"smollm2"``: SmolLM2-135M-Instruct, see :mod:`reslens.hub`): fetched
      and converted into reslens's cache on first use, read from there afterwards.
    - a ``.gguf`` file: read with transformers' GGUF loader (the ``gguf`` extra), dequantised.
    - a hub name or a local directory of any supported family: ``from_pretrained``; when the hub
      cannot be reached the error says so and suggests a local path or the default.

    A checkpoint of an unsupported family is refused (``TypeError``) before its weights load, and one
    that lacks weights is refused (``ValueError``) rather than returned partly random.

    ``device="cuda"`` under ``torchrun`` means this rank's GPU (``cuda:LOCAL_RANK``), so a
    data-parallel script puts one model on each GPU without a code change.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_dtype(dtype)
    if name is not None and not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model name, a local path or None; got {type(name).__name__}")

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

        source = hub.download(name) if not hub.is_cached(name) else hub.model_dir(name)
        local_only = True
    elif str(name).endswith(".gguf"):
        return _load_gguf(Path(name).expanduser(), device=device, dtype=dtype)
    else:
        path = Path(name).expanduser()
        looks_local = (
            isinstance(name, os.PathLike)
            or str(name).startswith((".", "~", os.sep))
            or str(name).count("/") > 1
        )
        if looks_local and not path.exists():
            raise FileNotFoundError(f"name={str(name)!r} looks like a local path, but nothing is there")
        source = path if path.exists() else str(name)
        local_only = False

    config = _load_config(name, source, local_only)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        with _quiet_progress():
            model, info = AutoModelForCausalLM.from_pretrained(
                source, config=config, dtype=dtype, local_files_only=local_only, output_loading_info=True
            )
    except OSError as error:
        if isinstance(source, Path):
            raise
        raise _hub_error(name, error) from error
    missing = list(info.get("missing_keys", ()))
    if missing:
        raise ValueError(
            f"{str(name if name is not None else source)!r} lacks {len(missing)} of the model's weights "
            f"(e.g. {', '.join(missing[:3])}); the checkpoint does not match its config.json "
            f"(model_type={config.model_type!r}), so reslens refuses a partly random model"
        )
    if device is not None:
        model = model.to(local_device(device))
    model.eval()
    return model, tokenizer
