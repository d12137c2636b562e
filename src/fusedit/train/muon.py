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
from torch.optim.adamw import adamw

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
    x = update.to(dtype).reshape(-1, *update.shape[-2:])  # (N, A, B): one batch for baddbmm
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        # x ← a x + (b gram + c gram²) x, each product fused with its sum (a third faster in bfloat16 on a CPU)
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, polynomial, x, beta=a)
    return (x.mT if transposed else x).to(update.dtype).reshape(update.shape)


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
            matrices: list[torch.Tensor] = []
            others: list[torch.Tensor] = []
            for flag, param in zip(group["muon"], group["params"], strict=True):
                if param.grad is not None:
                    (matrices if flag else others).append(param)
            self._adamw_updates(others, group)
            self._muon_updates(matrices, group)
        return loss

    def _muon_updates(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """Muon's step for ``params`` (matrices with gradients) of ``group``; matrices of one shape are orthogonalised
        together, as one batch."""
        if not params:
            return
        for param in params:
            if not self.state[param]:
                self.state[param]["momentum_buffer"] = torch.zeros_like(param)
        buffers = [self.state[param]["momentum_buffer"] for param in params]
        grads = [param.grad for param in params]  # step() passes only parameters with gradients
        torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])  # type: ignore[arg-type]
        updates = torch._foreach_lerp(grads, buffers, group["momentum"])  # type: ignore[arg-type]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, param in enumerate(params):
            by_shape.setdefault(tuple(param.shape), []).append(index)
        lr = group["lr"] * group.get("muon_lr_scale", 1.0)  # state dicts saved before the scale existed: 1
        for shape, indices in by_shape.items():
            orthogonal = orthogonalize(torch.stack([updates[i] for i in indices]), steps=group["ns_steps"])
            same_shape = [params[i] for i in indices]
            torch._foreach_mul_(same_shape, 1 - lr * group["weight_decay"])
            torch._foreach_add_(same_shape, list(orthogonal.unbind(0)), alpha=-lr * 0.2 * math.sqrt(max(shape)))

    def _adamw_updates(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """AdamW's step for ``params`` (with gradients) of ``group``: PyTorch's own AdamW update, every parameter of
        the group in one call (``torch.optim.AdamW``'s arithmetic, without a Python loop over parameters)."""
        if not params:
            return
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
        states = [self.state[param] for param in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [param.grad for param in params],  # type: ignore[misc]  # only parameters with gradients come here
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],
            [state["step"] for state in states],
            foreach=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
