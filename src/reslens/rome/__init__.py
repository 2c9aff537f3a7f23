"""ROME (Meng et al. 2022): a new key -> value pair written into one MLP output projection.

- :class:`SecondMoment` (:mod:`reslens.rome.second_moment`): ``C = E[k k^T]`` of a layer's MLP
  keys over a corpus (ROME's ``layer_stats``), computed, saved and loaded explicitly;
- :func:`rank_one_edit` / :func:`rank_one_edit_ids` (:mod:`reslens.rome.edit`): ROME's
  ``compute_u``, ``compute_v`` and ``execute_rome``, returning an unapplied :class:`RankOneEdit`
  that is applied and restored explicitly (weights never change silently, and an edit restores
  only a weight that still holds what it wrote).

>>> stats = SecondMoment.compute(model, 5, corpus, tokenizer=tok)  # doctest: +SKIP
>>> edit = rank_one_edit(model, tok, "said White", "White", " Holmes", 5,
...                      second_moment=stats)  # doctest: +SKIP
>>> with edit:  # doctest: +SKIP
...     ...  # the model holds the new fact here, and the original weight is back afterwards
"""

from reslens.rome.edit import RankOneEdit, rank_one_edit, rank_one_edit_ids
from reslens.rome.second_moment import SecondMoment, mlp_key_second_moment

__all__ = ["SecondMoment", "RankOneEdit", "mlp_key_second_moment", "rank_one_edit", "rank_one_edit_ids"]
