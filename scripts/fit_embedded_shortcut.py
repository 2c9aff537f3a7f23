"""Fit the learned lens the embedded GPT-2 ships with and write it beside the model.

The same recipe as every model reslens downloads (``reslens.model_lens.fit_model_lens``): a linear
shortcut on ``N_TOKENS`` tokens the model writes itself from the seed prompts, seed 0. Run it again
whenever the embedded model changes (the lens records the model's fingerprint, and a lens of another
model is refused):

    python scripts/fit_embedded_shortcut.py
"""

from __future__ import annotations

import reslens
from reslens.model_lens import N_TOKENS, fit_self_shortcut, model_lens_path


def main() -> None:
    model, tokenizer = reslens.load_model()
    lens = fit_self_shortcut(model, tokenizer, n_tokens=N_TOKENS, name="embedded GPT-2")
    path = model_lens_path(None)
    lens.save(path)
    print(f"{lens} in {lens.config['seconds']} s -> {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
