"""FSL-SAGE's alignment of the auxiliary models to the server (the FSL-SAGE paper, Nair et al., ICML 2025), one client
at a time or several clients as one batched computation.

Per client: true cut-layer gradients G of the current server model on the client's buffer (`true_gradients`), then
`steps` Adam steps of the client's auxiliary model on sum((g_aux(z) - G)^2), g_aux the input gradient of the aux's
mean task loss (double back-propagation).

`align_clients` runs those steps for many clients at once: their aux parameters, buffers and Adam moments are
stacked along a leading client dimension and one step of all of them is one `torch.func.vmap` of
`grad_and_value(objective)` followed by one Adam update of the stacked tensors. Per client it is the same objective
and the same Adam update as `align_one` (torch.optim.Adam's single-tensor arithmetic, per-client step counts), so the
two agree to floating-point rounding (the batched convolutions are grouped convolutions, whose sums are ordered
differently). Afterwards parameters, buffers (BatchNorm running statistics) and Adam state are written back into
each client's module and optimiser, so checkpoints and the aux download see no difference.

Measured on CPU (benchmarks/batched_alignment.py, ResNet-18 default aux, 10 clients, 1 thread): the batched steps
take 1.3x (64-sample buffers) and 1.7x (448) the CPU time of the loop, whose convolutions are already
compute-bound. On an H200 (10 clients, 448-sample buffers) the batched steps took 0.300 s against the loop's 0.106:
the grouped convolutions vmap produces are slower there than ten ordinary ones. FslSage.align_many therefore runs
the loop on every device; this path stays for `batched=True` and the benchmark.

Ragged buffers: clients are grouped by buffer fill and each group is one vmap. Grouping is exact; padding with a
mask is not, because a BatchNorm layer in train mode would take batch statistics over the padding and the mean
loss's 1/N would have to be rebuilt per client. In practice every client's buffer holds the same number of samples
(one upload at round 0, a full buffer later), so there is one group.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, stack_module_state, vmap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def true_gradients(server: nn.Module, z: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """dL/dz of the server's mean loss on the whole buffer (scale 1/N). The server runs in train mode, as in the
    paper: its BatchNorm running statistics update, its weights do not."""
    server.train()
    z_leaf = z.detach().clone().requires_grad_(True)
    (target,) = torch.autograd.grad(loss_fn(server(z_leaf), y), z_leaf)
    return target


def align_one(aux: nn.Module, optimizer: torch.optim.Optimizer, z: torch.Tensor, y: torch.Tensor,
              target: torch.Tensor, steps: int, loss_fn: LossFn) -> list[float]:
    """`steps` optimiser steps of `aux` on sum((g_aux(z) - target)^2); returns each step's loss (before its update)."""
    aux.train()
    losses = []
    for _ in range(steps):
        z_leaf = z.detach().clone().requires_grad_(True)
        (g_aux,) = torch.autograd.grad(loss_fn(aux(z_leaf), y), z_leaf, create_graph=True)
        loss = ((g_aux - target) ** 2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses).tolist() if losses else []   # one host copy, not one per step


