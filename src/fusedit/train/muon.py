"""Muon for the transformer layers' weight matrices and AdamW for every other parameter, as one optimizer.

Muon (momentum orthogonalised by a Newton–Schulz iteration) updates a weight matrix ``W`` of shape ``(A, B)`` with
gradient ``G`` as::

    M ← μ M + (1 − μ) G                  momentum (an exponential average of the gradients)
    U ← (1 − μ) G + μ M                  Nesterov look-ahead
    O ← NS₅(U / ‖U‖_F)                   ≈ the orthogonal factor of U (all singular values near 1)
    W ← W (1 − lr λ) − lr · 0.2 √max(A, B) · O

The factor ``0.2 √max(A, B)`` gives the update the root-mean-square size of an AdamW update, so the AdamW learning
rate and weight decay carry over (Moonshot's "match RMS" rule; PyTorch's ``torch.optim.Muon`` calls it
``adjust_lr_fn="match_rms_adamw"``). Muon is meant for
the hidden matrices only: embeddings, output heads, norms, biases and zero-initialised adaLN gates keep AdamW
(``β₁, β₂, ε`` and decoupled weight decay ``λ``, the update of ``torch.optim.AdamW``).

One optimizer keeps both rules, so the learning-rate schedule, gradient clipping and checkpoints see a single
``torch.optim.Optimizer`` whose parameters are numbered in the order they were given (what the checkpoints rely
on). Each parameter group carries ``muon``: one flag per parameter, saved in the state dict with the group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

#: the quintic Newton–Schulz coefficients of Muon's reference implementation (also ``torch.optim.Muon``'s default).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: 2-D weights of a transformer layer (``layers.<i>.`` in the DiT and in a Hugging Face LLM), the ones Muon updates.
_LAYER_WEIGHT = re.compile(r"(^|\.)layers\.\d+\.")
#: weights inside a layer that keep AdamW: adaLN modulation (zero-initialised gates) and LoRA factors.
_ADAMW_INSIDE_LAYERS = ("modulation", "lora_")


def uses_muon(name: str, param: nn.Parameter) -> bool:
    """Whether :class:`MuonAdamW` updates ``param`` (named ``name`` in the trained model) with Muon: a 2-D weight of a
    transformer layer (attention and MLP projections), not its adaLN modulation nor a LoRA factor."""
    return (
        param.ndim == 2
        and name.endswith("weight")
        and _LAYER_WEIGHT.search(name) is not None
        and not any(marker in name for marker in _ADAMW_INSIDE_LAYERS)
    )


def orthogonalize(
    update: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The Newton–Schulz approximation of the orthogonal factor of each matrix of ``update`` ``(..., A, B)``: the same
    shape and dtype, singular values pushed into roughly [0.7, 1.2] (the quintic iteration trades exactness for
    speed). The iteration runs in ``dtype`` (bfloat16, as in Muon's reference implementation and PyTorch's)."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(update.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the parameters flagged in their group's ``muon`` list, AdamW for the others (see the module doc).

    ``params``: a list of parameters or of groups (dicts with ``params``, optionally ``lr``), each group with
    ``muon``: a list of booleans, one per parameter (missing: all AdamW). ``momentum`` and ``ns_steps`` are Muon's
    (μ and the Newton–Schulz iterations); ``betas``, ``eps`` AdamW's; ``lr`` and ``weight_decay`` both rules'. Muon's
    matrices step at ``lr × muon_lr_scale`` (weight decay included), so a schedule that sets the group's ``lr`` moves
    both rules together.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        ns_steps: int = 5,
        muon_lr_scale: float = 1.0,
    ) -> None:
        if ns_steps < 1:
            raise ValueError(f"MuonAdamW: ns_steps must be >= 1, got {ns_steps}")
        if not muon_lr_scale > 0:
            raise ValueError(f"MuonAdamW: muon_lr_scale must be > 0, got {muon_lr_scale}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            ns_steps=ns_steps,
            muon_lr_scale=muon_lr_scale,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            flags = group.setdefault("muon", [False] * len(group["params"]))
            if len(flags) != len(group["params"]):
                raise ValueError(
                    f"MuonAdamW: a group has {len(group['params'])} parameters but {len(flags)} muon flags"
                )
            for flag, param in zip(flags, group["params"], strict=True):
                if flag and param.ndim != 2:
                    raise ValueError(f"MuonAdamW: Muon updates matrices only, got a parameter of shape {param.shape}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            matrices = []
            for flag, param in zip(group["muon"], group["params"], strict=True):
                if param.grad is None:
                    continue
                if flag:
                    matrices.append(param)
                else:
                    self._adamw_update(param, param.grad, group)
            self._muon_updates(matrices, group)
        return loss

    def _muon_updates(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """Muon's step for ``params`` (matrices with gradients) of ``group``; matrices of one shape are orthogonalised
        together, as one batch."""
        by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for param in params:
            state = self.state[param]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(param)
            buffer, grad = state["momentum_buffer"], param.grad
            assert grad is not None  # step() passes only parameters with gradients
            buffer.lerp_(grad, 1 - group["momentum"])
            update = grad.lerp(buffer, group["momentum"])
            by_shape.setdefault(tuple(param.shape), []).append((param, update))
        for shape, pairs in by_shape.items():
            orthogonal = orthogonalize(torch.stack([u for _, u in pairs]), steps=group["ns_steps"])
            lr = group["lr"] * group.get("muon_lr_scale", 1.0)  # state dicts saved before the scale existed: 1
            for (param, _), step in zip(pairs, orthogonal, strict=True):
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(step, alpha=-lr * 0.2 * math.sqrt(max(shape)))

    def _adamw_update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        param.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1**step))
