"""Triton set-up shared by our kernels (``triton_attention``, ``fused_upscale``,
``decoder_attention``, ``fused_postprocess``)."""
import functools
import os


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): our kernels then run on CPU
    tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def use_torch_ptxas() -> None:
    """Let Triton compile our kernels with the ptxas that ships with torch, as torch.compile
    does (``TRITON_PTXAS_PATH``, unless already set). Triton's bundled ptxas can be older than
    the CUDA torch was built for: on the H100 (torch 2.11+cu130, Triton 3.6) our kernels built
    with it, in a process where inductor had not compiled anything yet, hit illegal memory
    accesses at launch."""
    try:
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path
    except ImportError:  # a torch without that helper: keep Triton's default
        return
    _set_triton_ptxas_path()