def batch_obstacle(aux: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Why this client's alignment cannot join a batched one (None: it can). The batched path reproduces plain
    torch.optim.Adam / AdamW and deterministic modules; anything else keeps the per-client loop."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"optimiser {type(optimizer).__name__} (the batched update is Adam's)"
    if len(optimizer.param_groups) != 1:
        return "more than one parameter group"
    group = optimizer.param_groups[0]
    for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
        if group.get(flag):
            return f"Adam option {flag}=True"
    if any(torch.is_tensor(group[k]) for k in ("lr", "weight_decay")) or torch.is_tensor(group["betas"][0]):
        return "tensor-valued Adam hyper-parameters"
    counts = {int(optimizer.state[p]["step"]) if "step" in optimizer.state.get(p, {}) else 0 for p in group["params"]}
    if len(counts) > 1:
        # a parameter that once had no gradient (Adam skipped it); the stacked update keeps one count per client
        return f"parameters at different Adam step counts {sorted(counts)}"
    for m in aux.modules():
        # vmap cannot replay the per-client loop's random stream, so a randomised module (dropout in train mode,
        # e.g. the GPT-2 aux) stays on the loop
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"random module {type(m).__name__}(p={m.p})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None:
            return "BatchNorm with cumulative averaging (momentum=None)"
    return None


def _signature(aux: nn.Module, optimizer: torch.optim.Optimizer, z: torch.Tensor, y: torch.Tensor) -> tuple:
    """Clients with equal signatures can share one vmap: same architecture, same hyper-parameters, same buffer
    shape (hence the same fill)."""
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    shapes = tuple((name, tuple(t.shape), t.dtype) for name, t in aux.state_dict().items())
    return (type(aux), shapes, type(optimizer), repr(sorted(group.items(), key=lambda kv: kv[0])),
            tuple(z.shape), z.dtype, tuple(y.shape), z.device)


def align_clients(auxes: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
                  zs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                  steps: int, loss_fn: LossFn) -> list[list[float]]:
    """Aligns every client i (aux i, its optimiser, buffer (z_i, y_i), target G_i) for `steps` steps, batching
    clients with the same buffer fill and architecture; returns each client's per-step losses."""
    if steps == 0:       # the loop leaves modules and optimisers untouched (no Adam state is created)
        return [[] for _ in auxes]
    out: list[list[float] | None] = [None] * len(auxes)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (aux, opt, z, y) in enumerate(zip(auxes, optimizers, zs, ys)):
        if batch_obstacle(aux, opt) is None:
            groups[_signature(aux, opt, z, y)].append(i)
        else:
            out[i] = align_one(aux, opt, zs[i], ys[i], targets[i], steps, loss_fn)
    for members in groups.values():
        if len(members) == 1:     # nothing to batch with: the loop is the same computation without the stacking
            i = members[0]
            out[i] = align_one(auxes[i], optimizers[i], zs[i], ys[i], targets[i], steps, loss_fn)
            continue
        losses = _align_group([auxes[i] for i in members], [optimizers[i] for i in members],
                              torch.stack([zs[i].detach() for i in members]), torch.stack([ys[i] for i in members]),
                              torch.stack([targets[i] for i in members]), steps, loss_fn)
        for i, row in zip(members, losses):
            out[i] = row
    return out


def _align_group(auxes, optimizers, z, y, target, steps: int, loss_fn: LossFn) -> list[list[float]]:
    """One vmapped alignment of K clients with identical architectures and buffer shapes; z, y, target carry a
    leading client dimension."""
    k = len(auxes)
    for aux in auxes:
        aux.train()
    template = _template(auxes[0])
    params, buffers = stack_module_state(list(auxes))
    trained = [{id(p) for p in opt.param_groups[0]["params"]} for opt in optimizers]
    names = [n for n, p in auxes[0].named_parameters() if id(p) in trained[0]]
    for aux, ids in zip(auxes, trained):    # the same parameters train in every client (frozen ones stay fixed)
        if [n for n, p in aux.named_parameters() if id(p) in ids] != names:
            raise ValueError("batched alignment needs the same trainable parameters in every auxiliary model")
    variables = {n: params[n].detach() for n in names}
    fixed = {n: t.detach() for n, t in params.items() if n not in variables}
    fixed.update(buffers)

    def objective(variables, fixed, z, y, target):
        # `fixed` (BatchNorm running statistics among it) is an explicit input of both transforms: BatchNorm
        # updates it in place, which torch.func allows only for its inputs.
        def task_loss(z_, fixed):
            return loss_fn(functional_call(template, (variables, fixed), (z_,)), y)
        g_aux = grad(task_loss)(z, fixed)
        return ((g_aux - target) ** 2).sum()

    step_all = vmap(grad_and_value(objective), randomness="error")
    adam = _StackedAdam(optimizers, [[dict(auxes[c].named_parameters())[n] for n in names] for c in range(k)],
                        [variables[n] for n in names])
    losses = []
    for _ in range(steps):
        grads, loss = step_all(variables, fixed, z, y, target)
        with torch.no_grad():
            adam.step([grads[n] for n in names])
        losses.append(loss.detach())
    # Write everything back into the clients' own modules and optimisers.
    with torch.no_grad():
        for c, aux in enumerate(auxes):
            for n, p in aux.named_parameters():
                if n in variables:
                    p.copy_(variables[n][c])
            for n, b in aux.named_buffers():
                b.copy_(fixed[n][c])
    adam.write_back()
    return torch.stack(losses).T.tolist() if losses else [[] for _ in range(k)]


class _Im2colConv2d(nn.Conv2d):
    """Conv2d as unfold + one matrix product. Under vmap with per-client weights a native convolution becomes a
    grouped convolution (one group per client), whose double backward on CPU (oneDNN) measured slower than the
    per-client loop itself; unfold + matmul becomes unfold + a batched matrix product, which is not. Same
    parameters, same result up to the order of the sums."""

    def _conv_forward(self, x, weight, bias):
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)    # [n, C*kh*kw, L]
        ho, wo = ((size + 2 * pad - dil * (k - 1) - 1) // st + 1 for size, pad, dil, k, st in
                  zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride))
        # one [O, C*kh*kw] @ [C*kh*kw, n*L] product (a per-sample product would copy the weight n times)
        out = weight.flatten(1) @ cols.transpose(0, 1).flatten(1)
        out = out.view(-1, n, ho, wo).transpose(0, 1)
        return out if bias is None else out + bias.view(1, -1, 1, 1)


