"""Optimizers of the training loop: AdamW, Muon + AdamW (`OptimizerGroup`), Muon sharded across DDP processes
(`ShardedMuon`), and the learning-rate schedule (`lr_at`: linear warmup, then cosine)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class OptimizerGroup:
    """Several optimizers stepped as one (Muon for the blocks' matrices, AdamW for the rest).

    Quacks like a `torch.optim.Optimizer` where the training loop needs it: `param_groups` (all of them, in
    order), `step`, `zero_grad`, `state_dict` and `load_state_dict`.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state.get("optimizers")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError("the saved optimizer state is not this optimizer's (was another --optimizer used?)")
        for opt, saved in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(saved)


class ShardedMuon(torch.optim.Muon):
    """torch's Muon with its Newton-Schulz work split across the processes of a DDP job.

    Muon orthogonalizes every weight matrix's update with matmuls, the same work on every process (16% of a
    default-recipe step on one CPU thread). Here each process keeps every momentum buffer (elementwise and
    identical everywhere, since DDP all-reduced the gradients), orthogonalizes only its share of the matrices
    (balanced by size) and receives the others' updates by broadcast. Parameters and optimizer state stay
    the same as Muon's in one process (tested), so checkpoints and resume are unchanged.
    """

    def __init__(self, params: Any, *, world: int, rank: int, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.world, self.rank = world, rank

    def _owners(self, params: list[torch.Tensor]) -> list[int]:
        """A process per matrix: the biggest first, each to the least-loaded process (the same on every rank)."""
        load = [0] * self.world
        owners = [0] * len(params)
        for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
            owners[i] = min(range(self.world), key=lambda r: (load[r], r))
            load[owners[i]] += params[i].numel()
        return owners

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            owners = self._owners(params)
            updates = []
            for p, owner in zip(params, owners, strict=True):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                if owner == self.rank:
                    update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                    ns = group["ns_coefficients"], group["ns_steps"], group["eps"]
                    updates.append(_zeropower_via_newtonschulz(update, *ns).float().contiguous())  # bf16 values
                else:
                    updates.append(torch.empty_like(p, dtype=torch.float32))
            works = [dist.broadcast(u, src=o, async_op=True) for u, o in zip(updates, owners, strict=True)]
            for p, update, work in zip(params, updates, works, strict=True):
                work.wait()
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


def configure_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str,
    optimizer: str = "adamw",
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    muon_weight_decay: float = 0.0,
    world: int = 1,
    rank: int = 0,
) -> torch.optim.Optimizer | OptimizerGroup:
    """AdamW with decay on 2-D weights only (not biases or norms), or Muon + AdamW.

    With `optimizer="muon"`, the transformer blocks' weight matrices go to `torch.optim.Muon` (orthogonalized
    momentum updates) and the embeddings (the tied head), biases and norms stay with AdamW, as Muon's authors
    prescribe. Every group carries `kind` ("decay", "no_decay" or "muon") and `lr_scale` (its peak LR over
    `lr`), so one schedule drives them all. AdamW is fused on CUDA, foreach elsewhere. In a DDP job
    (`world` > 1, a process group up) Muon's matmuls are split across the processes (`ShardedMuon`).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the tied head appears once
    use_muon = optimizer == "muon"
    is_hidden = {id(p): use_muon and p.dim() == 2 and ".h." in f".{n}" for n, p in named}
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2 and not is_hidden[id(p)]], "weight_decay": weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    for group, kind in zip(groups, ("decay", "no_decay"), strict=True):
        group.update(kind=kind, lr_scale=1.0)
    impl = {"fused": True} if device_type == "cuda" else {"foreach": True}
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, **impl)
    if not use_muon:
        return adamw
    hidden = [p for _, p in named if is_hidden[id(p)]]
    muon_group = {"params": hidden, "kind": "muon", "lr_scale": muon_lr / lr}
    settings = dict(lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay, adjust_lr_fn="original")
    if world > 1 and dist.is_initialized():
        muon: torch.optim.Optimizer = ShardedMuon([muon_group], world=world, rank=rank, **settings)
    else:
        muon = torch.optim.Muon([muon_group], **settings)
    return OptimizerGroup([adamw, muon])


def lr_at(step: int, *, decay_progress: float, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine from `lr` to `min_lr` as `decay_progress` goes 0 -> 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = min(max(decay_progress, 0.0), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (lr - min_lr)
