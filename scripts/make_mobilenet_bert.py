#!/usr/bin/env python3
"""Generate MobileNetV2 (1.0, 224) and BERT-base encoder ONNX models with seeded random weights.

Usage: python3 scripts/make_mobilenet_bert.py OUTDIR [--no-bench] [--force]
                                              [--only=mobilenetv2|bert_base]

Writes (opset 17, ir_version 8, weights inline), each with one ORT reference data set:
  OUTDIR/mobilenetv2/model.onnx  input "data" float32 [N,3,224,224] -> "logits" float32 [N,1000]
                                 (Conv + separate BatchNormalization + Clip(0,6), depthwise convs,
                                 inverted residuals, GlobalAveragePool, Flatten, Gemm), ~14 MB
  OUTDIR/bert_base/model.onnx    inputs int64 "input_ids", "attention_mask" [1,128] ->
                                 "last_hidden_state" float32 [1,128,768]; 12 layers, hidden 768,
                                 12 heads, FFN 3072, Erf-form GELU, LayerNormalization, ~440 MB
  OUTDIR/<model>/test_data_set_0/{input_K.pb,output_0.pb}  (ORT CPU, ORT_DISABLE_ALL)
  OUTDIR/<model>/STAMP

Built with onnx.helper only (no torch); numpy seeded RNG; meant for CPU benchmarks. Idempotent
via the STAMP file ("<model> exists"). Needs pip numpy, onnx, onnxruntime.
"""

import os
import sys
import time

SCRIPT_VERSION = "mobilenet-bert-v1"

try:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - environment check
    sys.stderr.write(
        "error: make_mobilenet_bert.py needs the pip packages numpy, onnx and onnxruntime "
        f"({e}). Install them with: pip install numpy onnx onnxruntime\n")
    sys.exit(2)


def log(msg):
    print(f"[mobilenet-bert] {msg}", flush=True)


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.n = 0

    def init(self, name, arr, dtype=np.float32):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=dtype), name))
        return name

    def node(self, op, inputs, name, nout=1, **attrs):
        outs = [f"{name}_out"] if nout == 1 else [f"{name}_out{i}" for i in range(nout)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if nout == 1 else outs

    def normal(self, shape, std):
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


# ----------------------------------------------------------------------------- MobileNetV2


MBV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))  # (expand t, channels c, repeats n, stride s)


