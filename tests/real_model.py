"""The real pretrained models for the real-model test tier: SmolLM2-135M-Instruct and Gemma 3 270M.

Without the model in the cache those tests skip with a visible reason; with ``RESLENS_REQUIRE_REAL_MODEL=1``
(set by ``.ci/run``) a missing model is a failure instead.
"""

from __future__ import annotations

import os

import pytest


def cached(name: str, what: str):
    """``(model, tokenizer)`` of a named model, or a skip (a failure in CI) when it is not cached."""
    from reslens import hub, load_model

    if not hub.is_cached(name):
        reason = f"{what} is not in the reslens cache ({hub.model_dir(name)}); run: reslens download {name}"
        if os.environ.get("RESLENS_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(reason + " (RESLENS_REQUIRE_REAL_MODEL=1)")
        pytest.skip(reason)
    return load_model(name)


def smollm2():
    """SmolLM2-135M-Instruct: ``(model, tokenizer)``, or a skip (a failure in CI) when not cached."""
    return cached("smollm2", "SmolLM2-135M")


def gemma3():
    """Gemma 3 270M: ``(model, tokenizer)``, or a skip (a failure in CI) when not cached."""
    return cached("gemma3-270m", "Gemma 3 270M")
