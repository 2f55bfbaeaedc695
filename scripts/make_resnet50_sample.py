#!/usr/bin/env python3
"""Generate a ResNet-50 v1.5 ONNX sample with seeded random weights plus reference data.

Usage: python3 scripts/make_resnet50_sample.py OUTDIR [--no-bench] [--force]

Writes
  OUTDIR/resnet50/model.onnx                       (opset 17, ir_version 8, weights inline, ~100 MB)
  OUTDIR/resnet50/test_data_set_{0,1,2}/input_0.pb  ("data", float32 [1,3,224,224])
  OUTDIR/resnet50/test_data_set_{0,1,2}/output_0.pb ("logits", float32 [1,1000], computed by
                                                     ONNX Runtime CPU with ORT_DISABLE_ALL)
  OUTDIR/resnet50/STAMP                             (script version; written last)

The graph is built with onnx.helper (no torch). BatchNormalization nodes are kept separate on
purpose (folding them is the optimizer's job). Weights come from numpy's seeded RNG (seed 0):
He-normal convs, BN with gamma ~1 / beta ~0 / mean ~0 / var ~1 plus a little noise; the last BN of
each residual branch has a small gamma so activations stay O(1) through 16 residual Adds. The
final Gemm is scaled from a calibration pass so logits have std ~3 per image, which makes the
softmax top-1 probability well above uniform (the reference comparison is on softmax outputs).

Only depends on pip `onnx`, `numpy`, `onnxruntime`. Idempotent: if everything exists and the stamp
matches SCRIPT_VERSION it prints "sample exists" and exits 0.
"""

import os
import sys
import time

SCRIPT_VERSION = "resnet50-sample-v3"
NUM_CALIB = 8  # extra images used only to estimate the mean feature vector
TARGET_LOGIT_STD = 3.0
NUM_SETS = 3

try:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - environment check
    sys.stderr.write(
        "error: make_resnet50_sample.py needs the pip packages numpy, onnx and onnxruntime "
        f"({e}). Install them with: pip install numpy onnx onnxruntime\n")
    sys.exit(2)


def log(msg):
    print(f"[resnet50-sample] {msg}", flush=True)


class Builder:
    """Tiny helper that accumulates nodes and initializers."""

    def __init__(self, rng):
        self.rng = rng
        self.nodes = []
        self.inits = []

    def init(self, name, arr):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op, inputs, outputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def conv(self, x, prefix, cin, cout, k, stride=1, pad=0):
        fan_in = cin * k * k
        w = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(
            np.sqrt(2.0 / fan_in))
        wn = self.init(f"{prefix}.weight", w)
        return self.node("Conv", [x, wn], [f"{prefix}_out"], prefix, kernel_shape=[k, k],
                         strides=[stride, stride], pads=[pad, pad, pad, pad], dilations=[1, 1],
                         group=1)

    def bn(self, x, prefix, c, gamma_scale=1.0):
        r = self.rng
        gamma = (1.0 + 0.1 * r.standard_normal(c)) * gamma_scale
        beta = 0.05 * r.standard_normal(c)
        mean = 0.05 * r.standard_normal(c)
        var = 1.0 + 0.1 * np.abs(r.standard_normal(c))
        ins = [x, self.init(f"{prefix}.scale", gamma), self.init(f"{prefix}.bias", beta),
               self.init(f"{prefix}.mean", mean), self.init(f"{prefix}.var", var)]
        return self.node("BatchNormalization", ins, [f"{prefix}_out"], prefix, epsilon=1e-5,
                         momentum=0.9)

    def relu(self, x, name):
        return self.node("Relu", [x], [f"{name}_out"], name)


