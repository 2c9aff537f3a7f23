"""reslens: see how a HuggingFace GPT-2 builds its prediction.

Capture exact activations (``reslens.hooks``) from an unmodified model and read them with
the logit lens, residual PCA, MLP key-value memories, attention-head scores and causal
tracing. Conventions (residual indexing, padding, rank, KL direction) are in DESIGN.md.
"""

from reslens.hooks import Batch, Residuals, capture, patch, tokenize, trace
from reslens.models import load_model

__version__ = "0.1.0"

__all__ = ["Batch", "Residuals", "capture", "load_model", "patch", "tokenize", "trace", "__version__"]
