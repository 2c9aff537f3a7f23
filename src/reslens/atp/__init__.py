"""Attribution patching that checks itself (:func:`attribution_patching`).

Gradient estimates of every component's patching effect (AtP, integrated gradients), verified by
exact batched patches.
"""

from reslens.atp.edges import EdgeResult, edge_attribution
from reslens.atp.estimate import attribution_patching
from reslens.atp.metrics import KLToClean, kl_to_clean, log_prob, logit_diff, prob
from reslens.atp.result import AtPResult, KindScores

__all__ = ["attribution_patching", "AtPResult", "KindScores", "edge_attribution", "EdgeResult", "logit_diff",
           "log_prob", "prob", "kl_to_clean", "KLToClean"]
