"""2:4 (semi-structured) sparsity for linear weights.

Pruning is ours and device independent: in every group of 4 consecutive weights along the
input dimension the 2 with the largest score are kept and the other 2 set to zero. The score
is the magnitude ``|w|``, or, given calibration statistics, ``|w| * ||x_j||`` where ``||x_j||``
is the L2 norm of input channel j over the calibration tokens (the Wanda criterion, Sun et al.
2023): a small weight on a loud channel can matter more than a large one on a quiet channel.
The pruned dense weights run on any device; converting them to PyTorch's semi-structured
sparse tensors (which only pay off with the sparse tensor-core kernels) needs a CUDA GPU of
the Ampere generation or newer.
"""
from typing import Callable, Dict, List, Optional

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
    if type(weight) not in (torch.Tensor, nn.Parameter) or type(weight.data) is not torch.Tensor:
        raise RuntimeError(
            f"2:4 pruning needs a plain dense weight, got {type(weight.data).__name__}; "
            "prune before quantizing or converting to a sparse layout"
        )
    if weight.shape[1] % 4:
        raise ValueError(
            f"2:4 pruning groups the input dimension by 4, but in_features={weight.shape[1]} "
            "is not a multiple of 4"
        )


def mask_2_4(weight: torch.Tensor, input_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean keep-mask of ``weight`` (out, in): True at the 2 best-scored entries of each
    group of 4. Score: ``|w|``, times ``input_norm[j]`` (shape (in,), >= 0) when given."""
    _check_weight(weight)
    out_f, in_f = weight.shape
    score = weight.detach().abs().float()
    if input_norm is not None:
        if not isinstance(input_norm, torch.Tensor) or input_norm.shape != (in_f,):
            raise ValueError(f"input_norm must be a tensor of shape ({in_f},), got "
                             f"{tuple(getattr(input_norm, 'shape', ())) or type(input_norm).__name__}")
        if not bool(torch.isfinite(input_norm).all()) or bool((input_norm < 0).any()):
            raise ValueError("input_norm must be finite and non-negative (per-channel L2 norms)")
        score = score * input_norm.detach().float().to(score.device)
    groups = score.reshape(out_f, in_f // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
    mask.scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


def prune_2_4(weight: torch.Tensor, input_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A copy of ``weight`` with the 2 lowest-scored entries of each group of 4 zeroed
    (score as in ``mask_2_4``)."""
    return weight.detach() * mask_2_4(weight, input_norm).to(weight.dtype)


def is_2_4_sparse(weight: torch.Tensor) -> bool:
    """True when every group of 4 along the input dimension has at most 2 non-zeros."""
    _check_weight(weight)
    nonzero = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((nonzero <= 2).all())


def _selected_linears(module: nn.Module, filter_fn: FilterFn) -> List[tuple]:
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and filter_fn(m, n)]


@torch.no_grad()
def input_channel_norms(module: nn.Module, filter_fn: FilterFn, run: Callable[[], object]) -> Dict[str, torch.Tensor]:
    """Per-input-channel L2 norms (float32, shape (in,)) of every selected linear's input,
    accumulated over all tokens seen while ``run()`` executes ``module`` (the calibration pass)."""
    sums: Dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(mod, args):
            x = args[0].detach().float()
            sq = x.reshape(-1, x.shape[-1]).square().sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
        return pre

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in _selected_linears(module, filter_fn)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, _ in _selected_linears(module, filter_fn) if n not in sums]
    if missing:
        raise RuntimeError(f"the calibration pass never ran {', '.join(missing)}")
    return {n: v.sqrt() for n, v in sums.items()}


@torch.no_grad()
def prune_linears_2_4_(module: nn.Module, filter_fn: FilterFn,
                       input_norms: Optional[Dict[str, torch.Tensor]] = None) -> List[str]:
    """Prune, in place, the weight of every ``nn.Linear`` in ``module`` selected by
    ``filter_fn(submodule, qualified_name)``, by magnitude or, with ``input_norms`` (from
    ``input_channel_norms``), by the Wanda score; returns the pruned names."""
    selected = _selected_linears(module, filter_fn)
    if input_norms is not None:
        missing = [n for n, _ in selected if n not in input_norms]
        if missing:
            raise ValueError(f"input_norms lacks {', '.join(missing)}")
    for _, lin in selected:  # validate all before changing any
        _check_weight(lin.weight)
    for name, lin in selected:
        lin.weight.copy_(prune_2_4(lin.weight, None if input_norms is None else input_norms[name]))
    return [n for n, _ in selected]


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