def build_resnet50(seed=0, gemm_scale=None, feat_mean=None, depths=(3, 4, 6, 3),
                   widths=(64, 128, 256, 512), stem=64, num_classes=1000, image=224):
    """Returns (ModelProto, features_output_name). Defaults give ResNet-50 v1.5; smaller
    depths/widths/image give tiny test variants (scripts/make_test_models.py).

    gemm_scale=None -> unit-variance Gemm weights. feat_mean (widths[-1]*4,) is folded into the
    Gemm bias (logits = scale * W (f - feat_mean) + bias): random-weight ResNets map every input
    to nearly the same feature direction (only ~5% of the feature energy varies across images), so
    centering makes the logits depend on the image, not just on the weights.
    """
    rng = np.random.default_rng(seed)
    b = Builder(rng)
    x = "data"
    x = b.conv(x, "conv1", 3, stem, 7, stride=2, pad=3)
    x = b.bn(x, "bn1", stem)
    x = b.relu(x, "relu1")
    x = b.node("MaxPool", [x], ["maxpool_out"], "maxpool", kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])
    cin = stem
    for si, (nblocks, width) in enumerate(zip(depths, widths)):
        cout = width * 4
        for bi in range(nblocks):
            p = f"layer{si + 1}.{bi}"
            stride = 2 if (bi == 0 and si > 0) else 1
            h = b.conv(x, f"{p}.conv1", cin, width, 1)
            h = b.bn(h, f"{p}.bn1", width)
            h = b.relu(h, f"{p}.relu1")
            h = b.conv(h, f"{p}.conv2", width, width, 3, stride=stride, pad=1)  # v1.5: stride here
            h = b.bn(h, f"{p}.bn2", width)
            h = b.relu(h, f"{p}.relu2")
            h = b.conv(h, f"{p}.conv3", width, cout, 1)
            h = b.bn(h, f"{p}.bn3", cout, gamma_scale=0.2)  # damp the branch: keeps O(1) depthwise
            if bi == 0:
                sc = b.conv(x, f"{p}.downsample.conv", cin, cout, 1, stride=stride)
                sc = b.bn(sc, f"{p}.downsample.bn", cout, gamma_scale=0.7)
            else:
                sc = x
            s = b.node("Add", [h, sc], [f"{p}.add_out"], f"{p}.add")
            x = b.relu(s, f"{p}.relu3")
            cin = cout
    x = b.node("GlobalAveragePool", [x], ["gap_out"], "gap")
    feats = b.node("Flatten", [x], ["flatten_out"], "flatten", axis=1)
    nfeat = cin
    w = rng.standard_normal((num_classes, nfeat), dtype=np.float32) / np.float32(np.sqrt(nfeat))
    bias = 0.01 * rng.standard_normal(num_classes)
    if feat_mean is not None:
        bias = bias - w.astype(np.float64) @ feat_mean
    if gemm_scale is not None:
        w = w * np.float32(gemm_scale)
        bias = bias * gemm_scale
    b.node("Gemm", [feats, b.init("fc.weight", w), b.init("fc.bias", bias)], ["logits"], "fc",
           alpha=1.0, beta=1.0, transB=1)

    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, image, image])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])
    graph = helper.make_graph(b.nodes, "resnet50_v1_5", [inp], [out], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="kiln-make_resnet50_sample",
                              producer_version=SCRIPT_VERSION)
    model.ir_version = 8
    model.doc_string = ("ResNet-50 v1.5 with seeded random weights (numpy seed 0), generated by "
                        "scripts/make_resnet50_sample.py for Kiln end-to-end tests.")
    return model, feats


def make_image(seed, size=224):
    """Smooth seeded random 'image', [1,3,size,size] float32, ImageNet-normalized."""
    r = np.random.default_rng(1000 + seed)
    coarse = r.random((3, 8, 8))
    # Bilinear-ish upsampling of coarse noise via separable interpolation.
    t = np.linspace(0, 7, size)
    i0 = np.floor(t).astype(int).clip(0, 6)
    f = (t - i0)[None, :]
    rows = coarse[:, i0, :] * (1 - f.T)[None] + coarse[:, i0 + 1, :] * f.T[None]   # [3,size,8]
    img = rows[:, :, i0] * (1 - f)[None] + rows[:, :, i0 + 1] * f[None]            # [3,size,size]
    yy, xx = np.mgrid[0:size, 0:size] / float(size)
    for c in range(3):
        fx, fy, ph = r.uniform(1, 12), r.uniform(1, 12), r.uniform(0, 2 * np.pi)
        img[c] += 0.25 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
    img += 0.03 * r.standard_normal(img.shape)
    img = (img - img.min()) / (img.max() - img.min())  # [0,1] like pixels/255
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((img - mean) / std)[None].astype(np.float32)