def build_mobilenetv2(seed=1, cfg=MBV2_CFG, stem=32, last=1280, num_classes=1000, image=224):
    b = Builder(seed)
    b.init("relu6_min", np.array(0.0))
    b.init("relu6_max", np.array(6.0))

    def conv_bn(x, p, cin, cout, k, stride=1, group=1, act=True, gamma=1.0):
        fan_in = (cin // group) * k * k
        w = b.init(f"{p}.weight", b.normal((cout, cin // group, k, k), np.sqrt(2.0 / fan_in)))
        pad = k // 2
        y = b.node("Conv", [x, w], f"{p}.conv", kernel_shape=[k, k], strides=[stride, stride],
                   pads=[pad] * 4, group=group)
        r = b.rng
        ins = [y, b.init(f"{p}.bn.scale", (1.0 + 0.1 * r.standard_normal(cout)) * gamma),
               b.init(f"{p}.bn.bias", 0.05 * r.standard_normal(cout)),
               b.init(f"{p}.bn.mean", 0.05 * r.standard_normal(cout)),
               b.init(f"{p}.bn.var", 1.0 + 0.1 * np.abs(r.standard_normal(cout)))]
        y = b.node("BatchNormalization", ins, f"{p}.bn", epsilon=1e-5)
        if act:
            y = b.node("Clip", [y, "relu6_min", "relu6_max"], f"{p}.relu6")
        return y

    x = conv_bn("data", "features.0", 3, stem, 3, stride=2)
    cin = stem
    idx = 1
    for t, c, n, s in cfg:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}"
            hidden = cin * t
            h = x
            if t != 1:
                h = conv_bn(h, f"{p}.expand", cin, hidden, 1)
            h = conv_bn(h, f"{p}.dw", hidden, hidden, 3, stride=stride, group=hidden)
            use_res = stride == 1 and cin == c
            h = conv_bn(h, f"{p}.project", hidden, c, 1, act=False, gamma=0.3 if use_res else 1.0)
            if use_res:
                h = b.node("Add", [h, x], f"{p}.add")
            x = h
            cin = c
            idx += 1
    x = conv_bn(x, f"features.{idx}", cin, last, 1)
    x = b.node("GlobalAveragePool", [x], "gap")
    x = b.node("Flatten", [x], "flatten", axis=1)
    w = b.init("classifier.weight", b.normal((num_classes, last), 1.0 / np.sqrt(last)))
    bias = b.init("classifier.bias", b.normal((num_classes,), 0.01))
    b.nodes.append(helper.make_node("Gemm", [x, w, bias], ["logits"], name="classifier", transB=1))
    graph = helper.make_graph(
        b.nodes, "mobilenetv2_1.0_224",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        initializer=b.inits)
    return graph


def mobilenet_inputs(image=224):
    r = np.random.default_rng(2000)
    return {"data": r.standard_normal((1, 3, image, image), dtype=np.float32)}


# ----------------------------------------------------------------------------- BERT-base

VOCAB, HIDDEN, LAYERS, HEADS, FFN, SEQ, MAXPOS = 30522, 768, 12, 12, 3072, 128, 512


def build_bert(seed=2, vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, heads=HEADS, ffn=FFN, seq=SEQ,
               maxpos=MAXPOS):
    VOCAB, HIDDEN, LAYERS, HEADS, FFN, SEQ, MAXPOS = vocab, hidden, layers, heads, ffn, seq, maxpos
    b = Builder(seed)
    std = 0.02
    hd = HIDDEN // HEADS

    def ln(x, p):
        return b.node("LayerNormalization",
                      [x, b.init(f"{p}.weight", 1.0 + 0.02 * b.rng.standard_normal(HIDDEN)),
                       b.init(f"{p}.bias", 0.02 * b.rng.standard_normal(HIDDEN))], p, axis=-1,
                      epsilon=1e-12)

    def linear(x, p, din, dout):
        y = b.node("MatMul", [x, b.init(f"{p}.weight", b.normal((din, dout), std))], f"{p}.matmul")
        return b.node("Add", [y, b.init(f"{p}.bias", b.normal((dout,), std))], f"{p}.add")

    # Embeddings.
    we = b.node("Gather", [b.init("embeddings.word", b.normal((VOCAB, HIDDEN), std)), "input_ids"],
                "embeddings.word_gather", axis=0)
    pos_ids = b.init("embeddings.position_ids", np.arange(SEQ)[None], dtype=np.int64)
    pe = b.node("Gather", [b.init("embeddings.position", b.normal((MAXPOS, HIDDEN), std)), pos_ids],
                "embeddings.position_gather", axis=0)
    tt_ids = b.init("embeddings.token_type_ids", np.zeros((1, SEQ)), dtype=np.int64)
    te = b.node("Gather", [b.init("embeddings.token_type", b.normal((2, HIDDEN), std)), tt_ids],
                "embeddings.token_type_gather", axis=0)
    x = b.node("Add", [we, pe], "embeddings.add0")
    x = b.node("Add", [x, te], "embeddings.add1")
    x = ln(x, "embeddings.LayerNorm")

    # Extended attention mask: (1 - mask) * -10000, shape [1,1,1,SEQ].
    m = b.node("Cast", ["attention_mask"], "mask.cast", to=TensorProto.FLOAT)
    m = b.node("Sub", [b.init("one", np.array(1.0)), m], "mask.sub")
    m = b.node("Mul", [m, b.init("neg_big", np.array(-10000.0))], "mask.mul")
    mask = b.node("Unsqueeze", [m, b.init("mask_axes", np.array([1, 2]), np.int64)],
                  "mask.unsqueeze")

    split_shape = b.init("split_heads_shape", np.array([0, 0, HEADS, hd]), np.int64)
    merge_shape = b.init("merge_heads_shape", np.array([0, 0, HIDDEN]), np.int64)
    scale = b.init("attn_scale", np.array(1.0 / np.sqrt(hd)))
    sqrt2 = b.init("sqrt2", np.array(np.sqrt(2.0)))
    half = b.init("half", np.array(0.5))

    for l in range(LAYERS):
        p = f"encoder.layer.{l}"
        heads = {}
        for n, perm in [("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])]:
            h = linear(x, f"{p}.attention.self.{n}", HIDDEN, HIDDEN)
            h = b.node("Reshape", [h, split_shape], f"{p}.attention.self.{n}.reshape")
            heads[n] = b.node("Transpose", [h], f"{p}.attention.self.{n}.transpose", perm=perm)
        s = b.node("MatMul", [heads["query"], heads["key"]], f"{p}.attention.self.scores")
        s = b.node("Mul", [s, scale], f"{p}.attention.self.scale")
        s = b.node("Add", [s, mask], f"{p}.attention.self.mask")
        s = b.node("Softmax", [s], f"{p}.attention.self.softmax", axis=-1)
        c = b.node("MatMul", [s, heads["value"]], f"{p}.attention.self.context")
        c = b.node("Transpose", [c], f"{p}.attention.self.context.transpose", perm=[0, 2, 1, 3])
        c = b.node("Reshape", [c, merge_shape], f"{p}.attention.self.context.reshape")
        a = linear(c, f"{p}.attention.output.dense", HIDDEN, HIDDEN)
        a = b.node("Add", [a, x], f"{p}.attention.output.residual")
        x = ln(a, f"{p}.attention.output.LayerNorm")
        h = linear(x, f"{p}.intermediate.dense", HIDDEN, FFN)
        # GELU, Erf form: 0.5 * h * (1 + erf(h / sqrt(2))).
        g = b.node("Div", [h, sqrt2], f"{p}.intermediate.gelu.div")
        g = b.node("Erf", [g], f"{p}.intermediate.gelu.erf")
        g = b.node("Add", [g, "one"], f"{p}.intermediate.gelu.add")
        g = b.node("Mul", [h, g], f"{p}.intermediate.gelu.mul")
        g = b.node("Mul", [g, half], f"{p}.intermediate.gelu.half")
        o = linear(g, f"{p}.output.dense", FFN, HIDDEN)
        o = b.node("Add", [o, x], f"{p}.output.residual")
        x = ln(o, f"{p}.output.LayerNorm")
    b.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    graph = helper.make_graph(
        b.nodes, "bert_base_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, SEQ]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [1, SEQ, HIDDEN])],
        initializer=b.inits)
    return graph


def bert_inputs(vocab=VOCAB, seq=SEQ):
    r = np.random.default_rng(3000)
    valid = seq * 25 // 32  # 100 of 128: the padded tail exercises the mask path
    ids = r.integers(min(1000, vocab // 2), vocab, size=(1, seq), dtype=np.int64)
    ids[0, 0] = min(101, vocab - 1)  # [CLS]
    ids[0, valid - 1] = min(102, vocab - 1)  # [SEP]
    ids[0, valid:] = 0
    mask = np.ones((1, seq), dtype=np.int64)
    mask[0, valid:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- driver

MODELS = {"mobilenetv2": (build_mobilenetv2, mobilenet_inputs),
          "bert_base": (build_bert, bert_inputs)}


def is_complete(root, nin):
    d = os.path.join(root, "test_data_set_0")
    need = [os.path.join(root, "model.onnx"), os.path.join(d, "output_0.pb")]
    need += [os.path.join(d, f"input_{k}.pb") for k in range(nin)]
    if not all(os.path.isfile(p) for p in need):
        return False
    try:
        with open(os.path.join(root, "STAMP")) as fh:
            return fh.read().strip() == SCRIPT_VERSION
    except OSError:
        return False


def make_one(outdir, name, bench, force):
    build, make_inputs = MODELS[name]
    root = os.path.join(outdir, name)
    feeds = make_inputs()
    if not force and is_complete(root, len(feeds)):
        print(f"{name} exists")
        return 0
    t0 = time.time()
    os.makedirs(os.path.join(root, "test_data_set_0"), exist_ok=True)
    stamp = os.path.join(root, "STAMP")
    if os.path.exists(stamp):
        os.remove(stamp)
    log(f"{name}: building graph")
    graph = build()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="kiln-make_mobilenet_bert",
                              producer_version=SCRIPT_VERSION)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = os.path.join(root, "model.onnx")
    onnx.save(model, path + ".tmp")
    os.replace(path + ".tmp", path)
    nparams = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    log(f"{name}: wrote {path}: {len(model.graph.node)} nodes, {nparams / 1e6:.2f}M params, "
        f"{os.path.getsize(path) / 1e6:.1f} MB")
    mbytes = model.SerializeToString()
    out_name = model.graph.output[0].name
    del model
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(mbytes, so, providers=["CPUExecutionProvider"])
    (out,) = sess.run([out_name], feeds)
    d = os.path.join(root, "test_data_set_0")
    for k, (iname, arr) in enumerate(feeds.items()):
        onnx.save_tensor(numpy_helper.from_array(arr, iname), os.path.join(d, f"input_{k}.pb"))
    onnx.save_tensor(numpy_helper.from_array(out, out_name), os.path.join(d, "output_0.pb"))
    log(f"{name}: output {out_name} {list(out.shape)} mean {out.mean():.4g} std {out.std():.4g} "
        f"finite {bool(np.isfinite(out).all())}")
    if not np.isfinite(out).all():
        sys.stderr.write(f"error: {name} reference output is not finite\n")
        return 1
    with open(stamp, "w") as fh:
        fh.write(SCRIPT_VERSION + "\n")
    log(f"{name}: done in {time.time() - t0:.1f} s")
    if bench:
        for lname, level in [("ORT_DISABLE_ALL", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                             ("ORT_ENABLE_ALL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)]:
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            s = ort.InferenceSession(mbytes, so, providers=["CPUExecutionProvider"])
            for _ in range(3):
                s.run(None, feeds)
            ts = []
            for _ in range(10):
                t1 = time.perf_counter()
                s.run(None, feeds)
                ts.append(time.perf_counter() - t1)
            log(f"{name}: ORT CPU batch 1 ({lname}, {os.cpu_count()} cpus): median "
                f"{1e3 * float(np.median(ts)):.1f} ms, min {1e3 * min(ts):.1f} ms")
    return 0


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    flags = [a for a in argv[1:] if a.startswith("--")]
    only = [f.split("=", 1)[1] for f in flags if f.startswith("--only=")]
    bad = [f for f in flags if f not in ("--no-bench", "--force") and not f.startswith("--only=")]
    if len(args) != 1 or bad or any(o not in MODELS for o in only):
        sys.stderr.write("usage: make_mobilenet_bert.py OUTDIR [--no-bench] [--force] "
                         "[--only=mobilenetv2|bert_base]\n")
        return 2
    rc = 0
    for name in (only or list(MODELS)):
        rc |= make_one(args[0], name, "--no-bench" not in flags, "--force" in flags)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
