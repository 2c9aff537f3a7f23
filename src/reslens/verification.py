"""Every identity reslens relies on, checked on the user's own checkpoint: :func:`verify`.

Each analysis rests on identities that hold when the family adapter (:mod:`reslens.arch`) describes
the model right. :func:`verify` runs them on short inputs (random token ids; a text and a padded pair
of texts with a tokenizer) and gives one row per identity (:data:`ROWS`): its worst error, the
tolerance for the model's dtype, and whether it passed.

Errors are "scaled", ``max |got - want| / max |want|`` over one tensor (one layer of one input, real
positions only), so one tolerance fits a tiny random model and a real one whose residual stream reaches
the hundreds; probabilities (``attn_pattern``, ``lens_probs``) are compared as they are. What reslens
reads straight from the model holds bit for bit in any dtype; the rest agrees to 1e-5 or better in
float32 and to the dtype's rounding (2^-8 bfloat16, 2^-11 float16) times the steps in between (eager
attention rounds its scores before the softmax, hence the wider pattern tolerances), while a wrongly
described model is off by a whole sublayer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from reslens._checks import check_int
from reslens._identities import CHECKS, NotApplicable, as_found, build_run
from reslens._text import html_table
from reslens.arch import adapter

__all__ = ["verify", "Verification", "CheckRow", "ROWS", "TOLERANCES", "TEXTS"]

#: The texts run when a tokenizer is given: the first alone, both as a padded batch.
TEXTS = ("The quick brown fox jumps over the lazy dog.", "Paris is the capital of")

#: ``row: (what it compares, tolerance in float32, bfloat16, float16)``, in the order they are run.
ROWS: dict[str, tuple[str, float, float, float]] = {
    "hidden_states": ("capture resid = HF hidden_states (last: final norm output)", 1e-6, 1e-6, 1e-6),
    "resid_mid": ("resid_mid = resid + attn_out", 1e-5, 2e-2, 3e-3),
    "resid_next": ("resid[l+1] = resid[l] + attn_out + mlp_out", 1e-5, 2e-2, 3e-3),
    "attn_output": ("attn_out = arch.attn_output(attn_z): the heads' sum", 1e-4, 4e-2, 6e-3),
    "mlp_output": ("mlp_out = arch.mlp_output(mlp_act): the memories' sum", 1e-4, 4e-2, 6e-3),
    "attn_pattern": ("attn_pattern = eager attention weights", 1e-4, 1e-1, 2e-2),
    "lens_logits": ("lens last row: arch.logits(resid[n_layer]) = logits", 1e-4, 2e-2, 3e-3),
    "lens_probs": ("lens last row top-k probs = the model's", 1e-4, 2e-2, 3e-3),
    "padding_left": ("left-padded rows = rows run alone", 1e-4, 1.5e-1, 3e-2),
    "padding_right": ("right-padded rows = rows run alone", 1e-4, 1.5e-1, 3e-2),
    "dla_sum": ("logit attribution pieces sum to the logit", 1e-4, 4e-2, 6e-3),
}
#: Tolerance of each row by the model's dtype (float64 uses float32's).
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    dtype: {row: spec[column] for row, spec in ROWS.items()}
    for dtype, column in ((torch.float32, 1), (torch.float64, 1), (torch.bfloat16, 2), (torch.float16, 3))
}


_RESULT = {True: "ok", False: "FAIL", None: "n/a"}


@dataclass(frozen=True)
class CheckRow:
    """One identity checked: its worst ``error`` against ``tolerance``.

    ``passed`` is ``None`` where the check does not apply (``detail`` says why, e.g. a bare body has no
    logits); ``error`` is NaN where the check raised (``detail`` holds the error) or does not apply.
    ``detail`` otherwise says where the worst error is (input, layer).
    """

    check: str
    what: str
    error: float
    tolerance: float
    passed: bool | None
    detail: str = ""


@dataclass(frozen=True, repr=False)
class Verification:
    """What :func:`verify` found: one :class:`CheckRow` per identity; :attr:`passed` when none failed.

    ``model``: the checkpoint's name (or class); ``inputs``: the inputs run; ``seconds``: the time taken.
    """

    rows: tuple[CheckRow, ...]
    model: str
    family: str
    dtype: str
    inputs: tuple[str, ...]
    seconds: float = field(default=0.0, compare=False)

    @property
    def passed(self) -> bool:
        """Whether every check that applies passed."""
        return all(row.passed is not False for row in self.rows)

    @property
    def failed(self) -> tuple[str, ...]:
        """The names of the checks that failed."""
        return tuple(row.check for row in self.rows if row.passed is False)

    def row(self, check: str) -> CheckRow:
        """The row of ``check`` (one of :data:`ROWS`' names)."""
        for row in self.rows:
            if row.check == check:
                return row
        raise ValueError(f"check={check!r} is not a row here; rows: {', '.join(r.check for r in self.rows)}")

    def _title(self) -> str:
        verdict = "all passed" if self.passed else f"FAILED: {', '.join(self.failed)}"
        return (f"reslens verify: {self.model} ({self.family}, {self.dtype}), {len(self.rows)} checks on "
                f"{', '.join(self.inputs)}: {verdict} ({self.seconds:.1f} s)")

    def table(self) -> str:
        """The rows as a text table under a one-line verdict."""
        lines = [self._title(), f"  {'check':<14} {'worst error':>11} {'tolerance':>9}  result  compares"]
        for row in self.rows:
            error = "-" if math.isnan(row.error) else f"{row.error:.2e}"
            detail = f" ({row.detail})" if row.detail else ""
            lines.append(f"  {row.check:<14} {error:>11} {row.tolerance:>9.1e}  {_RESULT[row.passed]:<6}  "
                         f"{row.what}{detail}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        rows = [(r.check, r.error, r.tolerance, _RESULT[r.passed], r.what, r.detail) for r in self.rows]
        header = ("check", "worst error", "tolerance", "result", "compares", "where / why")
        return html_table(self._title(), header, rows)


def _tolerances(dtype: torch.dtype, overrides: Mapping[str, float] | None) -> dict[str, float]:
    """The model's dtype's tolerances with ``overrides`` (which must name every check for another dtype)."""
    out = dict(TOLERANCES.get(dtype, {}))
    if overrides is not None:
        if not isinstance(overrides, Mapping):
            raise TypeError(f"tolerances must map check names to floats; got {type(overrides).__name__}")
        unknown = sorted(set(overrides) - set(ROWS))
        if unknown:
            raise ValueError(f"tolerances names unknown checks {unknown}; the checks: {', '.join(ROWS)}")
        for name, value in overrides.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"tolerances[{name!r}] must be a number >= 0; got {value!r}")
            out[name] = float(value)
    if set(out) != set(ROWS):
        raise ValueError(f"verify has tolerances for float32, bfloat16 and float16 (float64 uses float32's); "
                         f"the model's dtype is {dtype}: pass tolerances={{check: value}} for every check")
    return out


def _check_texts(texts: Any) -> tuple[str, str]:
    if (isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) != 2
            or not all(isinstance(t, str) and t.strip() for t in texts)):
        raise ValueError(f"texts must be two non-empty strings (run alone, then padded together); "
                         f"got {texts!r}")
    return texts[0], texts[1]


