"""Boundary validation shared by the public functions.

Each check raises ``TypeError`` or ``ValueError`` naming the parameter, what it received
and what was expected; none of them touches the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "check_ids",
    "check_mask",
    "check_layers",
    "check_block",
    "check_sites",
    "check_dtype",
    "check_device",
    "check_edits",
    "check_tokenizer",
    "check_int",
    "check_float",
    "check_bool",
    "check_choice",
    "check_position",
    "check_finite",
    "check_residuals_fit",
    "available_memory",
    "check_memory",
]


def _span(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{low}..{high}"
    return f">= {low}" if low is not None else f"<= {high}"


def check_int(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool, not a float) in ``low..high`` (inclusive; ``None`` = unbounded).

    >>> check_int(3, "top_k", low=1)
    3
    >>> check_int(0, "top_k", low=1)
    Traceback (most recent call last):
    ValueError: top_k=0 is out of range (expected >= 1)
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value} is out of range (expected {_span(low, high)})")
    return int(value)


def check_float(
    value: object, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """A finite real number (int or float, not a bool) in ``[low, high]`` (open below: ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        bound = f"> {low}" if low_open and high is None else _span(low, high)
        raise ValueError(f"{name}={value} is out of range (expected {bound})")
    return value


def check_bool(value: object, name: str) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")
    return value


def check_choice(value: object, choices: Sequence[object], name: str) -> object:
    """One of ``choices`` (compared with ``==``; ``None`` may be one of them)."""
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        raise TypeError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_position(position: object, attention_mask: torch.Tensor, *, name: str = "position") -> torch.Tensor:
    """One position per sequence ``[batch]`` (long) on the padded ``pos`` axis.

    reslens's one meaning of ``position``: an index of the ``pos`` axis of the (padded)
    batch, negatives counting from its end, or ``None`` for each sequence's last real token.
    The position must hold a real token in every sequence (not padding).
    """
    mask = attention_mask.bool()
    n_pos = mask.shape[-1]
    if position is None:
        # the last real token: the largest index where the mask is True
        index = torch.arange(n_pos, device=mask.device).expand_as(mask)
        return torch.where(mask, index, -1).amax(-1)
    check_int(position, name, low=-n_pos, high=n_pos - 1)
    pos = position % n_pos
    padded = (~mask[:, pos]).nonzero().flatten().tolist()
    if padded:
        raise ValueError(
            f"{name}={position} is a padding position in sequence(s) {padded}; pass position=None for each "
            "sequence's last real token, or an index of a real token"
        )
    return torch.full((mask.shape[0],), pos, dtype=torch.long, device=mask.device)


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` with no NaN or infinity (a ``ValueError`` says how many entries are not finite)."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(
            f"{name} has {bad} non-finite entries (NaN or inf) of {x.numel()}; it cannot be used"
        )
    return x


def check_ids(input_ids: object, *, d_vocab: int, n_ctx: int, name: str = "input_ids") -> torch.Tensor:
    """A ``[batch, pos]`` integer tensor of in-vocabulary ids that fits the context."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of token ids [batch, pos]; got {type(input_ids).__name__}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids; got dtype {input_ids.dtype}")
    if input_ids.ndim != 2:
        hint = " (add a batch axis with ids[None])" if input_ids.ndim == 1 else ""
        raise ValueError(
            f"{name} must be 2-D [batch, pos]; got {input_ids.ndim}-D with shape "
            f"{tuple(input_ids.shape)}{hint}"
        )
    batch, n_pos = input_ids.shape
    if batch == 0 or n_pos == 0:
        raise ValueError(f"{name} is empty (shape {tuple(input_ids.shape)}); give at least one token")
    if n_pos > n_ctx:
        raise ValueError(
            f"{name} has {n_pos} positions, more than the model's context n_ctx={n_ctx}; "
            "shorten or split the input"
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= d_vocab:
        bad = high if high >= d_vocab else low
        raise ValueError(f"{name} contains token id {bad}, outside the vocabulary 0..{d_vocab - 1}")
    return input_ids


def check_mask(
    attention_mask: object, input_ids: torch.Tensor, *, name: str = "attention_mask"
) -> torch.Tensor:
    """A ``[batch, pos]`` 0/1 mask shaped like the ids, with at least one real token per row."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [batch, pos]; got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"{name} has shape {tuple(attention_mask.shape)}; "
            f"expected the ids' shape {tuple(input_ids.shape)}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 (padding) and 1 (real token)")
    empty = (~attention_mask.bool()).all(dim=-1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name} marks no real token in sequence(s) {empty}; every sequence needs one")
    return attention_mask.bool()


def check_sites(sites: object, known: Sequence[str], *, name: str = "sites") -> tuple[str, ...]:
    """A non-empty collection of known site names, deduplicated in order."""
    if isinstance(sites, str):
        sites = (sites,)
    if not isinstance(sites, Iterable):
        raise TypeError(f"{name} must be a site name or a sequence of them; got {type(sites).__name__}")
    sites = tuple(sites)
    if not sites:
        raise ValueError(f"{name} is empty; choose from {', '.join(known)}")
    for site in sites:
        if site not in known:
            raise ValueError(f"{name} contains unknown site {site!r}; known sites: {', '.join(known)}")
    return tuple(dict.fromkeys(sites))


def check_layers(layers: object, n_max: int, *, what: str, name: str = "layers") -> tuple[int, ...]:
    """Sorted unique layer indices in ``0..n_max``; negative indices count from the end; None = all."""
    if layers is None:
        return tuple(range(n_max + 1))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if isinstance(layers, range):
        layers = tuple(layers)
    if not isinstance(layers, Iterable) or isinstance(layers, (str, bytes)):
        raise TypeError(f"{name} must be an int, a sequence of ints or None; got {type(layers).__name__}")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name} must contain ints; got {layer!r} ({type(layer).__name__})")
        if not -(n_max + 1) <= layer <= n_max:
            raise ValueError(f"{name} contains {layer}, out of range for {what} (0..{n_max})")
        out.append(layer % (n_max + 1))
    if not out:
        raise ValueError(f"{name} is empty; pass None for all layers")
    return tuple(sorted(set(out)))


def check_block(layer: object, n_layer: int, *, name: str = "layer") -> int:
    """One block index ``0..n_layer - 1``; negative indices count from the end."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{name} must be an int block index; got {layer!r} ({type(layer).__name__})")
    (block,) = check_layers(layer, n_layer - 1, what=f"a {n_layer}-layer model's blocks", name=name)
    return block


def check_dtype(dtype: object, *, name: str = "dtype") -> torch.dtype | None:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (e.g. torch.float32) or None; got {dtype!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating dtype to store activations; got {dtype}")
    return dtype


def check_device(device: object, *, name: str = "device") -> torch.device | None:
    if device is None:
        return None
    try:
        checked = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name}={device!r} is not a valid torch device ({error})") from None
    if checked.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}={device!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use {name}='cpu', or None for the model's own device")
        if checked.index is not None and checked.index >= count:
            raise ValueError(f"{name}={device!r}: this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1})")
    if checked.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={device!r}: MPS is not available on this machine; use {name}='cpu', "
                         "or None for the model's own device")
    return checked


def check_edits(edits: Any, sites: tuple[str, ...], n_layer: int) -> dict[tuple[str, int], Any]:
    """A patch's ``{(site, layer): function}``: known sites, layers in range (negatives from the end)."""
    if not isinstance(edits, Mapping):
        raise TypeError(f"edits must be a mapping {{(site, layer): function}}; got {type(edits).__name__}")
    checked: dict[tuple[str, int], Any] = {}
    for key, fn in edits.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"edits keys must be (site, layer) pairs; got {key!r}")
        site, layer = key
        check_sites((site,), sites, name="edits site")
        n_max = n_layer if site == "resid" else n_layer - 1
        (layer,) = check_layers(layer, n_max, what=f"site {site!r} of a {n_layer}-layer model",
                                name=f"edits layer for {site!r}")
        if not callable(fn):
            raise TypeError(
                f"edits[({site!r}, {layer})] must be a function tensor -> tensor; got {type(fn).__name__}"
            )
        if (site, layer) in checked:
            raise ValueError(f"edits names ({site!r}, {layer}) twice (negative and positive layer numbers?)")
        checked[(site, layer)] = fn
    return checked


def check_tokenizer(tokenizer: object, *, name: str = "tokenizer", why: str = "") -> None:
    """A HuggingFace tokenizer (anything callable on text); ``why`` says what needs one."""
    if tokenizer is None or not callable(tokenizer):
        need = f" ({why})" if why else ""
        raise TypeError(f"{name} must be a HuggingFace tokenizer{need}, e.g. the second value of "
                        f"reslens.load_model(); got {tokenizer!r}")
def _recorded_sizes(residuals: Any) -> list[tuple[str, int]]:
    """``(what, size)`` pairs that a capture records about its model: widths, the deepest layer, ids."""
    def last(site: str) -> int | None:
        t = getattr(residuals, site, None)
        return None if t is None else int(t.shape[-1])

    sizes = [(f"{site} width (d_model)", last(site))
             for site in ("resid", "resid_mid", "attn_out", "mlp_out", "final")]
    sizes += [(f"{site} width (d_mlp)", last(site)) for site in ("mlp_act", "mlp_up", "mlp_gate")]
    sizes += [("logits width (d_vocab)", last("logits"))]
    pattern = getattr(residuals, "attn_pattern", None)
    sizes += [("attn_pattern heads (n_head)", None if pattern is None else int(pattern.shape[2]))]
    return [(what, size) for what, size in sizes if size is not None]


def check_residuals_fit(residuals: Any, arch: Any, *, name: str = "residuals") -> None:
    """Captured ``residuals`` whose recorded sizes are those of ``arch``'s model (not another model's).

    Compares every width a capture records (``d_model``, ``d_mlp``, ``d_vocab``, heads), its layers and
    blocks, and its token ids with the model's.
    """
    want = {"d_model": arch.d_model, "d_mlp": arch.d_mlp, "d_vocab": arch.d_vocab, "n_head": arch.n_head}
    found = [(what, size, want[what[what.index("(") + 1 : -1]]) for what, size in _recorded_sizes(residuals)]
    if getattr(residuals, "resid", None) is not None:
        found.append(("deepest resid layer", max(residuals.layers, default=0), arch.n_layer))
    found.append(("deepest block", max(residuals.blocks, default=-1), arch.n_layer - 1))
    ids = getattr(residuals, "input_ids", None)
    if ids is not None and ids.numel():
        found.append(("largest token id", int(ids.max()), arch.d_vocab - 1))
    for what, got, expected in found:
        bad = got > expected if what.startswith(("deepest", "largest")) else got != expected
        if bad:
            bound = "at most " if what.startswith(("deepest", "largest")) else ""
            raise ValueError(
                f"{name} were captured from another model: their {what} is {got}, where this "
                f"{arch.n_layer}-layer model (d_model {arch.d_model}, d_mlp {arch.d_mlp}) has "
                f"{bound}{expected}; capture them from this model (reslens.capture(model, ...))"
            )


def available_memory(device: object) -> int | None:
    """Bytes free for new tensors on ``device``: a GPU's free memory, the system's available one for the CPU.

    ``None`` where it cannot be told (another device type, no ``/proc/meminfo`` nor ``sysconf``).
    """
    device = torch.device(device)  # type: ignore[arg-type]
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GB"
    return f"{n / 2**20:.1f} MB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MB"


def check_memory(n_bytes: int, device: object, *, what: str, fix: str) -> None:
    """Refuse work whose tensors (``n_bytes``, an estimate) would not fit in ``device``'s free memory."""
    free = available_memory(device)
    if free is not None and n_bytes > free:
        raise ValueError(f"{what} needs about {_bytes(n_bytes)}, and {torch.device(device)} has "  # type: ignore[arg-type]
                         f"{_bytes(free)} free; {fix}")
