"""Training the tuned lens (Belrose et al. 2023) over a streamed corpus, in bounded memory.

The recipe is the ``tuned-lens`` package's (``scripts/train_loop.py``, ``ingredients.Optimizer``):
translators initialised at zero (the identity, i.e. the logit lens), the loss per layer
``KL(p_final || p_layer)`` at the same position averaged over the step's tokens and summed over
layers, gradients clipped to norm 1 over all translators, SGD with Nesterov momentum 0.9, learning
rate ``lr * (1 - momentum)`` decayed linearly to zero, weight decay 1e-3 (towards the identity,
since the translator is added to the residual). ``optimizer="adam"`` is the package's other choice
(lr 1e-3 scale, warm-up over the first fifth of the steps). One difference: the package autocasts
to bfloat16 on its GPUs; here the lens is trained in float32.

Memory: one step's residuals (``[n_layer + 1, tokens, d_model]``) plus, for one chunk of
``chunk_size`` positions, the final distribution and one layer's logits and their gradient
(``chunk_size x d_vocab`` floats each): the layers are trained one after the other, never all
``[tokens, vocab]`` at once. ``checkpoint=`` saves the translators, the optimizer's state and the
loss history every ``save_every`` steps (atomically) and a run given the same checkpoint, corpus and
options continues from it.

Under a process group (``group=``, see :mod:`reslens._distributed`) training is data-parallel like
DDP: each step's windows are split over the ranks by number (``i % world == r``), each rank
backpropagates its part of the step's loss (normalised by the step's token count over all ranks),
and the translators' gradients are summed over the ranks before clipping and the optimizer step, so
every rank holds the same translators, the one-process ones up to float32 rounding. Rank 0 alone
writes the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from reslens._checks import check_bool, check_choice, check_float, check_int
from reslens._corpus import start_ids
from reslens._distributed import Shard, shard_of, units_of
from reslens._saving import read_safetensors, write_safetensors
from reslens.arch import Arch, adapter
from reslens.lens.values import AffineLens, TunedLens
from reslens.lens._data import corpus_windows, model_name, residual_batches

__all__ = ["train_tuned_lens"]

_FORMAT = "reslens.TunedLensCheckpoint/1"


def _step_loss(
    arch: Arch, translators: list[torch.nn.Linear], resid: torch.Tensor, chunk_size: int, n: int
) -> list[float]:
    """Backpropagate one step's loss into ``translators``; ``[L]``: summed KL(final || layer) / ``n`` (nats).

    ``n``: the step's token count (over every rank), so the losses of all ranks sum to the step's mean.
    """
    losses = [0.0] * len(translators)
    for start in range(0, resid.shape[1], chunk_size):
        h = resid[:, start : start + chunk_size].float()  # [L + 1, c, d]
        with torch.no_grad():
            log_q = torch.log_softmax(arch.logits(h[-1]).float(), dim=-1)  # [c, vocab]
            q = log_q.exp()
        for layer, translator in enumerate(translators):
            log_p = torch.log_softmax(arch.logits(h[layer] + translator(h[layer])).float(), dim=-1)
            kl = (q * (log_q - log_p)).sum()  # summed over the chunk; / n makes the step's mean
            (kl / n).backward()
            losses[layer] += float(kl.detach()) / n
            del log_p, kl
    return losses


def _translators(arch: Arch, init: AffineLens | None) -> list[torch.nn.Linear]:
    """One ``nn.Linear(d_model, d_model)`` per layer in the residual form ``h + A h + b``.

    ``init=None``: all zero, the identity (the logit lens); an affine lens: the same map in the
    residual form (a shortcut's ``A h + b`` is ``h + (A - I) h + b``), so training starts where it reads.
    """
    translators = [
        torch.nn.Linear(arch.d_model, arch.d_model, device=arch.device) for _ in range(arch.n_layer)
    ]
    with torch.no_grad():
        for layer, t in enumerate(translators):
            if init is None:
                torch.nn.init.zeros_(t.weight)
                torch.nn.init.zeros_(t.bias)
                continue
            weight = init.weight[layer].to(device=arch.device, dtype=torch.float32)
            if not init.residual:
                weight = weight - torch.eye(arch.d_model, device=arch.device)
            t.weight.copy_(weight)
            t.bias.copy_(init.bias[layer])
    return translators


def _decay_towards(params: list[torch.nn.Parameter], start: list[torch.Tensor], weight_decay: float) -> None:
    """Weight decay towards the starting translators: ``grad += wd (p - p0)`` (``p0 = 0``: the identity).

    From the identity it is the optimizer's own L2 decay (``grad += wd p``), bit for bit; from a warm
    start it keeps the translators near the map they started from instead of pulling them to the logit
    lens.
    """
    if weight_decay:
        for p, p0 in zip(params, start):
            p.grad.add_(p if p0 is None else p - p0, alpha=weight_decay)


def _optimizer(params: list[torch.nn.Parameter], name: str, lr: float, momentum: float):
    """The optimizer without weight decay (:func:`_decay_towards` adds it to the gradients first)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr * (1 - momentum), momentum=momentum, nesterov=True)
    return torch.optim.Adam(params, lr=lr * 1e-3, betas=(momentum, 0.999))


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """The package's linear schedule: warm-up over ``warmup`` steps, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def _fingerprint(windows: list[list[int]], options: dict[str, Any], start: list[int]) -> str:
    """What a checkpoint was trained on: the windows, the options and the start tokens (none: as before)."""
    options = {**options, "start_ids": start} if start else options
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for w in windows:
        digest.update(torch.tensor(w, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def _save_checkpoint(
    path: Path, translators, opt, step: int, fingerprint: str, history: list[list[float]], arch: Arch,
    shard: Shard,
) -> None:
    """Rank 0 writes the checkpoint; every rank waits for it."""
    if shard.primary:
        _write_checkpoint(path, translators, opt, step, fingerprint, history, arch)
    shard.barrier()


def _write_checkpoint(
    path: Path, translators, opt, step: int, fingerprint: str, history: list[list[float]], arch: Arch
) -> None:
    tensors = {
        "weight": torch.stack([t.weight.detach() for t in translators]),
        "bias": torch.stack([t.bias.detach() for t in translators]),
    }
    for i, p in enumerate(p for t in translators for p in (t.weight, t.bias)):
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{i}.{key}"] = value.reshape(-1) if value.ndim == 0 else value
    meta = {"format": _FORMAT, "step": str(step), "fingerprint": fingerprint, "history": json.dumps(history),
            "model": model_name(arch), "model_fingerprint": arch.fingerprint}
    write_safetensors(path, tensors, meta)


def _check_model(path: Path, meta: dict[str, str], arch: Arch) -> None:
    """Refuse a checkpoint another model's training wrote (its fingerprint names the model)."""
    made = meta.get("model_fingerprint")
    if made == arch.fingerprint:
        return
    where = f"checkpoint {os.fspath(path)!r}"
    if not made:
        raise ValueError(f"{where} records no model fingerprint (an older reslens wrote it), so it cannot "
                         "say which model's translators it holds; give another checkpoint path to start "
                         "afresh")
    raise ValueError(
        f"{where} was trained on {meta.get('model') or 'another model'} (fingerprint {made[:12]}); this run "
        f"trains {model_name(arch)} (fingerprint {arch.fingerprint[:12]}): resuming would continue another "
        "model's translators. Give that model, or another checkpoint path to start afresh"
    )