def verify(model: Any, tokenizer: Any = None, *, texts: Sequence[str] = TEXTS, n_tokens: int = 12,
           seed: int = 0, tolerances: Mapping[str, float] | None = None) -> Verification:
    """Check every identity reslens relies on, on this model: one row per identity (:data:`ROWS`).

    ``model``: a HuggingFace model of a supported family, or its adapter (an :class:`~reslens.arch.Arch`,
    e.g. one of your own); a model of a family reslens does not know is refused (``TypeError``, naming
    it). ``tokenizer``: with one, ``texts`` (two texts: the first run alone, both padded together) are
    checked beside the random ids. ``n_tokens``: the length of the random runs (>= 7; a second row is 5
    tokens shorter); ``seed``: their seed. ``tolerances``: ``{check: value}`` replacing those of
    :data:`TOLERANCES` for the model's dtype (every check's, for a dtype it has none for).

    Each check runs on its own: one that raises is a failed row (the error in ``detail``) and the others
    still run. The model is left as found: hooks added while it ran removed (reslens's, and the output
    recorders HuggingFace installs for ``output_hidden_states``), the attention implementation and every
    module's ``training`` flag as they were (the checks run in eval mode, without gradients). Hooks
    another thread registers on the model while it runs are removed too.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> result = verify(model)
    >>> result.passed, result.row("resid_next").passed
    (True, True)
    """
    arch = adapter(model)
    n_tokens = check_int(n_tokens, "n_tokens", low=7, high=arch.n_ctx)
    seed = check_int(seed, "seed", low=0)
    texts = _check_texts(texts)
    tolerance = _tolerances(arch.dtype, tolerances)
    start = time.perf_counter()
    rows: list[CheckRow] = []
    with as_found(arch.model):
        run = build_run(arch, tokenizer, texts, n_tokens, seed)
        for name, check in CHECKS.items():
            rows.append(_row(name, check, run, tolerance[name]))
    name = arch.checkpoint_name or type(arch.model).__name__
    return Verification(tuple(rows), name, arch.family, str(arch.dtype).removeprefix("torch."),
                        tuple(label for label, _ in run.inputs), time.perf_counter() - start)


def _row(name: str, check: Any, run: Any, tolerance: float) -> CheckRow:
    """Run one check: its row, failed with the error's first line where it raises."""
    what = ROWS[name][0]
    try:
        worst = check(run)
    except NotApplicable as why:
        return CheckRow(name, what, math.nan, tolerance, None, str(why))
    except Exception as error:  # noqa: BLE001 - a check that raises is a failed row, not the end
        lines = str(error).strip().splitlines()
        message = f"{type(error).__name__}: {lines[0] if lines else ''}"
        return CheckRow(name, what, math.nan, tolerance, False, message)
    return CheckRow(name, what, worst.error, tolerance, worst.error <= tolerance,
                    f"worst: {worst.where}" if worst.where else "")
