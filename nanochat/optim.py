"""
nanochat's optimizer recipe: Muon for the 2D matrices inside the transformer blocks,
AdamW for the token embedding and the lm_head, learning rates scaled by 1/sqrt(width/768).
Gradients are averaged across ranks by the training loop before step(), so these
optimizers are plain single-process optimizers and every rank takes the same step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.cpu_features import cpu_has_fast_bf16


_NS_DTYPE_CPU = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    """Quintic Newton-Schulz iteration approximating the orthogonal factor of G (Muon's update).
    bf16 as nanochat does (the iteration is robust to it) where the hardware has fast bf16: CUDA,
    and CPUs with AMX or AVX512-BF16; fp32 on other CPUs, where bf16 matmuls are emulated and slow."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(torch.bfloat16 if G.is_cuda else _NS_DTYPE_CPU)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz (Keller Jordan). For 2D weight matrices only."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - group["momentum"])
                g = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz5(g, steps=group["ns_steps"]).to(p.dtype)
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * scale)


def build_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02,
                     weight_decay=0.0, betas=(0.8, 0.95)) -> list[torch.optim.Optimizer]:
    """Returns [adamw, muon]. Every optimizer's param groups carry 'initial_lr' for schedules."""
    model_dim = model.config.n_embd
    matrix_params = list(model.transformer.h.parameters())
    embedding_params = list(model.transformer.wte.parameters())
    lm_head_params = list(model.lm_head.parameters())
    assert len(list(model.parameters())) == len(matrix_params) + len(embedding_params) + len(lm_head_params)
    dmodel_lr_scale = (model_dim / 768) ** -0.5
    adam_groups = [
        dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
        dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
    ]
    fused = model.get_device().type == "cuda"
    adamw = torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10, weight_decay=weight_decay, fused=fused)
    muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def all_reduce_gradients(model) -> None:
    """Average gradients over ranks (one flat bucket per dtype keeps it to a few collectives)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
