#!/usr/bin/env python
"""Cold start: seconds from a fresh Python process to the first mask (issue 9).

Steps (each runs in fresh child processes; ``spawn_to_first_mask_s`` is the wall time from
starting the process, interpreter and imports included, to the first mask on the host):

* ``export``: ``scripts/export_package.py`` writes the AOTInductor package (one-time cost).
* ``package``: build the model from the checkpoint, attach the package, SamPredictor
  ``set_image`` + one point ``predict`` (twice: the second run has a warm OS page cache).
* ``compile_cold`` / ``compile_warm``: ``enable_persistent_caches(<workdir>/cache)`` then
  ``build_sam_fast`` (torch.compile) and the same first mask; cold starts from an empty cache
  directory, warm reuses what cold left there.

Each child also times the image encoder over ``--iters`` batches after its first mask, so
package and in-process compiled throughput compare. Without ``--checkpoint`` a random
checkpoint file is written once to the workdir (the load time is then still measured).

    python experiments/cold_start.py --model-type vit_h --workdir /tmp/cold --output cold_vit_h.json
"""
import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))
from aoti_load_check import run_child  # noqa: E402
STEPS = ("export", "package", "compile_cold", "compile_warm")


def child(args):
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from segment_anything_fast.aot import build_sam_from_package, enable_persistent_caches
    from segment_anything_fast.predictor import SamPredictor

    t_import = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    if args.child == "package":
        sam = build_sam_from_package(args.package, args.checkpoint, batch_size=args.batch_size)
        t_build = time.perf_counter()
    else:
        enable_persistent_caches(args.cache_dir)
        from segment_anything_fast.build_sam_fast import build_sam_fast

        sam = build_sam_fast(args.model_type, args.checkpoint, dtype=dtype, attention=args.attention,
                             batch_size=args.batch_size, device=args.device,
                             compile_mode=args.compile_mode, decoder_compile_mode=None)
        t_build = time.perf_counter()
    t_ready = t_build  # the compile children compile during the first mask
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    pred = SamPredictor(sam)
    pred.set_image(image)
    masks, scores, _ = pred.predict(point_coords=np.array([[500.0, 375.0]]), point_labels=np.array([1]))
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    sync()
    t_mask = time.perf_counter()
    from_spawn = time.time() - args.spawn_time  # process start (interpreter, imports) included

    x = torch.randn(args.batch_size, 3, 1024, 1024, device=args.device, dtype=dtype)
    with torch.no_grad():
        for _ in range(3):
            sam.image_encoder(x)
        sync()
        s = time.perf_counter()
        for _ in range(args.iters):
            sam.image_encoder(x)
        sync()
        per_batch = (time.perf_counter() - s) / args.iters
    from torch._dynamo.utils import counters

    cache_counts = {f"{group}.{k}": v for group in ("inductor", "aot_autograd")
                    for k, v in counters[group].items() if "cache" in k}
    print("RESULT " + json.dumps({
        "cache_counters": cache_counts,  # compile children: warm runs should show hits, no bypass
        "import_s": t_import - t0, "build_and_attach_s": t_build - t_import,
        "first_mask_s": t_mask - t_ready, "in_process_total_s": t_mask - t0,
        "spawn_to_first_mask_s": from_spawn,
        "mask_area": int(masks[0].sum()), "encoder_ms_per_batch": per_batch * 1e3,
        "encoder_img_per_s": args.batch_size / per_batch,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }), flush=True)


class ChildFailed(RuntimeError):
    """A child process failed; ``record`` is what the results JSON keeps of it."""

    def __init__(self, error: str, cmd, tail: str):
        super().__init__(error)
        self.record = {"error": error, "cmd": " ".join(cmd), "output_tail": tail[-4000:]}