def _load_checkpoint(path: Path | None, translators, opt, fingerprint: str,
                     arch: Arch) -> tuple[int, list[list[float]]]:
    """``(step, loss history)`` the checkpoint at ``path`` resumes from (``(0, [])``: none there)."""
    if path is None or not path.exists():
        return 0, []
    tensors, meta = read_safetensors(path, _FORMAT, what="reslens tuned-lens checkpoint")
    _check_model(path, meta, arch)
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} was made with another corpus, model shape or options; "
            "give the same ones to resume, or another checkpoint path to start afresh"
        )
    with torch.no_grad():
        for i, t in enumerate(translators):
            t.weight.copy_(tensors["weight"][i])
            t.bias.copy_(tensors["bias"][i])
    for i, p in enumerate(p for t in translators for p in (t.weight, t.bias)):
        state = {key.split(".", 2)[2]: v for key, v in tensors.items() if key.startswith(f"opt.{i}.")}
        if "step" in state:
            state["step"] = state["step"].reshape(())
        if state:
            opt.state[p] = state
    return int(meta["step"]), json.loads(meta["history"])


def _step_resid(arch: Arch, tokenizer: Any, windows: list[list[int]], batch_size: int) -> torch.Tensor:
    """``resid: [L + 1, n, d]`` of ``windows``' real tokens (``n = 0`` for no window)."""
    if not windows:
        return torch.zeros(arch.n_layer + 1, 0, arch.d_model, device=arch.device)
    return torch.cat(list(residual_batches(arch, tokenizer, windows, batch_size)), dim=1)


