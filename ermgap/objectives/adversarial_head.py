"""The adversary's torch parts: gradient reversal and the attribute head (`ermgap.objectives.adversarial`
imports them where it builds or runs the head; the kind's settings need no torch)."""

from __future__ import annotations

import torch

__all__ = ["AttributeHead", "grad_reverse"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.alpha * grad, None


def grad_reverse(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back through it is multiplied by −alpha."""
    return _GradReverse.apply(x, float(alpha))


MOMENTUM, EPS = 0.1, 1e-5  # torch.nn.BatchNorm1d's defaults


class AttributeHead(torch.nn.Module):
    """hidden [B, H] → attribute logits [B, A]: Linear-ReLU-Linear (or one Linear when head_size is 0),
    optionally behind a per-feature standardisation (`standardize`): the caller passes the global batch's
    mean and variance in training; without them the running averages (buffers, so checkpoints and the saved
    head hold them) are used, as BatchNorm1d(affine=False) does at evaluation."""

    def __init__(self, hidden: int, num_attrs: int, head_size: int, standardize: bool = False) -> None:
        super().__init__()
        if head_size:
            self.net = torch.nn.Sequential(torch.nn.Linear(hidden, head_size), torch.nn.ReLU(),
                                           torch.nn.Linear(head_size, num_attrs))
        else:
            self.net = torch.nn.Linear(hidden, num_attrs)
        self.standardize = standardize
        if standardize:
            self.register_buffer("running_mean", torch.zeros(hidden))
            self.register_buffer("running_var", torch.ones(hidden))

    def forward(self, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        if self.standardize:
            mean, var = stats if stats is not None else (self.running_mean, self.running_var)
            x = (x.to(mean.dtype) - mean) / (var + EPS).sqrt()
        return self.net(x.to(dtype))

    @torch.no_grad()
    def update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """BatchNorm1d's update from one global batch of n: running ← (1 − m)·running + m·batch, the variance
        unbiased (× n / (n − 1))."""
        self.running_mean.lerp_(mean.to(self.running_mean), MOMENTUM)
        self.running_var.lerp_((var * n / max(n - 1.0, 1.0)).to(self.running_var), MOMENTUM)
