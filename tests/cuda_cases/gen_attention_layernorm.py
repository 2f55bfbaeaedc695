# Extra conformance cases (ONNX backend-test layout) for the CUDA fast paths the ONNX suite does
# not reach: Attention in fp16/bf16 with head sizes 32/64/128 (cuDNN SDPA and Kiln's mma.sync
# kernel), and the vectorized LayerNormalization / RMSNormalization kernel. Expected outputs
# are computed here with numpy in double precision (independent of Kiln), following the ONNX
# semantics (Attention rounds the probabilities to the element type before P*V, as the
# reference implementation does). Written to DIR/node; run (scripts/gpu_check.sh cases):
#   python3 tests/cuda_cases/gen_attention_layernorm.py DIR
#   kiln_conformance --root DIR --folders node --device cuda -v
import os, shutil, sys
import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto
import ml_dtypes

ROOT = os.path.join(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kiln-cuda-cases", "node")
rng = np.random.default_rng(1234)
BF16 = ml_dtypes.bfloat16
DT = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT, BF16: TensorProto.BFLOAT16,
      np.bool_: TensorProto.BOOL}

def tp(a):
    if a.dtype == BF16:
        t = helper.make_tensor("x", TensorProto.BFLOAT16, a.shape, a.view(np.uint16).flatten().tolist(), raw=False)
        t = onnx.TensorProto(); t.data_type = TensorProto.BFLOAT16; t.dims.extend(a.shape)
        t.raw_data = a.view(np.uint16).tobytes()
        return t
    return numpy_helper.from_array(a)

def save(name, node, inputs, outputs, opset, inits=()):
    d = os.path.join(ROOT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(d, "test_data_set_0"))
    vi = lambda n, a: helper.make_tensor_value_info(n, DT[a.dtype.type], a.shape)
    nodes = node if isinstance(node, list) else [node]
    init = []
    for n, a in inits:
        t = tp(a); t.name = n; init.append(t)
    g = helper.make_graph(nodes, name, [vi(n, a) for n, a in inputs], [vi(n, a) for n, a in outputs],
                          initializer=init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 11
    onnx.save(m, os.path.join(d, "model.onnx"))
    for i, (n, a) in enumerate(inputs):
        t = tp(a); t.name = n
        open(os.path.join(d, "test_data_set_0", f"input_{i}.pb"), "wb").write(t.SerializeToString())
    for i, (n, a) in enumerate(outputs):
        t = tp(a); t.name = n
        open(os.path.join(d, "test_data_set_0", f"output_{i}.pb"), "wb").write(t.SerializeToString())

def rnd(shape, dt, s=1.0):
    return (rng.standard_normal(shape) * s).astype(np.float32).astype(dt)

# ---------------------------------------------------------------- Attention
def attn_ref(Q, K, V, mask, Hq, Hkv, causal, softcap, dt, scale=None):
    # Q [B,Hq,S,D], K/V [B,Hkv,T,D] (4-D views); mask broadcastable to [B,Hq,S,T] (float or bool)
    B, _, S, D = Q.shape
    T = K.shape[2]
    sc = scale if scale is not None else 1 / np.sqrt(D)
    s = float(np.asarray(np.sqrt(sc), np.float32).astype(dt).astype(np.float64))  # sqrt(scale) rounded
    sc = s * s
    rep = Hq // Hkv
    Kx = np.repeat(K.astype(np.float64), rep, 1); Vx = np.repeat(V.astype(np.float64), rep, 1)
    raw = Q.astype(np.float64) @ Kx.transpose(0, 1, 3, 2)
    raw = raw * sc
    l = softcap * np.tanh(raw / softcap) if softcap > 0 else raw
    bias = np.zeros((B, Hq, S, T))
    if mask is not None:
        m = np.where(mask, 0.0, -np.inf) if mask.dtype == np.bool_ else mask.astype(np.float64)
        mm = np.full(m.shape[:-1] + (T,), -np.inf); mm[..., :m.shape[-1]] = m
        bias = bias + np.broadcast_to(mm, bias.shape)
    if causal:
        bias = bias + np.where(np.arange(T)[None, :] > np.arange(S)[:, None], -np.inf, 0.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        l = l + bias
        anyk = np.any(~np.isneginf(bias), -1, keepdims=True)
        mx = l.max(-1, keepdims=True); mx = np.where(np.isneginf(mx), 0, mx)
        e = np.exp(l - mx); ssum = e.sum(-1, keepdims=True); ssum = np.where(ssum == 0, 1, ssum)
        p = np.where(anyk, e / ssum, 0.0)
    p = p.astype(np.float32).astype(dt).astype(np.float64)
    return (p @ Vx).astype(np.float32).astype(dt)

def attn_case(name, B, Hq, Hkv, S, T, D, dt=np.float16, layout=4, mask=None, causal=0, softcap=0.0,
              scale=None):
    Q = rnd((B, Hq, S, D), dt); K = rnd((B, Hkv, T, D), dt)
    # V around 1: outputs of magnitude ~1, so the relative tolerance (1e-3) covers the single-ulp
    # flips of fp16 probabilities that float vs double softmax math causes (~1e-5 absolute).
    V = (rnd((B, Hkv, T, D), np.float32, 0.5) + 1.0).astype(dt)
    Y = attn_ref(Q, K, V, mask, Hq, Hkv, causal, softcap, dt, scale)
    attrs = {}
    if causal: attrs["is_causal"] = 1
    if softcap: attrs["softcap"] = softcap
    if scale is not None: attrs["scale"] = scale
    if layout == 3:
        to3 = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))
        Q, K, V, Y = to3(Q), to3(K), to3(V), to3(Y)
        attrs["q_num_heads"] = Hq; attrs["kv_num_heads"] = Hkv
    ins = [("Q", Q), ("K", K), ("V", V)] + ([("attn_mask", mask)] if mask is not None else [])
    node = helper.make_node("Attention", [n for n, _ in ins], ["Y"], **attrs)
    save("test_ln_" + name, node, ins, [("Y", Y)], 23)