def _train_step(arch: Arch, tokenizer: Any, translators: list[torch.nn.Linear], windows: list[list[int]],
                batch_size: int, chunk_size: int, shard: Shard) -> list[float]:
    """This rank's part of one step's gradients, summed over the ranks; ``[L]``: the step's mean losses.

    A step is a handful of windows, so the ranks share it by window (:meth:`Shard.take`), not by batch.
    """
    resid = _step_resid(arch, tokenizer, units_of(shard, windows), batch_size)  # [L + 1, n, d]
    if not shard.parallel:
        return _step_loss(arch, translators, resid, chunk_size, resid.shape[1])
    n = int(shard.sum(torch.tensor([resid.shape[1]], dtype=torch.float64)).item())
    losses = _step_loss(arch, translators, resid, chunk_size, n)
    params = [p for t in translators for p in (t.weight, t.bias)]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    summed = shard.sum(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, summed.split([q.numel() for q in params])):
        p.grad = g.view_as(p).clone() if p.grad is None else p.grad.copy_(g.view_as(p))
    return shard.sum(torch.tensor(losses, dtype=torch.float64)).tolist()


def _check_options(tokens_per_step: Any, optimizer: Any, lr: Any, momentum: Any, weight_decay: Any,
                   chunk_size: Any, save_every: Any, progress: Any, batch_size: Any) -> None:
    check_int(tokens_per_step, "tokens_per_step", low=1)
    check_choice(optimizer, ("sgd", "adam"), "optimizer")
    check_float(lr, "lr", low=0.0, low_open=True)
    check_float(momentum, "momentum", low=0.0, high=0.999)
    check_float(weight_decay, "weight_decay", low=0.0)
    check_int(chunk_size, "chunk_size", low=1)
    check_int(save_every, "save_every", low=1)
    check_bool(progress, "progress")
    check_int(batch_size, "batch_size", low=1)


