#!/usr/bin/env python3
"""Kiln vs ONNX Runtime on CPU, side by side in one run: same models, same inputs, same threads.

  python3 bench/cpu_vs_ort.py --kiln build/kiln --samples /tmp/sample --threads 4

Rows: ResNet-50 v1.5 batch 1 and 8, MobileNetV2 batch 1, BERT-base seq 128 batch 1 (models from
scripts/make_resnet50_sample.py and scripts/make_mobilenet_bert.py: SAMPLES/<name>/model.onnx).
For each row: Kiln builds a plan (timed), `kiln run` saves outputs that must agree with ORT's
(max |kiln - ort| <= rel * max|ort|), then `kiln bench --json` and an ORT worker process each
time the same inputs, alternating --rounds times. Prints each side's median latency (the median
of its round medians), the ratio Kiln/ORT (target <= 0.80) with the range of the rounds' own
ratios, the peak RSS of each process and Kiln's build time. Kiln's threads: OMP_NUM_THREADS (--omp-wait-policy active
matches ORT's spinning pool on dedicated cores); ORT's: intra_op threads.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROWS = [
    ("resnet50_b1", "resnet50", 1),
    ("resnet50_b8", "resnet50", 8),
    ("mobilenetv2_b1", "mobilenetv2", 1),
    ("bert_base_s128_b1", "bert_base", 1),
]
# Run only when named in --rows: BERT with its first 64 of 128 tokens padded (attention_mask 0),
# the masked keys' softmax weights then come first in each row (on Intel cores, subnormal
# products there cost a microcode assist each: docs/benchmarks.md, session 26).
EXTRA_ROWS = [
    ("bert_base_s128_b1_leftpad64", "bert_base", 1, 64),
]


def make_inputs(model_path, batch, seed, pad=0):
    import onnx
    m = onnx.load(model_path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    rng = np.random.default_rng(seed)
    out = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = []
        for k, d in enumerate(tt.shape.dim):
            shape.append(d.dim_value if d.dim_value > 0 else (batch if k == 0 else 1))
        if tt.elem_type == onnx.TensorProto.FLOAT:
            out[vi.name] = rng.standard_normal(shape).astype(np.float32)
        elif tt.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            dt = np.int64 if tt.elem_type == onnx.TensorProto.INT64 else np.int32
            if "mask" in vi.name:
                out[vi.name] = np.ones(shape, dtype=dt)
                out[vi.name][..., :pad] = 0  # left padding
            else:
                out[vi.name] = rng.integers(0, 1000, size=shape).astype(dt)
        else:
            raise SystemExit(f"{model_path}: input {vi.name} has unsupported type {tt.elem_type}")
    return out


def run_measured(cmd, env=None):
    """Runs cmd, returns (returncode, stdout+stderr, peak RSS MiB of that process)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = p.stdout.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, out, ru.ru_maxrss / 1024.0


def ort_worker(args):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    feeds = {k: np.load(os.path.join(args.inputs, k + ".npy")) for k in json.load(open(os.path.join(args.inputs, "names.json")))}
    outs = sess.run(None, feeds)
    for _ in range(args.warmup):
        sess.run(None, feeds)
    lat = []
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        lat.append((time.perf_counter() - t0) * 1e3)
    names = [o.name for o in sess.get_outputs()]
    for n, o in zip(names, outs):
        np.save(os.path.join(args.out, "ort_" + n.replace("/", "_") + ".npy"), o)
    json.dump({"median_ms": float(np.median(lat)), "outputs": names}, open(os.path.join(args.out, "ort.json"), "w"))