def spawn(cmd, timeout):
    if "--child" in cmd:
        cmd = cmd + ["--spawn-time", repr(time.time())]
    res, err, tail = run_child(cmd, timeout, cwd=ROOT)
    if err:
        if "crashed" in err and "package" in cmd:
            err += (" (does AOTInductor loading work here at all? python experiments/aoti_load_check.py "
                    "--device cuda)")
        raise ChildFailed(err, cmd, tail)
    res["process_wall_s"] = res.pop("seconds")  # whole child, throughput loop included
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="vit_h", choices=["vit_h", "vit_l", "vit_b"])
    ap.add_argument("--checkpoint", help="SAM checkpoint (default: a random one in the workdir)")
    ap.add_argument("--workdir", required=True, help="package, random checkpoint and caches go here")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--attention", default="flex")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile-mode", default="max-autotune",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the compile_cold/compile_warm children (default "
                         "max-autotune); pair it with --export-args=--no-max-autotune for a like-for-like package")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--export-args", default="", help="extra arguments for export_package.py")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--commit", default="", help="git commit of the code (when .git is absent)")
    ap.add_argument("--output", help="write the results as JSON here")
    ap.add_argument("--child", choices=["package", "compile"], help=argparse.SUPPRESS)
    ap.add_argument("--package", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--spawn-time", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    os.makedirs(args.workdir, exist_ok=True)
    from bench_encoder import git_commit
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = os.path.join(args.workdir, f"random_{args.model_type}.pth")
        if not os.path.exists(ckpt):
            print(f"no --checkpoint: writing RANDOM weights to {ckpt}", flush=True)
            import torch

            from segment_anything_fast.build_sam import build_sam

            torch.save(build_sam(args.model_type).state_dict(), ckpt)
    package = os.path.join(args.workdir, f"{args.model_type}_b{args.batch_size}_{args.dtype}.pt2")
    cache = os.path.join(args.workdir, "cache")
    common = ["--model-type", args.model_type, "--checkpoint", ckpt, "--batch-size", str(args.batch_size),
              "--dtype", args.dtype, "--attention", args.attention, "--device", args.device]
    python = [sys.executable, "-X", "faulthandler"]  # a crashing child prints its Python stack
    me = python + [os.path.abspath(__file__)] + common + [
        "--workdir", args.workdir, "--iters", str(args.iters), "--compile-mode", args.compile_mode]
    results = {"model_type": args.model_type, "batch_size": args.batch_size, "dtype": args.dtype,
               "attention": args.attention, "compile_mode": args.compile_mode,
               "export_args": args.export_args, "git_commit": git_commit(args.commit)}
    def compile_child(cold: bool):
        if cold:
            shutil.rmtree(cache, ignore_errors=True)
        return spawn(me + ["--child", "compile", "--cache-dir", cache], args.timeout)

    plan = {
        "export": lambda: spawn(python + [os.path.join(ROOT, "scripts", "export_package.py")]
                                + common + ["--output", package] + args.export_args.split(), args.timeout),
        "package": lambda: [spawn(me + ["--child", "package", "--package", package], args.timeout)
                            for _ in range(2)],
        "compile_cold": lambda: compile_child(cold=True),
        "compile_warm": lambda: compile_child(cold=False),
    }
    needs = {"package": "export", "compile_warm": "compile_cold"}
    failed = False
    for step in STEPS:
        if step not in args.steps:
            continue
        if needs.get(step) in args.steps and "error" in results.get(needs[step], {}):
            results[step] = {"error": f"skipped: {needs[step]} failed"}
        else:
            try:
                results[step] = plan[step]()
            except ChildFailed as e:  # record it, go on to the next step
                results[step] = e.record
        failed |= isinstance(results[step], dict) and "error" in results[step]
        print(step, results[step], flush=True)
        if "package" in results and "compile_cold" in results and not failed:
            results["package_vs_compiled_throughput"] = (
                results["package"][-1]["encoder_img_per_s"] / results["compile_cold"]["encoder_img_per_s"])
        if args.output:  # after every step, so a later failure or kill keeps what was measured
            tmp = f"{args.output}.tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
            os.replace(tmp, args.output)
    print(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
