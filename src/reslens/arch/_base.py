"""The role-named interface every family adapter implements: :class:`Arch`, an abstract base class.

Analyses ask an :class:`Arch` for modules by role (blocks, final norm, the attention output
projection, the MLP output projection), norms as data (:class:`~reslens.arch.Norm`), weights in
one orientation (row-vector convention ``x @ W``, every MLP matrix ``[d_mlp, d_model]``), logits of
residuals (:meth:`Arch.logits`) and the partial forwards causal tracing needs. Only ``arch/`` names
HuggingFace modules.

A family is data where it is data (its :class:`~reslens.arch.Layout`: module paths, the body's
arguments) and code where it is behaviour (the abstract methods: norms as data, per-head and MLP
weights, the attention pattern, keys and values, the block's extra inputs); everything both families
share is written once here. An adapter that leaves an abstract method out fails when built.

Models dispatched by accelerate (``device_map=``, with layers on several devices, in CPU memory or
on disk) are read the same way: :attr:`Arch.device` is where analyses run (where the embedding
runs); weights come back there with their values (offloaded ones read from accelerate's weights
map, :mod:`reslens.arch._offload`) and the partial forwards return their results there.
"""

from __future__ import annotations

import abc
from typing import Any, Literal

import torch
from torch import nn

from reslens.arch import _digest, _offload
from reslens.arch._layout import Layout, Modules
from reslens.arch._pieces import Pieces
from reslens.arch._sites import Sites
from reslens.arch._norm import Norm
from reslens.arch._offload import StoredParam
from reslens.arch._values import MLPWeights, PatternHook, PrefixCache

__all__ = ["Arch"]