def _template(aux: nn.Module) -> nn.Module:
    """A parameter-free copy of `aux` for functional_call (the stacked tensors replace all of its state), its plain
    convolutions computed by _Im2colConv2d."""
    template = copy.deepcopy(aux).to("meta")
    for m in template.modules():
        if (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
                and not isinstance(m.padding, str)):
            m.__class__ = _Im2colConv2d
    return template


class _StackedAdam:
    """torch.optim.Adam (L2 weight decay) / AdamW (decoupled) on stacked [K, ...] parameters, with one step count per
    client: the same arithmetic, in the same order, as torch.optim.adam._single_tensor_adam with per-client bias
    corrections."""

    def __init__(self, optimizers, client_params, stacked):
        self.optimizers, self.client_params, self.params = optimizers, client_params, stacked
        group = optimizers[0].param_groups[0]
        self.lr, (self.beta1, self.beta2) = group["lr"], group["betas"]
        self.eps, self.weight_decay = group["eps"], group["weight_decay"]
        self.decoupled = group.get("decoupled_weight_decay", isinstance(optimizers[0], torch.optim.AdamW))
        # Each client's step count. Adam keeps one per parameter; batch_obstacle admits only clients whose
        # parameters all agree.
        self.counts = [int(opt.state[plist[0]]["step"]) if "step" in opt.state.get(plist[0], {}) else 0
                       for opt, plist in zip(optimizers, client_params)]
        self.exp_avg, self.exp_avg_sq = [], []
        for j, p in enumerate(stacked):
            states = [opt.state.get(plist[j], {}) for opt, plist in zip(optimizers, client_params)]
            self.exp_avg.append(torch.stack([s["exp_avg"] if "exp_avg" in s else torch.zeros_like(plist[j])
                                             for s, plist in zip(states, client_params)]).to(p))
            self.exp_avg_sq.append(torch.stack([s["exp_avg_sq"] if "exp_avg_sq" in s else torch.zeros_like(plist[j])
                                                for s, plist in zip(states, client_params)]).to(p))

    def step(self, grads) -> None:
        self.counts = [c + 1 for c in self.counts]
        # Python floats, as _single_tensor_adam computes them, then rounded to the parameter dtype as its
        # scalar arguments are.
        step_size = [self.lr / (1 - self.beta1 ** c) for c in self.counts]
        bc2_sqrt = [(1 - self.beta2 ** c) ** 0.5 for c in self.counts]
        p0 = self.params[0]
        neg_step = torch.tensor([-s for s in step_size], dtype=p0.dtype, device=p0.device)
        bc2 = torch.tensor(bc2_sqrt, dtype=p0.dtype, device=p0.device)
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            shape = (-1,) + (1,) * (p.dim() - 1)
            if self.weight_decay != 0:
                if self.decoupled:
                    p.mul_(1 - self.lr * self.weight_decay)
                else:
                    g = g.add(p, alpha=self.weight_decay)
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / bc2.view(shape)).add_(self.eps)
            # addcdiv_(m, denom, value=-step) computes (value * m) / denom, then adds
            p.add_((neg_step.view(shape) * m) / denom)

    def write_back(self) -> None:
        """Each client's optimiser state as torch.optim.Adam would hold it after the same steps."""
        scalar = torch.tensor(0.0).dtype     # Adam's step dtype on the non-capturable path (_get_scalar_dtype)
        for c, (opt, plist) in enumerate(zip(self.optimizers, self.client_params)):
            for j, p in enumerate(plist):
                state = opt.state[p]
                state["step"] = torch.tensor(float(self.counts[c]), dtype=scalar)
                state["exp_avg"] = self.exp_avg[j][c].clone()
                state["exp_avg_sq"] = self.exp_avg_sq[j][c].clone()
