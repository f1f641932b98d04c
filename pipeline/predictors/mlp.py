"""A stack of G independent two-layer MLPs evaluated in one einsum (G = 1 for ShadowLLM, one per
layer for DejaVu): in -> hidden (ReLU) -> [rank (linear, optional)] -> out."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """nn.Linear's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class StackedMLP(nn.Module):
    def __init__(self, groups: int, in_dim: int, hidden: int, out_dim: int, rank: int = 0):
        super().__init__()
        if min(groups, in_dim, hidden, out_dim) < 1 or rank < 0:
            raise ValueError(f"bad MLP shape groups={groups} in={in_dim} hidden={hidden} out={out_dim} rank={rank}")
        self.groups, self.in_dim, self.hidden, self.out_dim, self.rank = groups, in_dim, hidden, out_dim, rank
        self.w1 = _uniform((groups, in_dim, hidden), in_dim)
        self.b1 = _uniform((groups, hidden), in_dim)
        mid = rank if rank else hidden
        self.down = _uniform((groups, hidden, rank), hidden) if rank else None  # low-rank factor, no bias
        self.w2 = _uniform((groups, mid, out_dim), mid)
        self.b2 = _uniform((groups, out_dim), mid)

    @torch.no_grad()
    def start_at(self, bias: Tensor) -> None:
        """Output = `bias` (reshaped to [G, out]) for every input: zero output weights, so training
        starts from the static ranking and only learns what the input adds to it (the hidden layer
        still gets gradients through the output weights from the first step on)."""
        self.b2.copy_(bias.reshape(self.b2.shape).to(self.b2))
        self.w2.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """x [..., G, in] -> [..., G, out]."""
        h = torch.relu(torch.einsum("...gi,gih->...gh", x, self.w1) + self.b1)
        if self.down is not None:
            h = torch.einsum("...gh,ghr->...gr", h, self.down)
        return torch.einsum("...gh,gho->...go", h, self.w2) + self.b2

    def group(self, g: int, x: Tensor) -> Tensor:
        """Only MLP g: x [..., in] -> [..., out]."""
        h = torch.relu(x @ self.w1[g] + self.b1[g])
        if self.down is not None:
            h = h @ self.down[g]
        return h @ self.w2[g] + self.b2[g]