pad = lambda B, T, valid: np.where(np.arange(T)[None, :] < np.array(valid)[:, None], 0.0, -10000.0)
# BERT-like: 3-D, additive fp16 mask [B,1,1,T] with padding (column bias, 1 warp per CTA).
attn_case("attn_bert_b2", 2, 12, 12, 128, 128, 64, layout=3,
          mask=pad(2, 128, [128, 77]).reshape(2, 1, 1, 128).astype(np.float16))
# Enough CTAs for 4 warps per CTA (4*12*3 = 144 >= 132 SMs), float32 mask.
attn_case("attn_bert_b4_w4", 4, 12, 12, 192, 192, 64, layout=3,
          mask=pad(4, 192, [192, 100, 5, 150]).reshape(4, 1, 1, 192).astype(np.float32))
# Ragged S / T (padding keys and rows), head 32, no mask; scale attribute.
attn_case("attn_ragged_d32", 2, 3, 3, 77, 100, 32, scale=0.3)
# Causal (per-score bias), head 128, 3 * 1 CTAs.
attn_case("attn_causal_d128", 1, 3, 3, 96, 96, 128, causal=1)
# GQA + bool mask depending on the query row (per-score bias), some rows fully masked.
bm = rng.random((40, 200)) > 0.3; bm[3, :] = False; bm[17, :] = False
attn_case("attn_gqa_boolmask", 2, 8, 2, 40, 200, 64, mask=bm)
# Column mask with one batch fully masked (-inf): its output rows are 0; short mask (T padded).
fm = np.zeros((2, 1, 1, 50), np.float32); fm[1] = -np.inf; fm[0, 0, 0, 7] = -np.inf
attn_case("attn_fullmask_col", 2, 2, 2, 33, 64, 64, mask=fm.astype(np.float16))
# Softcap, bf16.
attn_case("attn_softcap_bf16", 2, 4, 4, 70, 130, 64, dt=BF16, softcap=5.0)
# 512 keys (largest), head 64; head 128 with 384 keys (> 48 KB shared memory).
attn_case("attn_t512_d64", 1, 2, 2, 64, 512, 64, mask=rnd((1, 2, 1, 512), np.float16))
attn_case("attn_t384_d128", 1, 2, 2, 50, 384, 128)
# 512 keys with head 128 (does not fit: the wmma kernel).
attn_case("attn_t512_d128_wmma", 1, 2, 2, 50, 512, 128)
# Masks cuDNN reads in place as its bias (I/O dtype, every key, 16-byte rows): a per-score
# [B,H,S,T] fp16 mask, and a bf16 [B,1,1,T] padding mask read with stride 0 over the queries.
attn_case("attn_fullbias_fp16", 2, 4, 4, 40, 72, 64, mask=rnd((2, 4, 40, 72), np.float16))
attn_case("attn_padmask_bf16", 2, 4, 4, 64, 96, 64, dt=BF16, layout=3,
          mask=pad(2, 96, [96, 30]).reshape(2, 1, 1, 96).astype(BF16))