def read_pb(path):
    import onnx
    from onnx import numpy_helper
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def bench_row(args, name, model_dir, batch, work, pad=0):
    model = os.path.join(args.samples, model_dir, "model.onnx")
    if not os.path.exists(model):
        return {"row": name, "error": f"missing {model} (run scripts/make_*.py)"}
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    # Inputs are made in a child process: onnx.load would grow this process, and a child's peak
    # RSS (wait4) starts from its parent's size at fork.
    rc, out, _ = run_measured([sys.executable, os.path.abspath(__file__), "--inputs-worker", "--model", model,
                               "--out", d, "--batch", str(batch), "--pad", str(pad)])
    if rc != 0:
        return {"row": name, "error": "making inputs failed: " + out[-2000:]}
    feeds = json.load(open(os.path.join(d, "names.json")))
    # ORT's intra-op pool spins between ops by default; OMP_WAIT_POLICY=active is the OpenMP
    # equivalent for Kiln (libgomp reads it at load, so it can only come from the environment).
    # It helps on idle dedicated cores and hurts badly on oversubscribed ones: pass it explicitly.
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    plan = os.path.join(d, "m.plan")
    bcmd = [args.kiln, "build", "--onnx", model, "--saveEngine", plan]
    if batch > 1:
        bcmd += ["--batch", str(batch)]
    t0 = time.perf_counter()
    rc, out, build_rss = run_measured(bcmd, env)
    build_s = time.perf_counter() - t0
    if rc != 0:
        return {"row": name, "error": "kiln build failed: " + out[-2000:]}
    inputs = []
    for k in feeds:
        inputs += ["--loadInputs", f"{k}:{os.path.join(d, k + '.npy')}"]
    outdir = os.path.join(d, "kiln_out")
    rc, out, _ = run_measured([args.kiln, "run", "--loadEngine", plan, *inputs, "--saveOutputs", outdir], env)
    if rc != 0:
        return {"row": name, "error": "kiln run failed: " + out[-2000:]}
    # Kiln and ORT alternate, --rounds times each: a machine whose speed drifts (shared or
    # throttled cores) slows both sides of a round alike, where timing all of one side first would
    # charge the drift to one of them. Each side's figure is the median of its round medians.
    jpath = os.path.join(d, "kiln.json")
    kiln_ms, ort_ms, kiln_rss, ort_rss = [], [], 0.0, 0.0
    for _ in range(args.rounds):
        rc, out, rss = run_measured([args.kiln, "bench", "--loadEngine", plan, *inputs, "--warmUp",
                                     str(args.warmup), "--iterations", str(args.iterations), "--json", jpath], env)
        if rc != 0:
            return {"row": name, "error": "kiln bench failed: " + out[-2000:]}
        kiln_ms.append(json.load(open(jpath))["latency_ms"]["median"])
        kiln_rss = max(kiln_rss, rss)
        rc, out, rss = run_measured([sys.executable, os.path.abspath(__file__), "--ort-worker", "--model", model,
                                     "--inputs", d, "--out", d, "--threads", str(args.threads),
                                     "--warmup", str(args.warmup), "--iterations", str(args.iterations)])
        if rc != 0:
            return {"row": name, "error": "ORT worker failed: " + out[-2000:]}
        ort_ms.append(json.load(open(os.path.join(d, "ort.json")))["median_ms"])
        ort_rss = max(ort_rss, rss)
    oj = json.load(open(os.path.join(d, "ort.json")))
    worst = 0.0
    for n in oj["outputs"]:
        ref = np.load(os.path.join(d, "ort_" + n.replace("/", "_") + ".npy")).astype(np.float64)
        got = read_pb(os.path.join(outdir, n + ".pb")).astype(np.float64)
        if got.shape != ref.shape:
            return {"row": name, "error": f"output {n}: shape {got.shape} vs ORT {ref.shape}"}
        worst = max(worst, float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12)))
    round_ratios = [k / o for k, o in zip(kiln_ms, ort_ms)]
    k_med, o_med = float(np.median(kiln_ms)), float(np.median(ort_ms))
    return {"row": name, "kiln_ms": k_med, "ort_ms": o_med, "ratio": k_med / o_med,
            "round_kiln_ms": kiln_ms, "round_ort_ms": ort_ms,
            "round_ratio_min": min(round_ratios), "round_ratio_max": max(round_ratios),
            "kiln_rss_mib": kiln_rss, "ort_rss_mib": ort_rss, "kiln_build_s": build_s,
            "kiln_build_rss_mib": build_rss, "max_rel_err": worst, "agree": worst <= args.rel}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default="build/kiln")
    ap.add_argument("--samples", default="/tmp/sample")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3,
                    help="Kiln and ORT timed alternately this many times each (medians of the rounds)")
    ap.add_argument("--rel", type=float, default=1e-3, help="max |kiln-ort| / max|ort| per output")
    ap.add_argument("--rows", default="", help="comma-separated subset of " + ",".join(r[0] for r in ROWS) +
                    " (default: all of these), or " + ",".join(r[0] for r in EXTRA_ROWS) + " (only when named)")
    ap.add_argument("--json", default="", help="also write the rows as JSON here")
    ap.add_argument("--work", default="")
    ap.add_argument("--omp-wait-policy", default="", choices=["", "active", "passive"],
                    help="OMP_WAIT_POLICY for Kiln (default: inherited)")
    ap.add_argument("--ort-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inputs-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--pad", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ort_worker:
        return ort_worker(args)
    if args.inputs_worker:
        feeds = make_inputs(args.model, args.batch, seed=1234, pad=args.pad)
        for k, v in feeds.items():
            np.save(os.path.join(args.out, k + ".npy"), v)
        json.dump(list(feeds), open(os.path.join(args.out, "names.json"), "w"))
        return 0
    want = set(filter(None, args.rows.split(",")))
    known = {r[0] for r in ROWS + EXTRA_ROWS}
    if want - known:
        ap.error("unknown rows: " + ",".join(sorted(want - known)))
    work = args.work or tempfile.mkdtemp(prefix="kiln_vs_ort_")
    results = []
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    print(f"threads {args.threads}, warmup {args.warmup}, iterations {args.iterations}, rounds {args.rounds}, "
          f"Kiln OMP_WAIT_POLICY={args.omp_wait_policy or os.environ.get('OMP_WAIT_POLICY', '(default)')}, "
          f"work dir {work}")
    hdr = (f"{'row':<27} {'kiln ms':>9} {'ort ms':>9} {'ratio':>6} {'rounds':>11} {'kiln RSS':>9} {'ort RSS':>9} "
           f"{'build s':>8} {'rel err':>9}")
    print(hdr)
    bad = False
    for name, model_dir, batch, *rest in ROWS + EXTRA_ROWS:
        if (want and name not in want) or (not want and rest):
            continue
        r = bench_row(args, name, model_dir, batch, work, pad=rest[0] if rest else 0)
        results.append(r)
        if "error" in r:
            bad = True
            print(f"{name:<27} ERROR {r['error']}")
            continue
        bad = bad or not r["agree"]
        print(f"{name:<27} {r['kiln_ms']:9.2f} {r['ort_ms']:9.2f} {r['ratio']:6.2f} "
              f"{r['round_ratio_min']:5.2f}-{r['round_ratio_max']:4.2f} {r['kiln_rss_mib']:8.0f}M "
              f"{r['ort_rss_mib']:8.0f}M {r['kiln_build_s']:8.2f} {r['max_rel_err']:9.2e}"
              + ("" if r["agree"] else "  OUTPUTS DISAGREE"), flush=True)
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main() or 0)