def session(model_bytes, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def calibrate_gemm(build_kwargs, calib, num_calib_only, target_std=TARGET_LOGIT_STD):
    """Runs build_resnet50(**build_kwargs) on ORT for the batch `calib` (whose first
    num_calib_only images are calibration-only, the rest test images) and returns
    (gemm_scale, feat_mean) giving centered logits with std ~target_std on the test images."""
    model, feats = build_resnet50(seed=0, **build_kwargs)
    model.graph.output.append(helper.make_tensor_value_info(feats, TensorProto.FLOAT, None))
    fc_w = next(t for t in model.graph.initializer if t.name == "fc.weight")
    fc_b = next(t for t in model.graph.initializer if t.name == "fc.bias")
    sess = session(model.SerializeToString(), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    (f,) = sess.run([feats], {"data": calib})
    del sess, model
    f = f.astype(np.float64)
    log(f"calibration: features mean {f.mean():.4g} std {f.std():.4g}; "
        f"across-image std {f.std(axis=0).mean():.4g}")
    feat_mean = f.mean(axis=0)
    # fc.weight/fc.bias of the calibration model are exactly the unscaled, uncentered ones.
    w = numpy_helper.to_array(fc_w).astype(np.float64)
    bias = numpy_helper.to_array(fc_b).astype(np.float64) - w @ feat_mean
    centered = f[num_calib_only:] @ w.T + bias
    gemm_scale = target_std / float(centered.std(axis=1).mean())
    log(f"gemm scale {gemm_scale:.4g}")
    return gemm_scale, feat_mean


def is_complete(root):
    need = [os.path.join(root, "model.onnx")]
    for i in range(NUM_SETS):
        d = os.path.join(root, f"test_data_set_{i}")
        need += [os.path.join(d, "input_0.pb"), os.path.join(d, "output_0.pb")]
    if not all(os.path.isfile(p) for p in need):
        return False
    try:
        with open(os.path.join(root, "STAMP")) as fh:
            return fh.read().strip() == SCRIPT_VERSION
    except OSError:
        return False


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    flags = {a for a in argv[1:] if a.startswith("--")}
    if len(args) != 1 or not flags <= {"--no-bench", "--force"}:
        sys.stderr.write("usage: make_resnet50_sample.py OUTDIR [--no-bench] [--force]\n")
        return 2
    root = os.path.join(args[0], "resnet50")
    if "--force" not in flags and is_complete(root):
        print("sample exists")
        return 0
    t_start = time.time()
    os.makedirs(root, exist_ok=True)
    stamp = os.path.join(root, "STAMP")
    if os.path.exists(stamp):
        os.remove(stamp)

    images = [make_image(i) for i in range(NUM_SETS)]
    calib = np.concatenate([make_image(100 + i) for i in range(NUM_CALIB)] + images, axis=0)

    # 1) Calibration: run the body once on a batch to measure features, then center+scale the Gemm.
    log(f"building calibration graph; running a batch of {calib.shape[0]} on ORT")
    gemm_scale, feat_mean = calibrate_gemm({}, calib, NUM_CALIB)

    # 2) Final model.
    model, _ = build_resnet50(seed=0, gemm_scale=gemm_scale, feat_mean=feat_mean)
    onnx.checker.check_model(model)
    model_path = os.path.join(root, "model.onnx")
    onnx.save(model, model_path + ".tmp")
    os.replace(model_path + ".tmp", model_path)
    nparams = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    log(f"wrote {model_path}: {len(model.graph.node)} nodes, {nparams / 1e6:.2f}M params, "
        f"{os.path.getsize(model_path) / 1e6:.1f} MB")

    # 3) Reference outputs from ONNX Runtime, optimizations disabled.
    model_bytes = model.SerializeToString()
    del model
    ref = session(model_bytes, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for i, img in enumerate(images):
        (logits,) = ref.run(["logits"], {"data": img})
        d = os.path.join(root, f"test_data_set_{i}")
        os.makedirs(d, exist_ok=True)
        onnx.save_tensor(numpy_helper.from_array(img, "data"), os.path.join(d, "input_0.pb"))
        onnx.save_tensor(numpy_helper.from_array(logits.astype(np.float32), "logits"),
                         os.path.join(d, "output_0.pb"))
        p = softmax(logits[0].astype(np.float64))
        top = int(p.argmax())
        log(f"set {i}: logits std {logits.std():.3f} min {logits.min():.2f} "
            f"max {logits.max():.2f}; "
            f"top-1 class {top} prob {p[top]:.4f} (uniform 0.001)")
        if not np.isfinite(logits).all() or p[top] < 0.02:
            sys.stderr.write(f"error: set {i} logits not discriminative/finite\n")
            return 1
    with open(stamp, "w") as fh:
        fh.write(SCRIPT_VERSION + "\n")
    log(f"done in {time.time() - t_start:.1f} s")

    if "--no-bench" not in flags:
        for name, level in [("ORT_DISABLE_ALL", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                            ("ORT_ENABLE_ALL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)]:
            s = ref if level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL else session(
                model_bytes, level)
            feed = {"data": images[0]}
            for _ in range(3):
                s.run(None, feed)
            ts = []
            for _ in range(10):
                t0 = time.perf_counter()
                s.run(None, feed)
                ts.append(time.perf_counter() - t0)
            log(f"ORT CPU batch 1 ({name}, {os.cpu_count()} cpus): median "
                f"{1e3 * float(np.median(ts)):.1f} ms, min {1e3 * min(ts):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