class Arch(Modules, Sites, Pieces, abc.ABC):
    """A read-only, role-named view of one HuggingFace decoder-only LM.

    A family adapter sets :attr:`family`, :attr:`positional` and :attr:`layout` as class attributes
    and implements every abstract method; building one that misses any raises ``TypeError``. Its
    modules by role (``blocks``, ``attn(layer)``, ``mlp_out_proj(layer)``, ...) come from the layout
    (:class:`~reslens.arch._layout.Modules`). Weights come back as views of what HuggingFace stores.
    """

    #: patterns (``re.search``) of checkpoint keys that older saves of the family hold and that carry
    #: no weight (buffers since dropped); any other key the model does not use makes loading refuse
    legacy_checkpoint_keys: tuple[str, ...] = ()
    model: nn.Module

    # --- what the family is: data, set by each adapter as class attributes -------------------

    @property
    @abc.abstractmethod
    def family(self) -> str:
        """The family's name (``"gpt2"``, ``"llama"``)."""

    @property
    @abc.abstractmethod
    def positional(self) -> Literal["learned", "rotary"]:
        """How positions enter: added to ``resid[0]`` (``"learned"``) or rotated into q, k (``"rotary"``)."""

    @property
    @abc.abstractmethod
    def layout(self) -> Layout:
        """Where the family keeps its modules, and its body's positional arguments."""

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP has a gate (a ``mlp_gate`` site, :attr:`MLPWeights.W_gate`)."""
        layout = self.layout
        return any(p is not None for p in (layout.mlp_gate_proj, layout.mlp_gate_up_proj, layout.experts))

    @property
    def config(self) -> Any:
        """The model's HuggingFace config."""
        return self.model.config

    @property
    def checkpoint_name(self) -> str:
        """The checkpoint's name or path as the model's config records it (``""`` when unknown)."""
        config = getattr(self.model, "config", None)
        return str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")

    # --- sizes -------------------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.embed_module.weight.shape[1]

    @property
    def d_vocab(self) -> int:
        head = self.lm_head
        return (head if head is not None else self.embed_module).weight.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.mlp_weights(0).W_out.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_module.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where analyses run: the token embedding's device (accelerate's execution device for it)."""
        return _offload.execution_device(self.model, self.embed_module, "weight")

    @property
    @abc.abstractmethod
    def n_head(self) -> int:
        """Query heads per layer."""

    @property
    @abc.abstractmethod
    def n_kv_head(self) -> int:
        """Key/value heads per layer (fewer than :attr:`n_head` under grouped-query attention)."""

    @property
    @abc.abstractmethod
    def d_head(self) -> int:
        """The width of one head."""

    @property
    @abc.abstractmethod
    def n_ctx(self) -> int:
        """The longest sequence the model's positions cover."""

    def kv_head(self, head: int) -> int:
        """The key/value head query head ``head`` reads (grouped-query attention)."""
        return head // (self.n_head // self.n_kv_head)

    # --- the attention pattern's hook point ---------------------------------------------------

    @abc.abstractmethod
    def pattern_hook(self, layer: int) -> PatternHook:
        """Where and how ``attn_pattern`` of ``layer`` is recomputed from one hook's payload."""

    # --- norms, embedding, unembedding -------------------------------------------------------

    def norm(self, which: Literal["attn", "mlp", "final"], layer: int | None = None) -> Norm:
        """The norm before attention (``"attn"``) or the MLP (``"mlp"``) of ``layer``, or the final one."""
        if which == "final":
            module = self.final_norm_module
        elif which in ("attn", "mlp"):
            if layer is None:
                raise ValueError(f"norm({which!r}) needs a layer")
            module = self.attn_norm(layer) if which == "attn" else self.mlp_norm(layer)
            if module is None:  # the sublayer reads the residual itself (OLMo 2)
                return Norm.none(self.W_E)
        else:
            raise ValueError(f"which must be 'attn', 'mlp' or 'final'; got {which!r}")
        return self.norm_of(module)

    @abc.abstractmethod
    def norm_of(self, module: nn.Module) -> Norm:
        """One of the family's norm modules as data (its own tensors, detached, never copied)."""

    @property
    def W_E(self) -> torch.Tensor:
        """Token embeddings ``[d_vocab, d_model]``."""
        return self._real(self.embed_module)

    @property
    def W_E_in(self) -> torch.Tensor:
        """Token embeddings as they enter the residual ``[d_vocab, d_model]``: ``W_E`` times the scale.

        ``W_E`` itself (a view) where the family does not scale it; a scaled copy (Gemma) where it does.
        """
        scale = self.embed_scale
        return self.W_E if scale is None else self.W_E.detach() * scale.to(self.W_E.device)

    @property
    def W_pos(self) -> torch.Tensor | None:
        """Learned position embeddings ``[n_ctx, d_model]``; ``None`` where positions are not added."""
        module = self.pos_embed_module
        return None if module is None else self._real(module)

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding ``[d_vocab, d_model]``: the LM head's weight (tied or not); a bare body's embedding.

        A bare body (no LM head) unembeds with its embedding only where the checkpoint ties the two
        (``tie_word_embeddings``); an untied checkpoint's unembedding lives in the LM head the body
        does not hold, so reading it is refused rather than answered with the embedding.
        """
        head = self.lm_head
        if head is not None:
            return self._real(head)
        if not getattr(self.config, "tie_word_embeddings", True):
            raise ValueError(
                f"model is a bare {type(self.model).__name__} body of a checkpoint whose unembedding is not "
                "tied to its embedding (tie_word_embeddings=False): the unembedding is in the LM head, which "
                "the body does not hold, so logits, the lens and logit attribution cannot be read from it; "
                "load the causal LM (e.g. AutoModelForCausalLM) instead"
            )
        return self.W_E

    @property
    def b_U(self) -> torch.Tensor | None:
        """The unembedding bias ``[d_vocab]``, or ``None``."""
        head = self.lm_head
        return None if head is None or not hasattr(head, "bias") else self._real(head, "bias")

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., d_vocab]`` (on :attr:`device`) of final-norm outputs ``x [..., d_model]``.

        ``x @ W_U.T + b_U`` in ``x``'s dtype, as the LM head computes it. The weights enter as constants
        (detached): a gradient reaches ``x``, never the model's weights.
        """
        return self.softcap_logits(self.unembed_raw(x))

    @property
    def embed_scale(self) -> torch.Tensor | None:
        """The factor the embedding module scales its rows by (Gemma: ``√d_model`` in the model's dtype)."""
        scale = getattr(self.embed_module, "embed_scale", None)
        return None if scale is None else scale.to(self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., d_vocab]`` of raw residuals ``h [..., d_model]``: final norm, then unembedding.

        tuned-lens's ``Unembed``: ``unembed(norm("final")(h))``, the model's own logits when ``h`` is the
        final raw residual ``resid[n_layer]``. In the dtype the norm returns (``h``'s, or float32 for an
        RMSNorm of float32 input), on :attr:`device`; differentiable in ``h`` only.
        """
        return self.unembed(self.norm("final")(h))

    def final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final norm's output ``[batch, pos, d_model]`` (on :attr:`device`) of unpadded ids, no cache."""
        return self.body(input_ids=input_ids, use_cache=False).last_hidden_state.to(self.device)

    def embedding_components(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]]:
        """The pieces of ``resid[0]`` outside any block, ``[(kind, [..., d_model] float32)]``.

        ``("embed", W_E[ids])``, then ``("pos_embed", W_pos[positions])`` where positions are learned.
        """
        rows = self.W_E.detach()[input_ids]
        scale = self.embed_scale
        pieces = [("embed", (rows if scale is None else rows * scale.to(rows.device)).float())]
        w_pos = self.W_pos
        if w_pos is not None:
            pieces.append(("pos_embed", w_pos.detach().float()[position_ids]))
        return pieces

    # --- MLP and attention weights -----------------------------------------------------------

    @abc.abstractmethod
    def mlp_weights(self, layer: int) -> MLPWeights:
        """The MLP of ``layer`` in Geva's terms: keys and values as ``[d_mlp, d_model]`` rows (views)."""

    @abc.abstractmethod
    def W_Q(self, layer: int) -> torch.Tensor:
        """Query weights ``[n_head, d_model, d_head]``."""

    @abc.abstractmethod
    def W_K(self, layer: int) -> torch.Tensor:
        """Key weights ``[n_head, d_model, d_head]`` (expanded to query heads)."""

    @abc.abstractmethod
    def W_V(self, layer: int) -> torch.Tensor:
        """Value weights ``[n_head, d_model, d_head]`` (expanded to query heads)."""

    @abc.abstractmethod
    def W_O(self, layer: int) -> torch.Tensor:
        """Output weights ``[n_head, d_head, d_model]``: head ``h`` writes ``z_h @ W_O[h]``."""

    def b_Q(self, layer: int) -> torch.Tensor | None:
        """Query bias ``[n_head, d_head]``, or ``None``."""
        return None

    def b_K(self, layer: int) -> torch.Tensor | None:
        """Key bias ``[n_head, d_head]``, or ``None``."""
        return None

    def b_V(self, layer: int) -> torch.Tensor | None:
        """Value bias ``[n_head, d_head]``, or ``None``."""
        return None

    def b_O(self, layer: int) -> torch.Tensor | None:
        """Attention output bias ``[d_model]``, added once per layer, or ``None``."""
        return None

    def attn_scale(self, layer: int) -> float:
        """The factor the model multiplies ``q @ k^T`` by in this layer."""
        return float(self.attn(layer).scaling)

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (query ``i`` sees key ``j`` iff ``i - j < window``) or ``None``."""
        return None

    def rotation(self, layer: int, offset: int) -> torch.Tensor:
        """``R [d_head, d_head]`` with score ``= q · R · k`` for a key ``offset`` positions back.

        The identity for learned positions, where the offset changes nothing.
        """
        return torch.eye(self.d_head)

    def split_heads(self, z: torch.Tensor) -> torch.Tensor:
        """``attn_z [..., n_head * d_head]`` -> ``[..., n_head, d_head]``."""
        return z.reshape(*z.shape[:-1], self.n_head, self.d_head)

    # --- masks: which keys a query sees ------------------------------------------------------

    def _visible(self, n_query: int, start: int, layer: int, device: torch.device) -> torch.Tensor:
        """``[n_query, start + n_query]`` bool, queries at ``start ..``: causal, inside the layer's window."""
        query = torch.arange(start, start + n_query, device=device)[:, None]
        key = torch.arange(start + n_query, device=device)[None, :]
        visible = key <= query
        window = self.window(layer)
        if window is not None:
            visible = visible & (key > query - window)
        return visible

    def _masked_softmax(self, scores: torch.Tensor, layer: int, key_mask: torch.Tensor | None):
        """Softmax attention ``[batch, head, query, key]`` of ``scores`` under causal, window and key masks.

        ``key_mask [batch, pos]``: True = a real token, or ``None``. Rows that see no real key are zero.
        """
        batch, _, n_pos, _ = scores.shape
        allowed = self._visible(n_pos, 0, layer, scores.device).expand(batch, 1, n_pos, n_pos)
        if key_mask is not None:
            allowed = allowed & key_mask.to(scores.device).bool()[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    # --- partial forwards (causal tracing) ---------------------------------------------------

    @abc.abstractmethod
    def attention_kv(
        self, layer: int, hidden: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, n_kv_head, pos, d_head]`` of block ``layer``'s input at ``start ..``."""

    @abc.abstractmethod
    def block_kwargs(self, layer: int, hidden: torch.Tensor, start: int) -> dict[str, Any]:
        """A block's other forward keywords for its input ``hidden [batch, q, d_model]`` at ``start ..``."""

    def run_block_suffix(
        self, layer: int, hidden: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor
    ) -> torch.Tensor:
        """Block ``layer`` on positions ``start .. start + q - 1`` only (``start = prefix_k.shape[-2]``).

        The output a full forward computes there, given the block's input ``hidden [batch, q, d_model]``
        at those positions and the keys/values of positions ``0 .. start - 1`` (``prefix_k``, ``prefix_v``:
        ``[batch, n_kv_head, start, d_head]``, e.g. from :meth:`attention_kv`). Exact by causality:
        positions ``< start`` see nothing later.

        The block gets a one-layer cache whose ``update`` prepends the prefix, an additive float mask
        ``[1, 1, q, start + q]`` (key ``j`` visible to query ``i`` iff ``j <= start + i``, inside the
        layer's window), which both ``eager`` and ``sdpa`` attention take (``sdpa`` would otherwise crop
        the keys to ``q`` when it runs causal without a mask), and :meth:`block_kwargs` (rotary at the
        absolute positions). Module hooks (``hooks.patch``) fire as in a full forward, on the ``q``
        positions. Returns ``[batch, q, d_model]`` on :attr:`device` (on a dispatched model the prefix
        goes to the block's device, where accelerate runs it).
        """
        impl = self.config._attn_implementation
        if impl not in ("eager", "sdpa"):
            raise NotImplementedError(
                f"run_block_suffix supports eager and sdpa attention; the model uses {impl!r}"
            )
        start, n_query = prefix_k.shape[-2], hidden.shape[1]
        visible = self._visible(n_query, start, layer, hidden.device)
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)[None, None]
        extra = self.block_kwargs(layer, hidden, start)
        on = self._device_of(self.attn_key_proj(layer))
        cache = PrefixCache(prefix_k.to(on, hidden.dtype), prefix_v.to(on, hidden.dtype))
        extra[self.layout.cache_arg] = cache
        with self.loaded(self.blocks[layer]):
            out = self.blocks[layer](hidden_states=hidden, attention_mask=mask, use_cache=False, **extra)
        return out.to(self.device)

    # --- weight edits, and the weights cached statistics depend on --------------------------

    def mlp_out_param(self, layer: int) -> nn.Parameter:
        """The MLP's value weight as stored (either orientation): the weight a rank-one edit changes."""
        self.require("rank_one_edit")
        return self.mlp_out_proj(layer).weight

    def mlp_out_store(self, layer: int) -> StoredParam:
        """:meth:`mlp_out_param` as a weight edit reads and writes it, offloaded by accelerate or not.

        On a layer accelerate offloads (CPU memory or disk), the parameter is a meta placeholder and
        the values live in accelerate's weights map; :class:`~reslens.arch._offload.StoredParam` writes
        an edit there, in memory (never into a file), and puts the original entry back.
        """
        return StoredParam(self.model, self.mlp_out_proj(layer), "weight")

    @abc.abstractmethod
    def rank_one_delta(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The :meth:`mlp_out_param` delta (stored orientation) adding ``(m · u) v`` to ``mlp_out``."""

    def _key_sources(self, layer: int) -> list[tuple[nn.Module, str]]:
        """``(module, tensor name)`` of each :meth:`key_parameters` entry, in its order."""
        sources = [(self.embed_module, "weight")]
        if self.pos_embed_module is not None:
            sources.append((self.pos_embed_module, "weight"))
        values = self.layout.mlp_out_proj  # a path under the block, e.g. "mlp.c_proj"
        for block in range(layer + 1):
            for prefix, sub in self.blocks[block].named_modules():
                for name, _ in sub.named_parameters(recurse=False):
                    if block < layer or not (f"{prefix}.{name}" if prefix else name).startswith(values):
                        sources.append((sub, name))
        return sources

    def key_parameters(self, layer: int) -> list[torch.Tensor]:
        """Every weight that shapes ``mlp_act`` at ``layer`` (not the MLP output projection).

        The embeddings, every parameter of blocks ``< layer``, and block ``layer``'s but its MLP's
        value projection: the parameters themselves; values read from accelerate's weights map where
        it offloads them.
        """
        return [self._real(module, name) for module, name in self._key_sources(layer)]

    def weights_digest(self, layer: int | None = None) -> str:
        """SHA-256 (hex) of the weights :meth:`key_parameters` of ``layer`` names, or of every parameter.

        ``layer``: the weights a statistic of that layer's keys depends on; ``None``: every parameter
        of the model (``named_parameters``, a tied weight once). Each tensor's shape, dtype and bytes
        as stored (:mod:`reslens.arch._digest`), so equal digests mean those weights are equal bit for
        bit. Hashed once per model and weights version, then cached (an in-place change made through
        ``.data`` is not seen: see :mod:`reslens.arch._digest`).

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from reslens.arch import adapter
        >>> arch = adapter(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=20)))
        >>> len(arch.weights_digest(1)), arch.weights_digest(1) == arch.weights_digest(1)
        (64, True)
        """
        if layer is None:
            sources = [(self.model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
                       for name, _ in self.model.named_parameters()]
        else:
            if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layer:
                raise ValueError(f"layer must be an int in 0..{self.n_layer - 1} or None; got {layer!r}")
            sources = self._key_sources(layer)
        tensors = [_offload.real(self.model, module, name) for module, name in sources]
        return _digest.cached_digest(self.model, layer, tensors)

    @property
    def fingerprint(self) -> str:
        """Which model this is, cheaply: SHA-256 (hex) of the family, the sizes and a sample of weights.

        The sample: the unembedding (the LM head's weight and bias; a bare body's embedding), the final
        norm and every parameter of the first and last blocks, each as every ``step``-th row (at most
        2**20 numbers a tensor) rounded to bfloat16 (:mod:`reslens.arch._digest`). So a float32 and a
        bfloat16 copy of one checkpoint share it, and another checkpoint, revision or fine-tune of the
        same shape has another; it is an identity, not a checksum of every weight
        (:meth:`weights_digest` is). Hashed once per model object and cached (about 30 ms for
        SmolLM2-135M on a CPU), again when one of those tensors is replaced or changed in place.
        Everything made from a model (a fitted lens, a training checkpoint, a data-parallel merge)
        carries or compares it.
        """
        head = self.lm_head if self.lm_head is not None else self.embed_module
        sources = [(head, name) for name, _ in head.named_parameters(recurse=False)]
        for module in (self.final_norm_module, self.blocks[0], self.blocks[-1]):
            sources += [(module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
                        for name, _ in module.named_parameters()]
        tensors = [_offload.real(self.model, module, name) for module, name in sources]
        prefix = f"reslens.fingerprint/1|{self.family}|{self.n_layer}|{self.d_model}|{self.d_vocab}|"
        return _digest.cached_digest(self.model, "fingerprint", tensors, prefix=prefix, sample=True)

    @abc.abstractmethod
    def start_token(self, tokenizer: Any) -> int | None:
        """The id a document starts after (GPT-2: end-of-text; Llama: BOS), or ``None``."""

    # --- reading weights of a dispatched model -----------------------------------------------

    def _real(self, module: nn.Module, name: str = "weight") -> torch.Tensor | None:
        """``module``'s tensor ``name`` with its values, on :attr:`device` (``None`` if it has none).

        The module's own tensor (what HuggingFace stores, so views stay views) unless accelerate
        dispatched the model: an offloaded tensor is read from accelerate's weights map, one on
        another device is copied to :attr:`device`.
        """
        t = _offload.real(self.model, module, name)
        if t is None:
            return None
        device = self.device
        return t if t.device == device else t.to(device)

    def _device_of(self, module: nn.Module, name: str = "weight") -> torch.device:
        """The device ``module`` computes on (its execution device when accelerate offloads it)."""
        return _offload.execution_device(self.model, module, name)

    def loaded(self, module: nn.Module) -> Any:
        """A context in which ``module``'s submodules can be called directly on a dispatched model.

        Needed only where accelerate loads a whole module's weights for its own forward
        (``place_submodules``); elsewhere (and without accelerate) it does nothing.
        """
        return _offload.loaded(self.model, module)

    def release_offloaded(self) -> None:
        """Offload again whatever a forward stopped midway (``capture``'s early stop) left loaded."""
        _offload.release(self.model)

    @property
    def offloaded(self) -> bool:
        """Whether accelerate keeps some of the model's weights off device (on the meta device)."""
        return any(p.device.type == "meta" for p in self.model.parameters())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.model).__name__}: {self.n_layer} layers, "
            f"d_model {self.d_model}, "
            f"{self.n_head} heads, d_vocab {self.d_vocab})"
        )
