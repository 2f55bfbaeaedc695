#!/usr/bin/env python3
"""Generate tiny end-to-end test models (< 200 KB each) with ONNX Runtime reference outputs.

Usage: python3 scripts/make_test_models.py OUTDIR [--force]

Same architectures/builders as scripts/make_resnet50_sample.py and scripts/make_mobilenet_bert.py,
scaled down so a test can generate and run them in seconds (nothing is committed; run this at
test time, e.g. into the build directory):
  OUTDIR/tiny_resnet/       ResNet v1.5 bottlenecks [1,2,1,1], widths 4/8/8/16, stem 8, 32x32
                            input "data" [N,3,32,32] -> "logits" [N,10]; separate BN nodes;
                            test_data_set_{0,1} batch 1, test_data_set_2 batch 2 (dynamic N)
  OUTDIR/tiny_mobilenetv2/  MobileNetV2-style (Clip relu6, depthwise, inverted residuals), 32x32
                            input "data" [N,3,32,32] -> "logits" [N,10]; test_data_set_0
  OUTDIR/tiny_bert/         BERT encoder, 2 layers, hidden 32, 4 heads, ffn 64, seq 16, vocab 100;
                            int64 "input_ids", "attention_mask" [1,16] -> "last_hidden_state"
                            [1,16,32]; Erf GELU, LayerNormalization; test_data_set_0
Each directory has model.onnx (opset 17, ir_version 8), test_data_set_K/{input_J.pb,output_0.pb}
(ORT CPU, ORT_DISABLE_ALL) and a STAMP; reruns with a matching STAMP print "<name> exists".
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_resnet50_sample as rs  # noqa: E402  (exits with a clear message if deps are missing)
import make_mobilenet_bert as mb  # noqa: E402

np, onnx, helper, numpy_helper, ort = rs.np, rs.onnx, rs.helper, rs.numpy_helper, rs.ort

SCRIPT_VERSION = "test-models-v1"

TINY_RESNET = dict(depths=(1, 2, 1, 1), widths=(4, 8, 8, 16), stem=8, num_classes=10, image=32)
TINY_MBV2 = dict(cfg=((1, 8, 1, 1), (6, 8, 2, 2), (6, 16, 2, 2)), stem=8, last=32,
                 num_classes=10, image=32)
TINY_BERT = dict(vocab=100, hidden=32, layers=2, heads=4, ffn=64, seq=16, maxpos=32)


def log(msg):
    print(f"[test-models] {msg}", flush=True)


def finish_model(graph_or_model, producer):
    if isinstance(graph_or_model, onnx.ModelProto):
        model = graph_or_model
    else:
        model = helper.make_model(graph_or_model, opset_imports=[helper.make_opsetid("", 17)])
    model.producer_name = producer
    model.producer_version = SCRIPT_VERSION
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_resnet():
    images = [rs.make_image(i, size=32) for i in range(2)]
    batch2 = np.concatenate([rs.make_image(10, size=32), rs.make_image(11, size=32)], axis=0)
    calib = np.concatenate([rs.make_image(100 + i, size=32) for i in range(8)] + images, axis=0)
    scale, mean = rs.calibrate_gemm(TINY_RESNET, calib, 8)
    model, _ = rs.build_resnet50(seed=0, gemm_scale=scale, feat_mean=mean, **TINY_RESNET)
    sets = [{"data": images[0]}, {"data": images[1]}, {"data": batch2}]
    return finish_model(model, "kiln-make_test_models"), sets


def tiny_mobilenetv2():
    graph = mb.build_mobilenetv2(seed=1, **TINY_MBV2)
    return finish_model(graph, "kiln-make_test_models"), [mb.mobilenet_inputs(image=32)]


def tiny_bert():
    graph = mb.build_bert(seed=2, **TINY_BERT)
    feeds = mb.bert_inputs(vocab=TINY_BERT["vocab"], seq=TINY_BERT["seq"])
    return finish_model(graph, "kiln-make_test_models"), [feeds]


# name -> (maker, number of input_K.pb files in each test_data_set_K)
MODELS = {"tiny_resnet": (tiny_resnet, [1, 1, 1]), "tiny_mobilenetv2": (tiny_mobilenetv2, [1]),
          "tiny_bert": (tiny_bert, [2])}


def is_complete(root, inputs_per_set):
    need = [os.path.join(root, "model.onnx")]
    for k, nin in enumerate(inputs_per_set):
        d = os.path.join(root, f"test_data_set_{k}")
        need += [os.path.join(d, "output_0.pb")] + [
            os.path.join(d, f"input_{j}.pb") for j in range(nin)]
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
    if len(args) != 1 or not flags <= {"--force"}:
        sys.stderr.write("usage: make_test_models.py OUTDIR [--force]\n")
        return 2
    for name, (make, counts) in MODELS.items():
        root = os.path.join(args[0], name)
        if "--force" not in flags and is_complete(root, counts):
            print(f"{name} exists")
            continue
        t0 = time.time()
        os.makedirs(root, exist_ok=True)
        stamp = os.path.join(root, "STAMP")
        if os.path.exists(stamp):
            os.remove(stamp)
        model, sets = make()
        path = os.path.join(root, "model.onnx")
        onnx.save(model, path)
        out_name = model.graph.output[0].name
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        for k, feeds in enumerate(sets):
            d = os.path.join(root, f"test_data_set_{k}")
            os.makedirs(d, exist_ok=True)
            (out,) = sess.run([out_name], feeds)
            if not np.isfinite(out).all():
                sys.stderr.write(f"error: {name} set {k}: reference output not finite\n")
                return 1
            for j, (iname, arr) in enumerate(feeds.items()):
                onnx.save_tensor(numpy_helper.from_array(arr, iname),
                                 os.path.join(d, f"input_{j}.pb"))
            onnx.save_tensor(numpy_helper.from_array(out, out_name),
                             os.path.join(d, "output_0.pb"))
            extra = ""
            if out_name == "logits":
                e = np.exp(out - out.max(axis=1, keepdims=True))
                p = e / e.sum(axis=1, keepdims=True)
                extra = f"; top-1 {p.argmax(axis=1).tolist()} prob {np.round(p.max(axis=1), 3)}"
            log(f"{name} set {k}: {out_name} {list(out.shape)} std {out.std():.3f}{extra}")
        with open(stamp, "w") as fh:
            fh.write(SCRIPT_VERSION + "\n")
        log(f"{name}: {len(model.graph.node)} nodes, {os.path.getsize(path) / 1e3:.1f} KB, "
            f"{time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
