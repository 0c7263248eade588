"""Small building blocks shared by the encoder and the decoder."""
from typing import Optional, Type

import torch
from torch import nn

from ..mlp_epilogue import linear_act


def linear_residual(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``; a linear with ``takes_residual`` (``fp8_linear.RowQuantLinear``)
    gets the residual itself, to add it inside its matmul's epilogue where it can."""
    if getattr(linear, "takes_residual", False):
        return linear(x, residual=residual)
    return residual + linear(x)


class MLPBlock(nn.Module):
    """``lin2(act(lin1(x)))``: the transformer feed-forward block.

    ``fused_epilogue`` (off by default; ``mlp_epilogue.set_mlp_epilogue``) runs ``lin1`` +
    activation as one GEMM with a bias + activation epilogue.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()
        self.fused_epilogue = False

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``lin2(act(lin1(x)))``, plus ``residual`` if given (see :func:`linear_residual`)."""
        h = linear_act(self, x) if self.fused_epilogue else self.act(self.lin1(x))
        return self.lin2(h) if residual is None else linear_residual(self.lin2, h, residual)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor.

    Statistics are computed in float32 whatever the input dtype; the result has the input's dtype.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        mean = xf.mean(1, keepdim=True)
        centered = xf - mean
        var = centered.pow(2).mean(1, keepdim=True)
        y = centered / torch.sqrt(var + self.eps)
        y = self.weight.float()[:, None, None] * y + self.bias.float()[:, None, None]
        return y.to(dtype)
