"""The real pretrained model for the real-model test tier: SmolLM2-135M-Instruct from reslens's cache.

Without the model in the cache those tests skip with a visible reason; with ``RESLENS_REQUIRE_REAL_MODEL=1``
(set by ``.ci/run``) a missing model is a failure instead.
"""

from __future__ import annotations

import os

import pytest


def smollm2():
    """``(model, tokenizer)``, or a skip (a failure in CI) when the model is not cached."""
    from reslens import hub, load_model

    if not hub.is_cached("smollm2"):
        reason = (f"SmolLM2-135M is not in the reslens cache ({hub.model_dir('smollm2')}); "
                  "run: reslens download smollm2")
        if os.environ.get("RESLENS_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(reason + " (RESLENS_REQUIRE_REAL_MODEL=1)")
        pytest.skip(reason)
    return load_model("smollm2")
