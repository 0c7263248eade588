#!/usr/bin/env python
"""Does AOTInductor package loading work on this machine at all? (cold start, issue 9)

For each ``--device`` a small MLP is exported and compiled with torch's own API
(``torch.export.export`` + ``torch._inductor.aoti_compile_and_package``, none of our code), then
loaded with ``torch._inductor.aoti_load_package`` in a fresh child process and compared with
eager. Each step runs in its own process, so a crash (e.g. SIGSEGV inside the C++ loader) is
reported instead of killing the check. Prints one line per device and exits 1 if any failed.

On the H100 machine (torch 2.11.0+cu130) every load crashed with SIGSEGV in ``_load_aoti``,
for a CPU package as well as a CUDA one, so no AOTInductor package can be timed there; with
torch 2.14 on the CPU the same check passes (tests/test_bench_scripts.py).

    python experiments/aoti_load_check.py --device cpu cuda --output aoti_check.json
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time


def _model_and_input(device):
    import torch

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    return m.to(device).eval(), torch.randn(4, 64, device=device)


def child(step, device, package):
    import torch

    m, x = _model_and_input(device)
    with torch.no_grad():
        if step == "compile":
            ep = torch.export.export(m, (x,), strict=False)
            torch._inductor.aoti_compile_and_package(ep, package_path=package)
            print("RESULT " + json.dumps({"ok": True}), flush=True)
            return
        runner = torch._inductor.aoti_load_package(package)
        out = runner(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        err = float((out.float() - m(x).float()).abs().max())
    print("RESULT " + json.dumps({"ok": err < 1e-3, "max_abs_err": err}), flush=True)


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def run_child(cmd, timeout, cwd=None):
    """Run a child that prints ``RESULT {json}`` lines. Returns (its results merged, with
    "seconds"; the error as text or None: timeout, crash signal, exit code or an unreadable
    RESULT line; the tail of its stdout + stderr)."""
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        return {"seconds": timeout}, f"timed out after {timeout} s", _text(e.stdout)[-3000:] + _text(e.stderr)[-3000:]
    res, err = {"seconds": round(time.perf_counter() - t, 2)}, None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            try:
                res.update(json.loads(line[len("RESULT "):]))
            except ValueError:
                err = f"unreadable result line {line[:200]!r}"
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        err = f"crashed ({name})"
    elif proc.returncode:
        err = f"exit code {proc.returncode}"
    return res, err, proc.stdout[-3000:] + proc.stderr[-3000:]


def run_step(cmd, timeout):
    """One check step: {"ok": bool, ...}, with "error" (and the output tail) when it failed."""
    res, err, tail = run_child(cmd, timeout)
    if err is None and not res.get("ok"):
        err = "wrong output" if "max_abs_err" in res else "no result"
    res["ok"] = err is None
    if err:
        res.update(error=err, output_tail=tail)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    ap.add_argument("--workdir", help="where the packages go (default: a temporary folder)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per step")
    ap.add_argument("--output", help="also write the results as JSON here")
    ap.add_argument("--child", choices=["compile", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--package", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.device[0], args.package)
        return 0
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        ap.error(f"--output: folder of {args.output!r} does not exist.")
    import torch

    workdir = args.workdir or tempfile.mkdtemp(prefix="aoti_check_")
    os.makedirs(workdir, exist_ok=True)
    results = {"torch": torch.__version__, "cuda": torch.version.cuda}
    me = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__)]
    for dev in args.device:
        if dev == "cuda" and not torch.cuda.is_available():
            results[dev] = {"ok": False, "error": "no CUDA device here"}
        else:
            pkg = os.path.join(workdir, f"mlp_{dev}.pt2")
            steps = {"compile": run_step(me + ["--child", "compile", "--device", dev, "--package", pkg],
                                         args.timeout)}
            if steps["compile"]["ok"]:
                steps["load"] = run_step(me + ["--child", "load", "--device", dev, "--package", pkg],
                                         args.timeout)
            results[dev] = {"ok": all(s["ok"] for s in steps.values()), **steps}
        r = results[dev]
        why = next((f"{k}: {s['error']}" for k, s in r.items() if isinstance(s, dict) and "error" in s),
                   r.get("error", ""))
        print(f"{dev}: {'ok' if r['ok'] else 'FAILED ' + why}", flush=True)
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.output)
    return 0 if all(results[d]["ok"] for d in args.device) else 1


if __name__ == "__main__":
    sys.exit(main())
