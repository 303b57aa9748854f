"""
nanochat's optimizer recipe: Muon for the 2D matrices inside the transformer blocks,
AdamW for the token embedding and the lm_head, learning rates scaled by 1/sqrt(width/768).
Gradients are averaged across ranks by the training loop before step() (GradientBuckets: in
buckets, launched during backward; all_reduce_gradients: the plain path, one flat all-reduce after
it), so every rank takes the same step. Muon(shard=True) splits its Newton-Schulz iterations over
the ranks and all-gathers the updates, as nanochat's DistMuon does; its state stays whole on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.cpu_features import cpu_has_fast_bf16


_NS_DTYPE_CPU = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
BUCKET_MB = 25.0  # GradientBuckets' bucket size (torch DDP's default): big enough for bandwidth, small enough to overlap


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
    """MomentUm Orthogonalized by Newton-schulz (Keller Jordan). For 2D weight matrices only.
    Matrices of one shape are stacked and orthogonalised together, one batched Newton-Schulz per
    shape (as nanochat's MuonAdamW does): a depth-d model has a few shapes, not 6d matrices, so the
    iteration runs a few large batched matmuls instead of many small ones.
    shard=True (set by the training loop when several ranks train): the matrices of each shape are
    dealt round-robin over the ranks, each rank orthogonalises its own (stacked) and the updates are
    all-gathered, so every rank applies the same updates having run 1/world_size of the iterations.
    Momentum is kept for every matrix on every rank (an elementwise update, cheap): the optimizer
    state, and so the checkpoint, is the same as unsharded. Off in the batch-size probe, whose ranks
    must not meet in collectives mid-trial."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, shard: bool = False,
                 stack: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        # not hyperparameters: never saved in, or loaded from, a checkpoint. stack=False orthogonalises
        # each matrix on its own (the baseline of `bench train --compare-muon`), to the same result.
        self.shard, self.stack = shard, stack

    @torch.no_grad()
    def step(self):
        world = dist.get_world_size() if self.shard and dist.is_available() and dist.is_initialized() else 1
        pending = []  # every gather is launched first: one shape's communication overlaps the next's iterations
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            torch._foreach_lerp_(self._buffers(params), [p.grad for p in params], 1 - group["momentum"])
            by_shape: dict[tuple, list[Tensor]] = {}
            for p in params:
                by_shape.setdefault((tuple(p.shape), p.dtype, p.device) if self.stack else id(p), []).append(p)
            turn = 0  # whose turn the next matrix is: dealt on across shapes, so no rank gets every remainder
            for same in by_shape.values():
                if world == 1:
                    self._apply(same, self._orthogonalised(same, group), group)
                    continue
                owners = [(turn + i) % world for i in range(len(same))]
                turn = (turn + len(same)) % world
                pending.append(self._launch_shard(same, owners, group, world))
        for same, rows, gathered, work, group in pending:
            work.wait()
            self._apply(same, gathered[rows], group)

    def _buffers(self, params: list[Tensor]) -> list[Tensor]:
        return [self.state[p]["momentum_buffer"] for p in params]

    def _orthogonalised(self, params: list[Tensor], group: dict) -> Tensor:
        """(len(params), *shape) updates: Newton-Schulz of each matrix's direction, the Nesterov
        look-ahead of the momentum (or the momentum), all matrices of the stack in one iteration."""
        bufs = self._buffers(params)
        grads = [p.grad for p in params]
        directions = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
        update = zeropower_via_newtonschulz5(torch.stack(directions), steps=group["ns_steps"])
        return update.to(params[0].dtype)

    def _launch_shard(self, params: list[Tensor], owners: list[int], group: dict, world: int):
        """Orthogonalise this rank's matrices of one shape and start the all-gather of every rank's:
        each rank sends `slots` updates (zeros where it owns fewer), so matrix i's update lands in row
        owner * slots + (its place among that owner's matrices)."""
        rank = dist.get_rank()
        slots = -(-len(params) // world)
        mine = [p for p, o in zip(params, owners) if o == rank]
        send = params[0].new_zeros((slots, *params[0].shape))
        if mine:
            send[:len(mine)] = self._orthogonalised(mine, group)
        gathered = params[0].new_empty((world * slots, *params[0].shape))
        work = dist.all_gather_into_tensor(gathered, send, async_op=True)
        seen = [0] * world
        rows = []
        for o in owners:
            rows.append(o * slots + seen[o])
            seen[o] += 1
        return params, rows, gathered, work, group

    @staticmethod
    def _apply(params: list[Tensor], updates: Tensor, group: dict) -> None:
        scale = max(1.0, params[0].size(-2) / params[0].size(-1)) ** 0.5
        torch._foreach_add_(params, list(updates.unbind(0)), alpha=-group["lr"] * scale)


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


def zero_gradients(model, grad_buckets: "GradientBuckets | None" = None) -> None:
    """Drop the gradients after an optimizer step (or a step rerun after an out-of-memory error):
    zeroed in place where they are GradientBuckets' views, set to None otherwise."""
    if grad_buckets is not None:
        grad_buckets.zero_grad()
    else:
        model.zero_grad(set_to_none=True)


class GradientBuckets:
    """Averages gradients over ranks while backward still runs. Parameters are grouped, in reverse
    order (backward produces the last layers' gradients first), into buckets of about `bucket_mb`.
    Each parameter's .grad is a view into its bucket's flat buffer (DDP's gradient_as_bucket_view),
    so backward accumulates straight into what is sent: no copy in, no copy out. A
    post-accumulate-grad hook counts the gradients ready, and a full bucket is all-reduced
    asynchronously, buckets always launched in the same order on every rank. A compiled model must
    be compiled by region (gpt.CompiledGPT) for the hooks to fire during backward.

    Per optimizer step: arm() before the last micro-batch's backward (earlier micro-batches only
    accumulate, and launch nothing), then launch_rest() on every rank whatever happened (a rank that
    ran out of memory mid-backward launches the buckets it did not reach, so the ranks' collectives
    still pair up), then finish(apply): wait for every bucket and, if apply, divide the sums by the
    world size in place (the gradients are the averages); finish(False) zeroes them (the out-of-memory
    rerun). zero_grad() after the optimizer step, never model.zero_grad(set_to_none=True), which would
    detach the gradients from the buffers. The result equals all_reduce_gradients's: the same sums,
    divided by the world size."""

    def __init__(self, model, bucket_mb: float | None = None):
        bucket_mb = BUCKET_MB if bucket_mb is None else bucket_mb
        self.world = dist.get_world_size()
        params = [p for p in model.parameters() if p.requires_grad]
        limit = max(1, int(bucket_mb * 2**20))
        self.buckets: list[list[Tensor]] = []
        size = 0
        for p in reversed(params):
            b = self.buckets[-1] if self.buckets else None
            if b is None or size + p.numel() * p.element_size() > limit or b[0].dtype != p.dtype or b[0].device != p.device:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.buffers = [torch.zeros(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device) for b in self.buckets]
        self.bucket_of: dict[int, int] = {}  # id(param) -> bucket
        self.views: list[tuple[Tensor, Tensor]] = []  # (param, its gradient's place in the buffer)
        for bi, (b, buf) in enumerate(zip(self.buckets, self.buffers)):
            offset = 0
            for p in b:
                self.bucket_of[id(p)] = bi
                self.views.append((p, buf[offset:offset + p.numel()].view_as(p)))
                offset += p.numel()
        self.hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params]
        self.zero_grad()

    def _reset(self) -> None:
        self.armed = False
        self.ready = [0] * len(self.buckets)
        self.counted: set[int] = set()  # id(param) of gradients already counted ready
        self.works: list = []
        self.launched = 0

    def zero_grad(self) -> None:
        """Zero the buffers and (re)attach every .grad to its view: the next backward accumulates there."""
        for buf in self.buffers:
            buf.zero_()
        for p, view in self.views:
            p.grad = view
        self._reset()

    def arm(self) -> None:
        self.armed = True

    def _grad_ready(self, p: Tensor) -> None:
        if not self.armed or id(p) in self.counted:
            return
        self.counted.add(id(p))
        self.ready[self.bucket_of[id(p)]] += 1
        while self.launched < len(self.buckets) and self.ready[self.launched] == len(self.buckets[self.launched]):
            self._launch(self.launched)

    def _launch(self, bi: int) -> None:
        self.works.append(dist.all_reduce(self.buffers[bi], op=dist.ReduceOp.SUM, async_op=True))
        self.launched = bi + 1

    def launch_rest(self) -> None:
        while self.launched < len(self.buckets):
            self._launch(self.launched)

    def finish(self, apply: bool = True) -> None:
        for work in self.works:
            work.wait()
        if not apply:
            self.zero_grad()
            return
        for p, view in self.views:
            if p.grad is not view:  # something replaced a gradient: the buffer no longer holds it
                raise RuntimeError("GradientBuckets: a parameter's .grad is no longer its bucket view "
                                   "(zero gradients with GradientBuckets.zero_grad, not set_to_none)")
        for buf in self.buffers:
            buf /= self.world
        self._reset()

    def remove(self) -> None:
        """Unhook, and let the gradients go with the buffers (the run is over)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for p, _ in self.views:
            p.grad = None