# ---------------------------------------------------------------- MatMul + bias + Gelu
# Kiln fuses these into kiln.FusedMatMul; in float16 / bfloat16 the CUDA backend runs the Gelu as
# cuBLASLt's GELU_BIAS epilogue (tanh form, |error| <= 4.8e-4 against the exact erf form), so the
# harness compares these cases with atol 2e-3, and bf16 with rtol 2e-2 (the fused kernel rounds
# once where the graph rounds three times; tests/conformance: kTolerance); the reference here is
# the exact erf Gelu in double precision.
from math import erf
def gemm_gelu_case(name, M, K, N, dt):
    X = rnd((1, M, K), dt); W = rnd((K, N), dt, 1.0 / np.sqrt(K)); b = rnd((N,), dt, 0.5)
    # Each op's output rounded to the element type, as the unfused ONNX graph does.
    r = lambda v: v.astype(np.float32).astype(dt).astype(np.float64)
    y = r(r(X.astype(np.float64) @ W.astype(np.float64)) + b.astype(np.float64))
    y = 0.5 * y * (1.0 + np.vectorize(erf)(y / np.sqrt(2.0)))
    nodes = [helper.make_node("MatMul", ["X", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["xb"]),
             helper.make_node("Gelu", ["xb"], ["Y"])]
    save("test_ln_" + name, nodes, [("X", X)], [("Y", y.astype(np.float32).astype(dt))], 20,
         inits=[("W", W), ("b", b)])

gemm_gelu_case("gemm_gelu_fp16", 128, 768, 3072, np.float16)
gemm_gelu_case("gemm_gelu_bf16", 64, 256, 512, BF16)

# ---------------------------------------------------------------- LayerNormalization
def ln_ref(X, S, Bb, axis, eps, rms=False):
    x = X.astype(np.float32).astype(np.float64)
    ax = tuple(range(axis % X.ndim, X.ndim))
    mu = 0 if rms else x.mean(ax, keepdims=True)
    var = ((x - mu) ** 2).mean(ax, keepdims=True)
    inv = 1 / np.sqrt(var + eps)
    y = (x - mu) * inv
    if S is not None: y = y * S.astype(np.float32)
    if Bb is not None: y = y + Bb.astype(np.float32)
    return y, np.broadcast_to(mu, inv.shape), inv

def ln_case(name, shape, dt, axis=-1, bias=True, stats=False, eps=1e-5, rms=False, pshape=None):
    X = rnd(shape, dt, 2.0) + np.asarray(0.5, dt)
    ps = pshape or shape[axis % len(shape):]
    Sc = rnd(ps, dt); Bb = rnd(ps, dt) if bias and not rms else None
    y, mu, inv = ln_ref(X, Sc, Bb, axis, eps, rms)
    ins = [("X", X), ("Scale", Sc)] + ([("B", Bb)] if Bb is not None else [])
    outs = [("Y", y.astype(np.float32).astype(dt))]
    if stats:
        outs += [("Mean", mu.astype(np.float32)), ("InvStdDev", inv.astype(np.float32))]
    op = "RMSNormalization" if rms else "LayerNormalization"
    node = helper.make_node(op, [n for n, _ in ins], [n for n, _ in outs], axis=axis, epsilon=eps)
    save("test_ln_" + name, node, ins, outs, 23 if rms else 17)

ln_case("layernorm_bert_fp16", (2, 64, 768), np.float16)                     # warp per row
ln_case("layernorm_fp32_stats", (3, 5, 1000), np.float32, stats=True)        # block of 64
ln_case("layernorm_fp16_4096", (6, 4096), np.float16, bias=False)            # block of 128
ln_case("layernorm_fp16_32768", (3, 32768), np.float16)                      # block of 1024
ln_case("layernorm_axis2_fp32", (4, 2, 384), np.float32, axis=-2)            # block [2, 384]
ln_case("layernorm_bcast_scale", (4, 3, 256), np.float16, axis=-2, pshape=(1, 256))  # general path
ln_case("layernorm_odd_fp16", (5, 770), np.float16)                          # scalar warp path
ln_case("layernorm_bf16", (7, 1024), BF16, stats=True)
ln_case("rmsnorm_fp16", (2, 9, 1024), np.float16, rms=True)
print("written under", ROOT)