def train_tuned_lens(
    model: Any,
    corpus: Any,
    *,
    tokenizer: Any = None,
    max_tokens: int = 100_000,
    tokens_per_step: int = 2048,
    max_length: int = 128,
    batch_size: int = 8,
    optimizer: str = "sgd",
    lr: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    chunk_size: int = 256,
    checkpoint: str | os.PathLike | None = None,
    save_every: int = 10,
    progress: bool = True,
    group: Any = None,
    init: AffineLens | None = None,
    held_out: Any = None,
    held_out_tokens: int = 4_000,
) -> TunedLens:
    """Train a tuned lens on ``max_tokens`` corpus tokens, ``tokens_per_step`` per optimizer step.

    ``corpus``: a ``.txt`` file, a folder, a list of files or an iterable of strings, read as windows of
    ``max_length`` tokens led by the tokenizer's start tokens (never trained on; :mod:`reslens._stream`);
    a step holds ``tokens_per_step // max_length`` whole windows, at least one. ``optimizer``: ``"sgd"``
    (the paper's: Nesterov momentum, ``lr`` 1.0 scaled by ``1 - momentum``) or ``"adam"`` (``lr`` x 1e-3).
    ``chunk_size`` positions are unembedded at a time. ``checkpoint``: a file saved every ``save_every``
    steps and at the end, resumed from when it exists. ``group``: a torch.distributed process group
    (data-parallel, see the module docstring; every rank returns the same lens). Returns the lens; its
    ``config`` holds the recipe, the tokens and steps and the per-step, per-layer loss (``loss``, nats).

    ``init``: ``None`` (the identity, the paper's start) or a learned lens of this model, e.g. a
    :class:`~reslens.lens.LinearShortcut` (the warm start), which weight decay then pulls towards.
    ``held_out``: a corpus scored at the end (``held_out_tokens``) beside the logit lens, kept in
    ``config["held_out"]``; the lens's :attr:`~reslens.lens.AffineLens.caveats` are warned wherever
    it is used (too few steps, a loss still falling fast, a held-out KL worse than the logit lens's).
    """
    from tqdm.auto import tqdm

    shard = shard_of(group)
    with shard.together():  # an argument refused on one rank is refused on every rank
        arch = adapter(model)
        _check_options(tokens_per_step, optimizer, lr, momentum, weight_decay, chunk_size, save_every,
                       progress, batch_size)
        _check_init(init, arch)
        check_int(held_out_tokens, "held_out_tokens", low=1)
        windows = corpus_windows(arch, corpus, tokenizer, max_tokens, max_length)
        held = None if held_out is None else corpus_windows(arch, held_out, tokenizer, held_out_tokens,
                                                            max_length)
    per_step = max(1, tokens_per_step // min(max_length, arch.n_ctx))
    options = {"optimizer": optimizer, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
               "tokens_per_step": tokens_per_step, "max_length": max_length, "n_layer": arch.n_layer,
               "d_model": arch.d_model}  # fmt: skip
    if init is not None:
        options["init"] = f"{init.name} {init.fingerprint[:16]}"
    translators, params, start_params, opt = _start(arch, init, optimizer, lr, momentum)
    fingerprint = _fingerprint(windows, options, list(start_ids(tokenizer)))
    shard.same(fingerprint, "the corpus, model shape and options")
    shard.same_model(arch)
    path = None if checkpoint is None else Path(os.fspath(checkpoint)).expanduser()
    with shard.together():  # a checkpoint refused (or unreadable) on one rank stops every rank
        start, history = _load_checkpoint(path, translators, opt, fingerprint, arch)
    shard.same(start, "the step checkpoint= resumes from (is it on a file system every rank sees?)")
    steps = -(-len(windows) // per_step)
    warmup = min(1000, steps // 5) if optimizer == "adam" else 0
    base_lrs = [param_group["lr"] for param_group in opt.param_groups]
    with tqdm(total=steps, initial=start, desc="tuned lens", unit="step",
              disable=not progress or not shard.primary) as bar:
        for step in range(start, steps):
            part = windows[step * per_step : (step + 1) * per_step]
            losses = _train_step(arch, tokenizer, translators, part, batch_size, chunk_size, shard)
            _apply_step(opt, params, start_params, weight_decay, base_lrs, _lr_factor(step, steps, warmup))
            history.append([round(x, 5) for x in losses])
            bar.set_postfix(kl=f"{sum(losses) / len(losses):.3f}")
            bar.update(1)
            if path is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
                _save_checkpoint(path, translators, opt, step + 1, fingerprint, history, arch, shard)
    config = {"model": model_name(arch), "model_fingerprint": arch.fingerprint,
              "n_tokens": sum(map(len, windows)), "steps": steps, **options,
              "loss": history, "recipe": "Belrose et al. 2023 / tuned-lens train_loop (float32)"}  # fmt: skip
    return _trained_lens(arch, translators, config, held, tokenizer, batch_size)


def _start(arch: Arch, init: AffineLens | None, optimizer: str, lr: float, momentum: float) -> tuple:
    """``(translators, their parameters, the parameters' starting values or None, the optimizer)``."""
    translators = _translators(arch, init)
    params = [p for t in translators for p in t.parameters()]
    start = [None if init is None else p.detach().clone() for p in params]
    return translators, params, start, _optimizer(params, optimizer, lr, momentum)


def _apply_step(opt: Any, params: list[torch.nn.Parameter], start: list[torch.Tensor | None],
                weight_decay: float, base_lrs: list[float], factor: float) -> None:
    """Clip the step's gradients to norm 1, decay towards ``start``, step at ``base * factor``, zero them."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    _decay_towards(params, start, weight_decay)
    for param_group, base in zip(opt.param_groups, base_lrs):
        param_group["lr"] = base * factor
    opt.step()
    opt.zero_grad(set_to_none=False)


def _trained_lens(arch: Arch, translators: list[torch.nn.Linear], config: dict[str, Any],
                  held: list[list[int]] | None, tokenizer: Any, batch_size: int) -> TunedLens:
    """The lens of the trained translators; with ``held`` windows, scored on them beside the logit lens."""
    weight = torch.stack([t.weight.detach().cpu() for t in translators])
    bias = torch.stack([t.bias.detach().cpu() for t in translators])
    if held is not None:
        scored = TunedLens(weight, bias, {"model_fingerprint": arch.fingerprint})  # no caveats yet
        config["held_out"] = _held_out_kl(arch, tokenizer, held, batch_size, scored)
    return TunedLens(weight, bias, config)


def _check_init(init: Any, arch: Arch) -> None:
    if init is None:
        return
    if not isinstance(init, AffineLens):
        raise TypeError("init must be None (the identity) or a learned lens of this model (a LinearShortcut "
                        f"from fit_shortcut, a TunedLens); got {type(init).__name__}")
    init.check(arch)


def _held_out_kl(arch: Arch, tokenizer: Any, windows: list[list[int]], batch_size: int,
                 lens: TunedLens) -> dict[str, Any]:
    """KL(final || lens) and KL(final || logit lens) per ``resid`` layer on held-out windows."""
    from reslens._stream import batches
    from reslens.lens.stats import lens_stats

    kl = {}
    for name, value in (("logit", None), ("lens", lens)):
        stats = lens_stats(arch, batches(tokenizer, windows, batch_size), tokenizer=tokenizer, progress=False,
                           lens=value)
        kl[name] = [round(float(x), 5) for x in stats.mean.kl_final_layer]
    return {"n_tokens": sum(map(len, windows)), "kl_logit": kl["logit"], "kl_lens": kl["lens"]}
