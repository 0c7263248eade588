"""enable_persistent_caches: cache folders and switches, and a second process reusing the first's compile."""
import os
import subprocess
import sys

import pytest

from segment_anything_fast import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import sys
from segment_anything_fast.aot import enable_persistent_caches
enable_persistent_caches(sys.argv[1])
import torch
from torch._dynamo.utils import counters
f = torch.compile(lambda x: torch.relu(x.sin() * 2 + 1), fullgraph=True)
f(torch.randn(8))
print("HITS", counters["inductor"]["fxgraph_cache_hit"], "MISSES", counters["inductor"]["fxgraph_cache_miss"])
"""


def test_second_process_reuses_compile(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    outs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "cache")], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout.strip().splitlines()[-1])
    assert outs == ["HITS 0 MISSES 1", "HITS 1 MISSES 0"]
    assert os.listdir(tmp_path / "cache" / "inductor" / "fxgraph")


def test_enable_persistent_caches(tmp_path, monkeypatch):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    # Saved and restored by hand: monkeypatch's undo deletes config entries it did not find in
    # the module's __dict__, and torch's config modules then hide them from later readers.
    settings = [(inductor_config, n) for n in ("fx_graph_cache", "autotune_local_cache",
                                               "bundle_triton_into_fx_graph_cache")]
    settings.append((functorch_config, "enable_autograd_cache"))
    saved = [getattr(mod, n) for mod, n in settings]
    try:
        for mod, n in settings:
            setattr(mod, n, False)
        _check_enable_persistent_caches(tmp_path, inductor_config, functorch_config)
    finally:
        for (mod, n), v in zip(settings, saved):
            setattr(mod, n, v)


def _check_enable_persistent_caches(tmp_path, inductor_config, functorch_config):
    paths = aot.enable_persistent_caches(tmp_path / "c")
    assert paths["inductor"] == str(tmp_path / "c" / "inductor") and os.path.isdir(paths["triton"])
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == paths["inductor"]
    assert os.environ["TRITON_CACHE_DIR"] == paths["triton"]
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == paths["inductor"]
    assert inductor_config.fx_graph_cache and inductor_config.autotune_local_cache
    assert inductor_config.bundle_triton_into_fx_graph_cache and functorch_config.enable_autograd_cache
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RuntimeError, match="cannot create cache directory"):
        aot.enable_persistent_caches(blocker)
