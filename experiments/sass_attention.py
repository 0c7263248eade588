"""Static look at our rel-pos attention kernel on Hopper, without a GPU.

Compiles ``triton_attention._rel_pos_attn_fwd`` for sm_90 with Triton's bundled ptxas, with the
launch config :func:`kernel_config` picks and the specialisations a real launch gets (unit
strides as constants, 16-divisible pointers and strides), then reports registers, spill
instructions (LDL/STL), and the instruction mix of the key loop (the backward branch around the
wgmma instructions). It does not time anything: it tells which variant keeps its loads
pipelined (LDGSTS, no LDG in the loop) and how many instructions a key block costs.

    python experiments/sass_attention.py --out experiments/results/attention_sass.json
    python experiments/sass_attention.py --package-root /path/to/other/checkout  # another version
"""
import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CASES = {  # name: (window size on SAM's 64x64 token grid, head dim); with rel-pos bias
    "vit_b_global": (64, 64),
    "vit_h_global": (64, 80),
    "vit_b_window": (14, 64),
    "vit_h_window": (14, 80),
}
_POINTERS = ("Q", "K", "V", "RH", "RW", "PK", "PV", "O")
_UNIT = ("s_qd", "s_kd", "s_vd", "s_od", "s_hk", "s_wk")


def _tools():
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.join(bindir, "cuobjdump"), os.path.join(bindir, "nvdisasm")


def compile_case(mod, name, num_warps=None, num_stages=None, block_m=None, rows=None):
    """Compile one case; returns its report dict and the SASS text."""
    size, d = CASES[name]
    cfg = mod.kernel_config(size * size, size, d, (9, 0))
    cfg.update({k: v for k, v in dict(num_warps=num_warps, num_stages=num_stages,
                                      BLOCK_M=block_m, ROWS=rows).items() if v is not None})
    if not hasattr(mod, "launch_constants"):
        raise SystemExit(f"{mod.__file__} has no launch_constants: this script analyses "
                         "checkouts from session 19's review on")
    consts = mod.launch_constants((64, 64), (size, size), d, cfg, True, True, 64 * 64, table=True, ieee=False)
    padded = consts["PADDED"]
    fn = mod._rel_pos_attn_fwd
    params = list(inspect.signature(fn.fn).parameters)
    consts.update({p: 1 for p in _UNIT if p in params})
    sig, attrs = {}, {}
    for i, p in enumerate(params):
        if p in consts:
            sig[p] = "constexpr"
        elif p in _POINTERS:
            sig[p] = "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p in ("qk_scale", "inv_scale"):
            sig[p] = "fp32"
        else:
            sig[p] = "i32"
            # token strides are multiples of 16; the rel tables' are only in the global layers
            if p.startswith("s_") and (not padded or p[2] not in "hw"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(params.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                            options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    cuobjdump, nvdisasm = _tools()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    report = dict(case=name, config=cfg, registers=int(re.search(r"REG:(\d+)", res).group(1)),
                  key_blocks=triton.cdiv(size, cfg["ROWS"]))
    report.update(analyse(sass))
    return report, sass


def analyse(sass: str) -> dict:
    """Instruction count, spill instructions and the op mix of the loop that holds the wgmmas."""
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        lab = re.match(r"\s*\.(L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = re.search(r"/\*([0-9a-f]{4,6})\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            labels.update({p: addr for p in pending})
            pending = []
            ins.append((addr, m.group(2)))

    def op(text):
        return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]

    loop = []
    for addr, text in ins:
        m = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", text)
        if m and labels.get(m.group(1), addr + 1) < addr:
            body = [t for a, t in ins if labels[m.group(1)] <= a <= addr]
            if any("GMMA" in t for t in body) and len(body) > len(loop):
                loop = body
    mix = {}
    for t in loop:
        mix[op(t)] = mix.get(op(t), 0) + 1
    return dict(instructions=len(ins), spills=sum(op(t) in ("LDL", "STL") for _, t in ins),
                loop_instructions=len(loop), loop_global_loads=mix.get("LDG", 0),
                loop_async_copies=mix.get("LDGSTS", 0),
                loop_mix=dict(sorted(mix.items(), key=lambda kv: -kv[1])[:16]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--package-root", default=None,
                    help="directory holding another segment_anything_fast to analyse (one with "
                         "triton_attention.launch_constants)")
    ap.add_argument("--num-warps", type=int, default=None, help="override kernel_config's")
    ap.add_argument("--num-stages", type=int, default=None, help="override kernel_config's")
    ap.add_argument("--rows", type=int, default=None, help="override kernel_config's ROWS")
    ap.add_argument("--block-m", type=int, default=None, help="override kernel_config's BLOCK_M")
    ap.add_argument("--out", default=None, help="write the reports as JSON here")
    args = ap.parse_args(argv)
    if args.package_root:
        sys.path.insert(0, os.path.abspath(args.package_root))
    mod = importlib.import_module("segment_anything_fast.triton_attention")
    reports = []
    for name in args.cases:
        rep, _ = compile_case(mod, name, args.num_warps, args.num_stages, args.block_m, args.rows)
        reports.append(rep)
        print(f"{name:13s} {rep['config']} regs {rep['registers']} spills {rep['spills']} "
              f"loop {rep['loop_instructions']} x {rep['key_blocks']} (LDG {rep['loop_global_loads']}, "
              f"LDGSTS {rep['loop_async_copies']}) {rep['loop_mix']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(triton=triton.__version__, target="sm_90", module=mod.__file__,
                           reports=reports), f, indent=1)
    return reports


if __name__ == "__main__":
    main()
