#!/usr/bin/env python3
"""Kiln (CUDA, fp16) against PyTorch (fp16, channels_last, CUDA graphs) on the same GPU.

Run on the GPU machine, after building Kiln's CUDA configuration (scripts/gpu_check.sh does):

    python3 bench/gpu_vs_torch.py --kiln build-gpu/kiln --work /tmp/kiln-bench [--models resnet50,bert]

For each model it
  1. makes the model in PyTorch with random weights (torchvision ResNet-50 v1.5, transformers
     BERT-base with sequence length 128) and exports it to ONNX (opset 17, dynamic batch);
  2. checks Kiln's fp16 engine against PyTorch's float32 outputs on a batch of 4 (ResNet-50: the
     seed's rule, softmax then abs 0.005 / rel 0.05; BERT: abs 0.05 / rel 0.05 on the hidden states);
  3. times PyTorch fp16 (channels_last for ResNet, CUDA graph replay, CUDA events) and, at each
     batch size, Kiln's engine: `kiln build --fp16 --saveEngine` (timing cache shared), then
     `kiln bench --loadEngine --useCudaGraph --noDataTransfers` in a fresh process;
  4. prints GPU compute time per batch, throughput and the Kiln/PyTorch time ratio (< 1: Kiln faster).
Kiln's build time (cold, and warm with the timing cache) is reported too.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

BATCHES = {"resnet50": [1, 256], "bert": [1, 32]}
# Both runtimes are timed with the same counts. The warm-up is long enough for the GPU to reach
# its steady clocks, as trtexec's (200 ms by default) is: with 20 warm-up and 200 timed
# iterations, one ResNet-50 b1 plan read 0.264-0.265 ms against 0.256-0.257 ms with 500 and 2000
# (H100, session 17, docs/benchmarks.md).
WARMUP, ITERS = 500, 1000


def log(msg):
    print(msg, flush=True)


def export(model, args, path, input_names, output_names, dynamic):
    if os.path.exists(path):
        return
    kw = dict(input_names=input_names, output_names=output_names, opset_version=17, dynamic_axes=dynamic)
    try:
        torch.onnx.export(model, args, path, dynamo=False, **kw)
    except Exception as e:  # the TorchScript exporter may be gone; use the dynamo one
        log(f"  (TorchScript export failed: {e}; trying dynamo=True)")
        torch.onnx.export(model, args, path, dynamo=True, external_data=False, **kw)


def save_pb(arr, path, name):
    from onnx import numpy_helper
    t = numpy_helper.from_array(arr, name)
    with open(path, "wb") as f:
        f.write(t.SerializeToString())


def torch_time(fn, warmup=WARMUP, iters=ITERS):
    """Median ms of fn() replayed as a CUDA graph, timed with CUDA events."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def kiln(kiln_bin, args, check=True):
    r = subprocess.run([kiln_bin] + args, capture_output=True, text=True)
    if check and r.returncode != 0:
        log(f"  kiln {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def kiln_bench(kiln_bin, onnx_path, batch, cache, work, tag, dynamic):
    # Deployment as in TensorRT's sample: build the engine for this batch size (tactics not yet in
    # the timing cache are timed), save it, then time the loaded plan in a fresh process. The
    # process that timed tactics runs 5-7% slower on the same plan (docs/benchmarks.md, session 5;
    # cause not found), so it is not the one measured.
    plan = os.path.join(work, f"{tag}_b{batch}.plan")
    r = kiln(kiln_bin, ["build", "--device", "cuda", "--fp16", "--onnx", onnx_path] +
             (["--batch", str(batch)] if dynamic else []) + ["--timingCache", cache, "--saveEngine", plan])
    if r.returncode != 0:
        return None
    js = os.path.join(work, f"bench_{tag}_{batch}.json")
    r = kiln(kiln_bin, ["bench", "--loadEngine", plan] + (["--batch", str(batch)] if dynamic else []) +
             ["--useCudaGraph", "--noDataTransfers",
                        "--warmUp", str(WARMUP), "--iterations", str(ITERS), "--json", js])
    if r.returncode != 0:
        return None
    with open(js) as f:
        return json.load(f)["gpu_compute_ms"]["median"]


def build_times(kiln_bin, onnx_path, batch, work, tag, dynamic):
    cache = os.path.join(work, f"timing_{tag}.cache")
    if os.path.exists(cache):
        os.remove(cache)
    plan = os.path.join(work, f"{tag}.plan")
    out = {}
    for label in ("cold", "warm"):
        t0 = time.time()
        r = kiln(kiln_bin, ["build", "--device", "cuda", "--fp16", "--onnx", onnx_path] +
                 (["--batch", str(batch)] if dynamic else []) + ["--timingCache", cache, "--saveEngine", plan])
        out[label] = time.time() - t0 if r.returncode == 0 else None
    return out, cache


def verify(kiln_bin, onnx_path, inputs, ref, work, tag, softmax, atol, rtol):
    d = os.path.join(work, f"verify_{tag}", "test_data_set_0")
    os.makedirs(d, exist_ok=True)
    for k, (name, arr) in enumerate(inputs):
        save_pb(arr, os.path.join(d, f"input_{k}.pb"), name)
    save_pb(ref, os.path.join(d, "output_0.pb"), "out")
    specs = [f"{name}:{os.path.join(d, f'input_{k}.pb')}" for k, (name, _) in enumerate(inputs)]
    args = ["run", "--device", "cuda", "--fp16", "--onnx", onnx_path, "--verify", "--atol", str(atol),
            "--rtol", str(rtol)]
    for sp in specs:
        args += ["--loadInputs", sp]
    if softmax:
        args.append("--softmax")
    r = kiln(kiln_bin, args, check=False)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    if r.returncode != 0:
        last += " " + r.stderr.strip()[-500:]
    return last


def resnet(work):
    import torchvision
    torch.manual_seed(0)
    m = torchvision.models.resnet50(weights=None).eval().cuda()
    path = os.path.join(work, "resnet50.onnx")
    export(m, (torch.randn(1, 3, 224, 224, device="cuda"),), path, ["data"], ["logits"],
           {"data": {0: "batch"}, "logits": {0: "batch"}})
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = m(x).float().cpu().numpy()
    inputs = [("data", x.cpu().numpy())]
    mh = m.half().to(memory_format=torch.channels_last)

    def timer(batch):
        xb = torch.randn(batch, 3, 224, 224, device="cuda").half().to(memory_format=torch.channels_last)
        with torch.no_grad():
            return torch_time(lambda: mh(xb))
    return {b: path for b in BATCHES["resnet50"] + [4]}, inputs, ref, timer, True, 0.005, 0.05


def bert(work):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig()  # bert-base: 12 layers, hidden 768, 12 heads
    m = BertModel(cfg, add_pooling_layer=False).eval().cuda()

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    w = Wrap(m).eval()
    # Static shapes, one model per batch size: the exported graph computes shapes from the inputs
    # (Shape -> Gather -> Concat ...); with a symbolic batch Kiln's shape inference loses the
    # ranks and the MatMul/attention fusions do not fire (docs/benchmarks.md).
    paths = {}
    for b in sorted(set(BATCHES["bert"] + [4])):
        paths[b] = os.path.join(work, f"bert_base_b{b}.onnx")
        ids = torch.randint(0, cfg.vocab_size, (b, 128), device="cuda")
        mask = torch.ones(b, 128, dtype=torch.int64, device="cuda")
        export(w, (ids, mask), paths[b], ["input_ids", "attention_mask"], ["hidden"], None)
    ids4 = torch.randint(0, cfg.vocab_size, (4, 128), device="cuda")
    mask4 = torch.ones(4, 128, dtype=torch.int64, device="cuda")
    mask4[1, 100:] = 0
    with torch.no_grad():
        ref = w(ids4, mask4).float().cpu().numpy()
    inputs = [("input_ids", ids4.cpu().numpy()), ("attention_mask", mask4.cpu().numpy())]
    wh = Wrap(m.half()).eval()

    def timer(batch):
        ib = torch.randint(0, cfg.vocab_size, (batch, 128), device="cuda")
        mb = torch.ones(batch, 128, dtype=torch.int64, device="cuda")
        with torch.no_grad():
            return torch_time(lambda: wh(ib, mb))
    return paths, inputs, ref, timer, False, 0.05, 0.05


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="build-gpu/kiln")
    ap.add_argument("--work", default="/tmp/kiln-bench")
    ap.add_argument("--models", default="resnet50,bert")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    log(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}")
    rows = []
    for name in a.models.split(","):
        log(f"== {name}")
        paths, inputs, ref, timer, softmax, atol, rtol = (resnet if name == "resnet50" else bert)(a.work)
        dynamic = name == "resnet50"
        top = max(BATCHES[name])
        bt, cache = build_times(a.kiln, paths[top], top, a.work, name, dynamic)
        log(f"  kiln build (fp16, batch {top}): cold {bt['cold']:.2f} s, warm timing cache {bt['warm']:.2f} s")
        v = verify(a.kiln, paths[4], inputs, ref, a.work, name, softmax, atol, rtol)
        log(f"  verify fp16 vs PyTorch fp32 (batch 4): {v}")
        for b in BATCHES[name]:
            t_torch = timer(b)
            t_kiln = kiln_bench(a.kiln, paths[b], b, cache, a.work, name, dynamic)
            ratio = (t_kiln / t_torch) if t_kiln else float("nan")
            rows.append((name, b, t_kiln, t_torch, ratio))
            kt = f"{t_kiln:.3f} ms ({b / t_kiln * 1000:,.0f}/s)" if t_kiln else "failed"
            log(f"  batch {b:4d}: kiln {kt}   torch fp16+graph {t_torch:.3f} ms ({b / t_torch * 1000:,.0f}/s)"
                f"   kiln/torch {ratio:.2f}")
    log("\nmodel      batch  kiln ms   torch ms  kiln/torch")
    for name, b, k, t, r in rows:
        log(f"{name:10s} {b:5d}  {k if k else float('nan'):8.3f}  {t:8.3f}  {r:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
