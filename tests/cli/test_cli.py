#!/usr/bin/env python3
"""End-to-end CLI tests: whole models through `kiln` against ONNX Runtime references, and every
error path with its exit code (0 ok, 1 error, 2 usage, 3 verification mismatch).

usage: test_cli.py KILN_BINARY WORK_DIR
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KILN = os.path.abspath(sys.argv[1])
WORK = os.path.abspath(sys.argv[2])
FAILS = []


def run(*args, timeout=300):
    p = subprocess.run([KILN, *args], capture_output=True, text=True, timeout=timeout, cwd=WORK)
    return p.returncode, p.stdout + p.stderr


def check(name, args, rc, *needles):
    got_rc, out = run(*args)
    ok = got_rc == rc and all(n in out for n in needles)
    print(("PASS " if ok else "FAIL ") + name)
    if not ok:
        FAILS.append(name)
        print(f"  expected rc {rc} and {needles!r}; got rc {got_rc}:\n" + "\n".join("  | " + l for l in out.splitlines()[-15:]))
    return out


def save_pb(path, arr, name="x"):
    with open(path, "wb") as f:
        f.write(numpy_helper.from_array(arr, name).SerializeToString())


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_test_models.py"), WORK], check=True,
                   capture_output=True)
    r = os.path.join(WORK, "tiny_resnet")
    b = os.path.join(WORK, "tiny_bert")
    m = os.path.join(WORK, "tiny_mobilenetv2")

    # --- whole models vs ONNX Runtime --------------------------------------------------------
    check("testDir tiny_resnet", ["run", "--testDir", r, "--rtol", "1e-3", "--atol", "1e-4"], 0,
          "test_data_set_0: OK", "test_data_set_2: OK", "3 of 3 data sets OK")
    check("testDir tiny_mobilenetv2", ["run", "--testDir", m, "--rtol", "1e-3", "--atol", "1e-4"], 0, "1 of 1 data sets OK")
    check("testDir tiny_bert (2 int64 inputs)", ["run", "--testDir", b, "--rtol", "1e-3", "--atol", "1e-4"], 0,
          "test_data_set_0: OK")
    check("build --batch 4", ["build", "--onnx", f"{r}/model.onnx", "--saveEngine", "r.plan", "--batch", "4"], 0, "built")
    # CPU tactics: the first build times the oneDNN convolutions, the second takes every one from
    # the timing cache, and the plan still verifies.
    out = check("build --timingCache (cold)", ["build", "--onnx", f"{r}/model.onnx", "--saveEngine", "rt.plan",
                                               "--batch", "4", "--timingCache", "tc.txt"], 0, "built", "layers timed")
    if "tactics: 0 layers timed" in out:
        FAILS.append("build --timingCache (cold) timed nothing")
    check("build --timingCache (warm)", ["build", "--onnx", f"{r}/model.onnx", "--saveEngine", "rt.plan",
                                         "--batch", "4", "--timingCache", "tc.txt"], 0, "tactics: 0 layers timed, ")
    # A timing-cache line whose third field (a compiled layer) is not base64: the build fails,
    # naming the file and the line.
    with open(os.path.join(WORK, "tc.txt")) as f:
        lines = f.read().splitlines()
    at = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    lines[at] += "\tnot base64!"
    with open(os.path.join(WORK, "tc_bad.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    check("build --timingCache with a corrupt compiled field", ["build", "--onnx", f"{r}/model.onnx", "--saveEngine",
          "rt_bad.plan", "--batch", "4", "--timingCache", "tc_bad.txt"], 1,
          f"tc_bad.txt' line {at + 1}", "not base64")
    check("inspect shows CPU tactics", ["inspect", "rt.plan"], 0, "[cpu.conv.onednn.")
    check("run with cached tactics", ["run", "--loadEngine", "rt.plan", "--testDir", r, "--rtol", "1e-3", "--atol", "1e-4"],
          0, "3 of 3 data sets OK")
    check("run batch of 3 files, verify softmax", ["run", "--loadEngine", "r.plan", f"{r}/test_data_set_0/input_0.pb",
          f"{r}/test_data_set_1/input_0.pb", f"{r}/test_data_set_2/input_0.pb", "--verify", "--softmax"], 0,
          "running batch of 4", "OK")
    check("loadInputs form", ["run", "--loadEngine", "r.plan", "--loadInputs",
          f"data:{r}/test_data_set_0/input_0.pb,{r}/test_data_set_1/input_0.pb", "--verify"], 0, "OK")
    check("multi-input loadInputs", ["run", "--onnx", f"{b}/model.onnx", "--loadInputs",
          f"input_ids:{b}/test_data_set_0/input_0.pb", "--loadInputs", f"attention_mask:{b}/test_data_set_0/input_1.pb",
          "--verify", "--atol", "1e-4", "--rtol", "1e-3"], 0, "OK")
    x0 = numpy_helper.to_array(onnx.load_tensor(f"{r}/test_data_set_0/input_0.pb"))
    os.makedirs(os.path.join(WORK, "npy"), exist_ok=True)
    np.save(os.path.join(WORK, "npy", "input_0.npy"), x0)
    shutil.copy(f"{r}/test_data_set_0/output_0.pb", os.path.join(WORK, "npy", "output_0.pb"))
    check(".npy input", ["run", "--loadEngine", "r.plan", "npy/input_0.npy", "--verify", "--atol", "1e-4", "--rtol", "1e-3"],
          0, "OK")
    check("saveOutputs", ["run", "--loadEngine", "r.plan", f"{r}/test_data_set_0/input_0.pb", "--saveOutputs", "outs"], 0,
          "saved output 'logits'")
    saved = numpy_helper.to_array(onnx.load_tensor(os.path.join(WORK, "outs", "logits.pb")))
    ref = numpy_helper.to_array(onnx.load_tensor(f"{r}/test_data_set_0/output_0.pb"))
    if not np.allclose(saved, ref, rtol=1e-3, atol=1e-4):
        FAILS.append("saveOutputs content")
        print("FAIL saveOutputs content")
    check("inspect onnx", ["inspect", f"{r}/model.onnx"], 0, "data: float32[N,3,32,32]", "BatchNormalization", "parameters:")
    check("inspect plan", ["inspect", "r.plan"], 0, "format version 1", "max batch 4", "kiln.FusedConv  cpu.")  # fused by the builder, with its tactic
    out = check("bench json", ["bench", "--loadEngine", "r.plan", "--iterations", "5", "--json", "bench.json"], 0,
                "latency: min", "p99", "throughput")
    j = json.load(open(os.path.join(WORK, "bench.json")))
    for k in ("min", "mean", "median", "p90", "p95", "p99", "max"):
        if k not in j["latency_ms"]:
            FAILS.append("bench json " + k)

    check("bench exportProfile", ["bench", "--loadEngine", "r.plan", "--iterations", "3", "--exportProfile",
                                  "prof.json"], 0, "=== profile")
    prof = json.load(open(os.path.join(WORK, "prof.json")))
    names = [l["name"] for l in prof]
    if not prof or any(l["mean_ms"] < 0 or l["runs"] != 3 for l in prof) or not any(
            l["op"] == "kiln.FusedConv" and l["kernel"].startswith("cpu.") for l in prof) or len(set(names)) != len(names):
        FAILS.append("bench exportProfile content")
        print("FAIL bench exportProfile content")
    check("bench exportProfile unwritable", ["bench", "--loadEngine", "r.plan", "--iterations", "1", "--exportProfile",
                                             "no_such_dir/prof.json"], 1, "cannot write 'no_such_dir/prof.json'")
    # In-process A/B: alternating bursts of two plans (here the same plan twice).
    out = check("bench compare", ["bench", "--loadEngine", "r.plan", "--compare", "r.plan", "--iterations", "3",
                                  "--rounds", "4", "--warmUp", "1"], 0,
                "=== A/B (4 rounds of 3 iterations each", "A r.plan: min", "B r.plan: min", "B/A: ", "of 4 rounds")
    ab = [l for l in out.splitlines() if l.startswith("B/A: ")]
    if not ab or not 0.2 < float(ab[0].split()[1]) < 5:
        FAILS.append("bench compare ratio")
        print("FAIL bench compare ratio")
    check("bench compare missing plan", ["bench", "--loadEngine", "r.plan", "--compare", "no_such.plan"], 1,
          "no_such.plan")

    # --- engine cache ------------------------------------------------------------------------
    shutil.copytree(r, os.path.join(WORK, "cached_model"))
    cm = os.path.join(WORK, "cached_model", "model.onnx")
    inp = f"{r}/test_data_set_0/input_0.pb"
    check("cache miss builds", ["run", "--onnx", cm, "--cache", "cache", inp], 0, "built and cached")
    check("cache hit loads", ["run", "--onnx", cm, "--cache", "cache", inp], 0, "loaded from cache")
    check("cache other config misses", ["run", "--onnx", cm, "--cache", "cache", "--batch", "2", inp], 0, "built and cached")
    for f in os.listdir(os.path.join(WORK, "cache")):
        p = os.path.join(WORK, "cache", f)
        data = bytearray(open(p, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(p, "wb").write(bytes(data))
    check("damaged cached plan is rebuilt", ["run", "--onnx", cm, "--cache", "cache", inp], 0,
          "checksum", "built and cached")
    shutil.copy(f"{m}/model.onnx", cm)  # the model changed: the old plan is stale
    check("stale model rebuilds", ["run", "--onnx", cm, "--cache", "cache", inp], 0, "built and cached")

    # --- errors ------------------------------------------------------------------------------
    # CUDA options: refused clearly where they cannot apply (CI has no GPU).
    check("CUDA bench flags on a CPU plan", ["bench", "--loadEngine", "r.plan", "--useCudaGraph"], 2,
          "need an engine built for cuda")
    check("unknown device", ["build", "--onnx", f"{r}/model.onnx", "--saveEngine", "d.plan", "--device", "tpu"], 1,
          "unknown device 'tpu'")
    check("bad ioFormats", ["build", "--onnx", f"{r}/model.onnx", "--saveEngine", "d.plan", "--ioFormats", "int3"], 2,
          "--ioFormats expects")
    check("bad layerPrecisions", ["build", "--onnx", f"{r}/model.onnx", "--saveEngine", "d.plan",
                                  "--layerPrecisions", "conv1=fp8"], 2, "--layerPrecisions expects")
    rc, out = run("build", "--onnx", f"{r}/model.onnx", "--saveEngine", "cuda.plan", "--device", "cuda", "--fp16")
    gpu = rc == 0
    ok = gpu or (rc == 1 and ("no usable CUDA GPU" in out or "no CUDA backend" in out))
    print(("PASS " if ok else "FAIL ") + f"--device cuda builds or says why not ({'GPU present' if gpu else 'no GPU'})")
    if not ok:
        FAILS.append("--device cuda")
        print("  | " + out[-800:])
    if gpu:  # on a GPU machine: the fp16 engine runs and matches the reference loosely
        check("cuda fp16 run", ["run", "--loadEngine", "cuda.plan", f"{r}/test_data_set_0/input_0.pb", "--verify",
                                "--atol", "0.05", "--rtol", "0.05"], 0, "OK")
        check("cuda inspect shows tactics", ["inspect", "cuda.plan"], 0, "cuda.")
    check("--threads 1", ["run", "--loadEngine", "r.plan", "--threads", "1", f"{r}/test_data_set_0/input_0.pb",
                          "--verify", "--atol", "1e-4", "--rtol", "1e-3"], 0, "OK")
    check("--threads 0 refused", ["run", "--loadEngine", "r.plan", "--threads", "0", inp], 2, "--threads expects")
    check("no command", [], 2, "usage")
    check("unknown command", ["frobnicate"], 2, "unknown command")
    check("unknown option", ["run", "--bogus"], 2, "unknown option '--bogus'")
    check("bad number", ["build", "--onnx", "x", "--saveEngine", "y", "--batch", "many"], 2, "--batch expects an integer")
    check("build needs saveEngine", ["build", "--onnx", f"{r}/model.onnx"], 2, "--saveEngine")
    check("help", ["run", "--help"], 0, "--loadInputs", "--verify")
    check("missing model", ["build", "--onnx", "nope.onnx", "--saveEngine", "y.plan"], 1, "'nope.onnx' does not exist")
    check("missing engine", ["run", "--loadEngine", "nope.plan", inp], 1, "does not exist")
    check("missing input file", ["run", "--loadEngine", "r.plan", "missing.pb"], 1, "missing.pb")
    check("no inputs", ["run", "--loadEngine", "r.plan"], 2, "no inputs given")
    check("wrong number of inputs (positional on 2-input model)", ["run", "--onnx", f"{b}/model.onnx",
          f"{b}/test_data_set_0/input_0.pb"], 1, "has 2 inputs")
    check("missing one of two inputs", ["run", "--onnx", f"{b}/model.onnx", "--loadInputs",
          f"input_ids:{b}/test_data_set_0/input_0.pb"], 1, "input 'attention_mask' was not given")
    check("unknown input name", ["run", "--loadEngine", "r.plan", "--loadInputs", f"image:{inp}"], 1, "no input named 'image'")
    save_pb(os.path.join(WORK, "wrong_shape.pb"), np.zeros((1, 3, 16, 16), np.float32))
    check("wrong shape", ["run", "--loadEngine", "r.plan", "wrong_shape.pb"], 1, "expects shape")
    save_pb(os.path.join(WORK, "wrong_rank.pb"), np.zeros((3, 32, 32), np.float32))
    check("wrong rank", ["run", "--loadEngine", "r.plan", "wrong_rank.pb"], 1, "expects rank 4")
    save_pb(os.path.join(WORK, "wrong_dtype.pb"), np.zeros((1, 3, 32, 32), np.int64))
    check("wrong dtype", ["run", "--loadEngine", "r.plan", "wrong_dtype.pb"], 1, "expects float32 data, got int64")
    save_pb(os.path.join(WORK, "big_batch.pb"), np.zeros((5, 3, 32, 32), np.float32))
    check("batch above max", ["run", "--loadEngine", "r.plan", "big_batch.pb"], 1, "built for batch 1..4")
    open(os.path.join(WORK, "garbage.pb"), "wb").write(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
    check("garbage input file", ["run", "--loadEngine", "r.plan", "garbage.pb"], 1, "garbage.pb")
    plan = open(os.path.join(WORK, "r.plan"), "rb").read()
    open(os.path.join(WORK, "trunc.plan"), "wb").write(plan[: len(plan) // 2])
    check("truncated plan refused", ["run", "--loadEngine", "trunc.plan", inp], 1, "truncated")
    bad = bytearray(plan)
    bad[len(bad) - 10] ^= 1
    open(os.path.join(WORK, "flip.plan"), "wb").write(bytes(bad))
    check("damaged plan refused", ["run", "--loadEngine", "flip.plan", inp], 1, "checksum")
    v2 = bytearray(plan)
    v2[8] = 99
    open(os.path.join(WORK, "v99.plan"), "wb").write(bytes(v2))
    check("other format version refused", ["run", "--loadEngine", "v99.plan", inp], 1, "format version 99")
    model_bytes = open(f"{r}/model.onnx", "rb").read()
    open(os.path.join(WORK, "trunc.onnx"), "wb").write(model_bytes[: len(model_bytes) // 3])
    check("truncated model", ["build", "--onnx", "trunc.onnx", "--saveEngine", "t.plan"], 1, "byte")
    # An operator Kiln does not have.
    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    mod = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(mod, os.path.join(WORK, "fancy.onnx"))
    check("unsupported operator", ["build", "--onnx", "fancy.onnx", "--saveEngine", "f.plan"], 1,
          "unsupported", "FancyOp")
    # Verification mismatch: compare set 0's input with set 1's reference.
    os.makedirs(os.path.join(WORK, "swap"), exist_ok=True)
    shutil.copy(f"{r}/test_data_set_0/input_0.pb", os.path.join(WORK, "swap", "input_0.pb"))
    shutil.copy(f"{r}/test_data_set_1/output_0.pb", os.path.join(WORK, "swap", "output_0.pb"))
    check("verify mismatch exits 3", ["run", "--loadEngine", "r.plan", "swap/input_0.pb", "--verify", "--atol", "1e-4",
          "--rtol", "1e-3"], 3, "MISMATCH output 'logits'", "expected")

    print(f"\n{len(FAILS)} failure(s)" + (": " + ", ".join(FAILS) if FAILS else ""))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
