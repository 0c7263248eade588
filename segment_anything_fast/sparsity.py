"""2:4 (semi-structured) sparsity for linear weights.

Pruning is ours and device independent: in every group of 4 consecutive weights along the
input dimension the 2 of largest magnitude are kept and the other 2 set to zero. The pruned
dense weights then run on any device; converting them to PyTorch's semi-structured sparse
tensors (which only pay off with the sparse tensor-core kernels) needs a CUDA GPU of the
Ampere generation or newer.
"""
from typing import Callable, List, Optional

import torch
from torch import nn

SPARSE_GPU_ERROR = "2:4 sparse kernels need a CUDA GPU (Ampere or newer)"

FilterFn = Callable[[nn.Module, str], bool]


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"2:4 pruning expects a 2-D (out_features, in_features) weight, got "
            f"{type(weight).__name__} with shape {tuple(getattr(weight, 'shape', ()))}"
        )
    if type(weight) not in (torch.Tensor, nn.Parameter):
        raise RuntimeError(
            f"2:4 pruning needs a plain dense weight, got {type(weight).__name__}; "
            "prune before quantizing or converting to a sparse layout"
        )
    if weight.shape[1] % 4:
        raise ValueError(
            f"2:4 pruning groups the input dimension by 4, but in_features={weight.shape[1]} "
            "is not a multiple of 4"
        )


def mask_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask of ``weight`` (out, in): True at the 2 largest |w| of each group of 4."""
    _check_weight(weight)
    out_f, in_f = weight.shape
    groups = weight.detach().abs().float().reshape(out_f, in_f // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
    mask.scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` with the 2 smallest-magnitude entries of each group of 4 zeroed."""
    return weight.detach() * mask_2_4(weight).to(weight.dtype)


def is_2_4_sparse(weight: torch.Tensor) -> bool:
    """True when every group of 4 along the input dimension has at most 2 non-zeros."""
    _check_weight(weight)
    nonzero = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((nonzero <= 2).all())


def _selected_linears(module: nn.Module, filter_fn: FilterFn) -> List[tuple]:
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and filter_fn(m, n)]


@torch.no_grad()
def prune_linears_2_4_(module: nn.Module, filter_fn: FilterFn) -> List[str]:
    """Prune, in place, the weight of every ``nn.Linear`` in ``module`` selected by
    ``filter_fn(submodule, qualified_name)``; returns the pruned names."""
    names = []
    for name, lin in _selected_linears(module, filter_fn):
        lin.weight.copy_(prune_2_4(lin.weight))
        names.append(name)
    return names


def sparse_gpu_problem(device: torch.device) -> Optional[str]:
    """Why ``device`` cannot run the 2:4 sparse kernels, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{SPARSE_GPU_ERROR}; the model is on {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"{SPARSE_GPU_ERROR}; {torch.cuda.get_device_name(device)} has compute capability "
                f"{major}.{minor}")
    return None


def check_sparse_gpu(device: torch.device) -> None:
    """Raise a RuntimeError unless ``device`` can run the 2:4 sparse kernels."""
    problem = sparse_gpu_problem(device)
    if problem:
        raise RuntimeError(problem)


@torch.no_grad()
def to_semi_structured_(module: nn.Module, filter_fn: FilterFn) -> List[str]:
    """Replace, in place, each selected linear weight (already 2:4 pruned) by a
    ``torch.sparse.to_sparse_semi_structured`` tensor; returns the converted names."""
    names = []
    for name, lin in _selected_linears(module, filter_fn):
        check_sparse_gpu(lin.weight.device)
        if not is_2_4_sparse(lin.weight):
            raise ValueError(f"{name}.weight is not 2:4 sparse; prune it with prune_linears_2_4_ first")
        sparse = torch.sparse.to_sparse_semi_structured(lin.weight.detach())
        lin.weight = nn.Parameter(sparse, requires_grad=False)
        names.append(name)
    return names
