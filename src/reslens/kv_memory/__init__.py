"""The MLP as key-value memories (Geva et al. 2021): ``FF(x) = Σ_i m_i v_i + b``.

Exact on every supported family. For a gated MLP ``m_i = act(g_i·x̂)(u_i·x̂)`` takes both signs,
so triggers are mined by ``|m|`` with the sign kept, the agreement reads a value's bottom token
where its top trigger wrote ``-v``, and deletion neurons are classified by the up key.

- :mod:`~reslens.kv_memory.memories`: keys, values, coefficients, a position's MLP output split
  into its memories (:func:`contributions` on text or ids; :func:`contributions_of` on captured
  residuals), coefficient edits (:func:`edit_coefficients`)
- :mod:`~reslens.kv_memory.neurons`: readings of the weights alone: the direction a value writes
  (:func:`value_directions`: ``γ_out ⊙ v`` under an MLP output norm), values in vocabulary space
  (:func:`value_tokens`), key-value cosines (:func:`deletion_neurons`)
- :mod:`~reslens.kv_memory.triggers`: the :class:`TriggerIndex` and its :class:`Trigger` records
- :mod:`~reslens.kv_memory.mining`: :func:`mine_triggers` over a corpus, resumable
- :mod:`~reslens.kv_memory.kv_agreement`: :func:`agreement` of values with their keys' triggers
"""

from reslens._corpus import UNITS
from reslens.kv_memory.kv_agreement import KeyValueAgreement, agreement
from reslens.kv_memory.memories import (
    Memory,
    MemoryContributions,
    coefficients,
    contributions,
    contributions_of,
    edit_coefficients,
    keys,
    values,
)
from reslens.kv_memory.mining import mine_triggers, model_fingerprint
from reslens.kv_memory.neurons import (
    DeletionNeurons,
    ValueTokens,
    deletion_neurons,
    value_directions,
    value_tokens,
)
from reslens.kv_memory.triggers import Trigger, TriggerIndex

__all__ = [
    "keys", "values", "coefficients", "contributions", "contributions_of", "MemoryContributions", "Memory",
    "value_tokens", "ValueTokens", "value_directions", "mine_triggers", "TriggerIndex", "Trigger",
    "agreement", "KeyValueAgreement", "deletion_neurons", "DeletionNeurons", "edit_coefficients",
    "model_fingerprint", "UNITS",
]
