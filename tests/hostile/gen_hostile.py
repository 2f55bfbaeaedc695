#!/usr/bin/env python3
"""Generates Kiln's hostile-input corpus into a folder and returns the list of cases.

Each case is a dict: name, category, args (the kiln command line after `kiln`), rc (allowed exit
codes), expect (regex that stderr must match; None: any one-line `error:` message), and
`plan_from` (build this model into a plan first, then mutate it). The large and systematic cases
(truncation at every field boundary, bit flips) are generated here rather than stored.

Only the `onnx` package's helpers are used to write valid base models; every malformed byte
stream is written by the small protobuf encoder below, so nothing here depends on onnx accepting
the input.
"""
import os
import random
import struct

import numpy as np
from onnx import TensorProto, helper, numpy_helper

# --- a tiny protobuf wire encoder / walker -------------------------------------------------

def varint(v):
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field, wt):
    return varint((field << 3) | wt)


def f_len(field, payload):
    return tag(field, 2) + varint(len(payload)) + payload


def f_var(field, v):
    return tag(field, 0) + varint(v)


def read_varint(b, p):
    v = s = 0
    while True:
        c = b[p]
        p += 1
        v |= (c & 0x7F) << s
        s += 7
        if not c & 0x80:
            return v, p


def fields(b, start=0, end=None):
    """Yields (field, wire type, field start, payload start, field end) for one message."""
    end = len(b) if end is None else end
    p = start
    while p < end:
        fs = p
        key, p = read_varint(b, p)
        wt = key & 7
        if wt == 0:
            _, p = read_varint(b, p)
            ps = p
        elif wt == 1:
            ps = p
            p += 8
        elif wt == 5:
            ps = p
            p += 4
        elif wt == 2:
            n, ps = read_varint(b, p)
            p = ps + n
        else:
            raise ValueError("unexpected wire type")
        yield key >> 3, wt, fs, ps, p


# Nested messages worth walking: ModelProto.graph(7) -> GraphProto.node(1), initializer(5),
# input(11), output(12); NodeProto.attribute(5); ValueInfo.type(2).
NESTED = {"model": {7: "graph", 8: "opset"}, "graph": {1: "node", 5: "tensor", 11: "vi", 12: "vi"},
          "node": {5: "attr"}, "vi": {2: "type"}, "type": {1: "ttype"}, "ttype": {2: "shape"},
          "shape": {1: "dim"}}


def boundaries(b, kind="model", start=0, end=None, out=None):
    """Every field start/end offset (and nested payload boundaries) in the message."""
    out = set() if out is None else out
    for f, wt, fs, ps, fe in fields(b, start, end):
        out.update((fs, ps, fe))
        sub = NESTED.get(kind, {}).get(f)
        if sub and wt == 2:
            boundaries(b, sub, ps, fe, out)
    return out


def len_fields(b, kind="model", start=0, end=None, path="model", out=None):
    """(path, field start, payload start, field end) of every LEN field, nested too."""
    out = [] if out is None else out
    for f, wt, fs, ps, fe in fields(b, start, end):
        if wt == 2:
            out.append(("%s.%d" % (path, f), fs, ps, fe))
            sub = NESTED.get(kind, {}).get(f)
            if sub:
                len_fields(b, sub, ps, fe, "%s.%d" % (path, f), out)
    return out


# --- valid base models (onnx helpers) --------------------------------------------------------

def base_model(opset=17):
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5, "W")
    nodes = [helper.make_node("Add", ["X", "W"], ["S"], name="add0"),
             helper.make_node("Relu", ["S"], ["Y"], name="relu0")]
    g = helper.make_graph(nodes, "hostile_base", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="hostile")
    m.ir_version = 8
    return m


def graph_model(nodes, inputs, outputs, inits=(), name="g"):
    g = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="hostile")
    m.ir_version = 8
    return m


def vi(name, dt=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dt, list(shape) if shape is not None else None)


# Raw TensorProto: dims, data_type, name, raw_data / external data.
def raw_tensor(name, dims, dt=1, raw=None, external=None, location=None):
    b = b"".join(f_var(1, d) for d in dims) + f_var(2, dt) + f_len(8, name.encode())
    if raw is not None:
        b += f_len(9, raw)
    if external is not None:
        for k, v in external:
            b += f_len(13, f_len(1, k.encode()) + f_len(2, v.encode()))
        b += f_var(14, 1)  # data_location = EXTERNAL
    return b


def model_with_initializer(tensor_bytes, in_shape=(2, 3)):
    """Base model bytes whose initializer W is replaced by `tensor_bytes`."""
    m = base_model()
    del m.graph.initializer[:]
    b = bytearray(m.SerializeToString())
    # Rebuild ModelProto with graph = old graph + initializer field.
    out = bytearray()
    for f, wt, fs, ps, fe in fields(b):
        if f == 7:
            gbytes = bytes(b[ps:fe]) + f_len(5, tensor_bytes)
            out += f_len(7, gbytes)
        else:
            out += b[fs:fe]
    return bytes(out)


# --- plans ------------------------------------------------------------------------------------

def kiln_hash(data):
    """kiln::hash_bytes (src/base/hash.h), to re-seal a plan after an edit."""
    M = (1 << 64) - 1
    h = 0xCBF29CE484222325
    n = len(data)
    i = 0
    while i + 8 <= n:
        (w,) = struct.unpack_from("<Q", data, i)
        h ^= w
        h = (h * 0x100000001B3) & M
        h ^= h >> 29
        i += 8
    while i < n:
        h ^= data[i]
        h = (h * 0x100000001B3) & M
        i += 1
    h ^= n
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & M
    h ^= h >> 33
    return h


def reseal(plan):
    p = bytearray(plan)
    struct.pack_into("<Q", p, 16, len(p) - 32)
    struct.pack_into("<Q", p, 24, kiln_hash(bytes(p[32:])))
    return bytes(p)


def plan_cases(plan, d):
    """Mutations of a valid plan (bytes). Returns [(name, bytes, expect regex)]; expect "ANY"
    marks re-sealed payload edits, which may land in weight bytes or names and leave a valid
    plan (exit 0 allowed, never a crash)."""
    out = []
    p = bytearray(plan)
    v = bytearray(p); struct.pack_into("<I", v, 8, 2)
    out.append(("plan_version_2", bytes(v), r"format version 2"))
    v = bytearray(p); struct.pack_into("<I", v, 8, 0)
    out.append(("plan_version_0", bytes(v), r"format version 0"))
    v = bytearray(p); v[40] ^= 0x01
    out.append(("plan_bad_checksum", bytes(v), r"checksum"))
    v = bytearray(p); v[-1] ^= 0x80
    out.append(("plan_bad_checksum_tail", bytes(v), r"checksum"))
    v = bytearray(p); v[0:8] = b"KILNPLAM"
    out.append(("plan_bad_magic", bytes(v), r"not a Kiln plan"))
    out.append(("plan_empty", b"", r"truncated"))
    out.append(("plan_header_only", bytes(p[:32]), r"truncated"))
    for cut in (7, 31, 33, 40, len(p) // 2, len(p) - 1):
        out.append(("plan_truncated_%d" % cut, bytes(p[:cut]), r"truncated"))
    out.append(("plan_padded", bytes(p) + b"\0" * 64, r"truncated or padded"))
    v = bytearray(p); struct.pack_into("<Q", v, 16, (1 << 64) - 1)
    out.append(("plan_payload_size_max", bytes(v), r"truncated"))
    # Payload edits, re-sealed so that the reader gets past the checksum.
    vlen = struct.unpack_from("<I", p, 32)[0]
    dev_off = 32 + 4 + vlen
    dlen = struct.unpack_from("<I", p, dev_off)[0]
    dev = bytes(p[dev_off + 4:dev_off + 4 + dlen])
    other = b"cpu:arm64:neon"[:dlen].ljust(dlen, b"x")
    v = bytearray(p); v[dev_off + 4:dev_off + 4 + dlen] = other
    out.append(("plan_other_device", reseal(v), r"device"))
    v = bytearray(p); v[36:36 + vlen] = b"9" * vlen
    out.append(("plan_other_kiln_version", reseal(v), r"built by Kiln"))
    v = bytearray(p); struct.pack_into("<I", v, dev_off, 0x7FFFFFFF)
    out.append(("plan_string_length_past_end", reseal(v), None))
    # Lengths past the end / absurd counts at every 4-byte position of the first 256 payload
    # bytes after the header fields, re-sealed.
    start = dev_off + 4 + dlen + 8 + 8 + 2 + 8
    for i, off in enumerate(range(start, min(len(p) - 4, start + 256), 4)):
        v = bytearray(p); struct.pack_into("<I", v, off, 0xFFFFFFF0)
        out.append(("plan_count_ffff_at_%d" % off, reseal(v), "ANY"))
    rng = random.Random(1234)
    for i in range(40):
        v = bytearray(p)
        for _ in range(1 + i % 4):
            k = rng.randrange(32 + 4, len(v))
            v[k] ^= 1 << rng.randrange(8)
        out.append(("plan_bitflip_resealed_%02d" % i, reseal(v), "ANY"))
    return out


# --- the corpus --------------------------------------------------------------------------------

def write(d, name, data):
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def cases(d):
    """Writes the files into `d` and returns the case list."""
    os.makedirs(d, exist_ok=True)
    C = []
    MM = ["--maxMemory", "256"]

    def onnx_case(name, data, expect=None, cat="onnx", cmd="build", rc=(1,)):
        path = write(d, name + ".onnx", data)
        if cmd == "build":
            args = ["build", "--onnx", path, "--saveEngine", os.path.join(d, name + ".plan")] + MM
        elif cmd == "run":
            args = ["run", "--onnx", path, os.path.join(d, "x_ok.pb")] + MM
        else:
            args = ["inspect", path]
        C.append(dict(name=name, category=cat, args=args, rc=rc, expect=expect))

    base = base_model().SerializeToString()
    write(d, "base.onnx", base)
    x_ok = numpy_helper.from_array(np.ones((2, 3), np.float32), "X").SerializeToString()
    write(d, "x_ok.pb", x_ok)

    # Truncation at every field boundary (nested), through `kiln inspect` (reader + import).
    # A cut between two top-level fields leaves a well-formed (if incomplete) message, so a
    # clean success is allowed there.
    top = {fe for _, _, _, _, fe in fields(base)}
    for cut in sorted(boundaries(base)):
        if 0 < cut < len(base):
            onnx_case("trunc_%04d" % cut, base[:cut], None, "truncation", "inspect",
                      rc=(0, 1) if cut in top else (1,))
    onnx_case("trunc_empty", b"", None, "truncation", "inspect")

    # Bit flips (deterministic); a flip may leave a valid model, so 0 is allowed too.
    rng = random.Random(42)
    for i in range(60):
        b = bytearray(base)
        for _ in range(1 + i % 3):
            k = rng.randrange(len(b))
            b[k] ^= 1 << rng.randrange(8)
        onnx_case("bitflip_%02d" % i, bytes(b), None, "bitflip", "build", rc=(0, 1))

    # Wrong wire types and lengths past the end, for every LEN field (nested).
    for path, fs, ps, fe in len_fields(base):
        key, kp = read_varint(base, fs)
        f = key >> 3
        for wt in (0, 1, 5, 3, 7):
            b = base[:fs] + tag(f, wt) + base[kp:]
            onnx_case("wiretype_%s_w%d" % (path.replace(".", "_"), wt), b, None, "wire type",
                      "inspect", rc=(0, 1) if wt in (0, 1, 5) else (1,))
        n, p2 = read_varint(base, kp)
        for big in (fe - ps + 1, 1 << 31, 1 << 62, (1 << 64) - 1):
            b = base[:kp] + varint(big) + base[p2:]
            onnx_case("lenpast_%s_%x" % (path.replace(".", "_"), big), b, None, "length past end",
                      "inspect")
    # A varint that never ends and an over-long varint.
    onnx_case("varint_unterminated", base + b"\x08" + b"\xff" * 12, None, "wire type", "inspect")
    onnx_case("varint_11_bytes", b"\x08" + b"\x80" * 10 + b"\x01" + base, None, "wire type", "inspect")

    # Huge / negative dims and byte sizes that overflow 64 bits, in initializers.
    huge = [("dims_2p62", [1 << 62], None), ("dims_2p62x4", [1 << 62, 4], None),
            ("dims_negative", [(1 << 64) - 1, 3], None), ("dims_negative_big", [2, (1 << 64) - (1 << 40)], None),
            ("bytes_overflow_64", [1 << 31, 1 << 31, 8], None), ("numel_overflow_64", [1 << 32, 1 << 32, 2], None),
            ("dims_2p40_no_data", [1 << 40], None), ("dims_mismatch_raw", [2, 3], b"\0" * 8)]
    for name, dims, raw in huge:
        onnx_case("init_" + name, model_with_initializer(raw_tensor("W", dims, 1, raw if raw is not None else b"")),
                  None, "dims")
    # Rank 100000 is legal (all ones broadcast away); it must not be slow or crash.
    onnx_case("init_rank_100000", model_with_initializer(raw_tensor("W", [1] * 100000, 1, b"\0" * 4)),
              None, "dims", rc=(0, 1))
    # Same in a graph input's declared shape (a clean refusal, or an engine that refuses inputs).
    for name, dim in (("in_dim_2p62", 1 << 62), ("in_dim_negative", -5)):
        m = graph_model([helper.make_node("Relu", ["X"], ["Y"])], [vi("X", shape=(dim, 3))],
                        [vi("Y", shape=None)])
        path = write(d, name + ".onnx", m.SerializeToString())
        C.append(dict(name=name, category="dims", rc=(1,), expect=None,
                      args=["run", "--onnx", path, os.path.join(d, "x_ok.pb")] + MM))
    # Typed-data initializers whose element count does not match the dims.
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2, 3], float_data=[1.0, 2.0])
    onnx_case("init_float_data_short", model_with_initializer(t.SerializeToString()), None, "dims")
    t = TensorProto(name="W", data_type=TensorProto.INT64, dims=[1 << 62], int64_data=[1, 2])
    onnx_case("init_int64_data_2p62", model_with_initializer(t.SerializeToString()), None, "dims")
    onnx_case("init_bad_dtype", model_with_initializer(raw_tensor("W", [2, 3], 999, b"\0" * 24)), None, "dims")

    # Graph structure.
    X, Y = vi("X"), vi("Y")
    Wt = numpy_helper.from_array(np.ones((2, 3), np.float32), "W")
    g = {
        "cycle": ([helper.make_node("Add", ["X", "B"], ["A"], name="n_a"),
                   helper.make_node("Relu", ["A"], ["B"], name="n_b"),
                   helper.make_node("Relu", ["B"], ["Y"], name="n_y")], [X], [Y], []),
        "self_loop": ([helper.make_node("Add", ["X", "Y"], ["Y"], name="n_self")], [X], [Y], []),
        "undefined_input": ([helper.make_node("Add", ["X", "nowhere"], ["Y"], name="n_undef")], [X], [Y], []),
        "missing_initializer": ([helper.make_node("Add", ["X", "W_missing"], ["Y"], name="n_w")], [X], [Y], []),
        "undefined_output": ([helper.make_node("Relu", ["X"], ["Z"], name="n_z")], [X], [Y], []),
        "duplicate_node_outputs": ([helper.make_node("Relu", ["X"], ["Y"], name="n1"),
                                    helper.make_node("Neg", ["X"], ["Y"], name="n2")], [X], [Y], []),
        "duplicate_inputs": ([helper.make_node("Relu", ["X"], ["Y"])], [X, vi("X")], [Y], []),
        "duplicate_initializers": ([helper.make_node("Add", ["X", "W"], ["Y"])], [X], [Y],
                                   [Wt, numpy_helper.from_array(np.zeros((2, 3), np.float32), "W")]),
        "output_is_input_overwritten": ([helper.make_node("Relu", ["W"], ["X"])], [X], [vi("X")], [Wt]),
        "unknown_op": ([helper.make_node("NoSuchOp", ["X"], ["Y"], name="n_unknown")], [X], [Y], []),
        "wrong_arity": ([helper.make_node("Add", ["X"], ["Y"], name="n_arity")], [X], [Y], []),
        "empty_graph_output": ([], [X], [Y], []),
    }
    for name, (nodes, ins, outs, inits) in g.items():
        m = graph_model(nodes, ins, outs, inits)
        onnx_case("graph_" + name, m.SerializeToString(), None, "graph", "run")

    # External data: `..`, absolute paths, missing files, offsets/lengths past the end.
    write(d, "weights.bin", b"\0" * 24)
    ext = [("ext_dotdot", [("location", "../../../../etc/passwd")], r"\.\."),
           ("ext_dotdot_inner", [("location", "sub/../../weights.bin")], r"\.\."),
           ("ext_absolute", [("location", "/etc/passwd")], r"absolute"),
           ("ext_missing_file", [("location", "no_such_weights.bin")], None),
           ("ext_offset_past_end", [("location", "weights.bin"), ("offset", "4096")], None),
           ("ext_length_past_end", [("location", "weights.bin"), ("length", "4096")], None),
           ("ext_offset_huge", [("location", "weights.bin"), ("offset", "18446744073709551615")], None),
           ("ext_length_negative", [("location", "weights.bin"), ("length", "-24")], None),
           ("ext_offset_garbage", [("location", "weights.bin"), ("offset", "12abc")], None),
           ("ext_no_location", [("offset", "0")], None),
           ("ext_dir_as_file", [("location", ".")], None)]
    for name, kv, expect in ext:
        onnx_case(name, model_with_initializer(raw_tensor("W", [2, 3], 1, None, kv)), expect, "external data")

    # Inputs with wrong dtype, shape or count.
    basep = os.path.join(d, "base.onnx")
    def in_case(name, files, expect=None, extra=()):
        C.append(dict(name=name, category="inputs", rc=(1, 2), expect=expect,
                      args=["run", "--onnx", basep] + files + list(extra) + MM))
    x_i64 = write(d, "x_int64.pb", numpy_helper.from_array(np.ones((2, 3), np.int64), "X").SerializeToString())
    x_shape = write(d, "x_shape.pb", numpy_helper.from_array(np.ones((3, 2), np.float32), "X").SerializeToString())
    x_rank = write(d, "x_rank.pb", numpy_helper.from_array(np.ones((2, 3, 1), np.float32), "X").SerializeToString())
    x_scalar = write(d, "x_scalar.pb", numpy_helper.from_array(np.float32(1), "X").SerializeToString())
    x_big = write(d, "x_dims_2p62.pb", raw_tensor("X", [1 << 62], 1, b""))
    x_bigover = write(d, "x_bytes_overflow.pb", raw_tensor("X", [1 << 31, 1 << 31, 8], 1, b""))
    x_trunc = write(d, "x_trunc.pb", x_ok[:len(x_ok) - 5])
    x_empty = write(d, "x_empty.pb", b"")
    np.save(os.path.join(d, "x_f64.npy"), np.ones((2, 3), np.float64))
    np.save(os.path.join(d, "x_shape.npy"), np.ones((6,), np.float32))
    npy = open(os.path.join(d, "x_f64.npy"), "rb").read()
    hdr_big = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }"
    hdr_ovf = b"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }"
    hdr_bad = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }"
    def npy_raw(h, body=b""):
        h = h + b" " * ((64 - (10 + len(h) + 1) % 64) % 64) + b"\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + body
    x_npy_big = write(d, "x_npy_2p62.npy", npy_raw(hdr_big))
    x_npy_ovf = write(d, "x_npy_overflow.npy", npy_raw(hdr_ovf))
    x_npy_neg = write(d, "x_npy_negative.npy", npy_raw(hdr_bad))
    x_npy_hlen = write(d, "x_npy_hlen.npy", b"\x93NUMPY\x01\x00\xff\xff{'descr'")
    x_npy_trunc = write(d, "x_npy_trunc.npy", npy[:len(npy) - 3])
    in_case("input_wrong_dtype", [x_i64], r"(?i)type|dtype|int64")
    in_case("input_wrong_shape", [x_shape], r"(?i)shape|dim")
    in_case("input_wrong_rank", [x_rank], r"(?i)rank|shape|dim")
    in_case("input_scalar", [x_scalar], r"(?i)rank|shape|dim")
    in_case("input_dims_2p62", [x_big])
    in_case("input_bytes_overflow", [x_bigover])
    in_case("input_truncated", [x_trunc])
    in_case("input_empty_file", [x_empty])
    in_case("input_npy_float64", [os.path.join(d, "x_f64.npy")], r"(?i)type|dtype|float64|double")
    in_case("input_npy_wrong_shape", [os.path.join(d, "x_shape.npy")], r"(?i)rank|shape|dim")
    in_case("input_npy_2p62", [x_npy_big])
    in_case("input_npy_dim_overflow", [x_npy_ovf])
    in_case("input_npy_negative_dim", [x_npy_neg])
    in_case("input_npy_header_past_end", [x_npy_hlen])
    in_case("input_npy_truncated", [x_npy_trunc])
    in_case("input_missing_file", [os.path.join(d, "no_such_input.pb")])
    in_case("input_none", [])
    in_case("input_too_many", ["--loadInputs", "X:" + os.path.join(d, "x_ok.pb"),
                               "--loadInputs", "Q:" + os.path.join(d, "x_ok.pb")])
    in_case("input_unknown_name", ["--loadInputs", "Q:" + os.path.join(d, "x_ok.pb")])
    # Kiln currently takes the last binding of a repeated name (noted in docs/reliability.md).
    C.append(dict(name="input_duplicate_name", category="inputs", rc=(0, 1, 2), expect=None,
                  args=["run", "--onnx", basep, "--loadInputs", "X:" + os.path.join(d, "x_ok.pb"),
                        "--loadInputs", "X:" + os.path.join(d, "x_ok.pb")] + MM))

    # Allocations past --maxMemory at run time: ConstantOfShape / Expand to 64 GiB.
    shp = helper.make_tensor_value_info("S", TensorProto.INT64, [2])
    m = graph_model([helper.make_node("ConstantOfShape", ["S"], ["Y"], name="cos")], [shp],
                    [vi("Y", shape=None)])
    path = write(d, "alloc_constantofshape.onnx", m.SerializeToString())
    s_big = write(d, "s_big.pb", numpy_helper.from_array(np.array([1 << 17, 1 << 17], np.int64), "S").SerializeToString())
    s_huge = write(d, "s_huge.pb", numpy_helper.from_array(np.array([1 << 40, 1 << 40], np.int64), "S").SerializeToString())
    s_neg = write(d, "s_neg.pb", numpy_helper.from_array(np.array([-1, 4], np.int64), "S").SerializeToString())
    for nm, f in (("alloc_64gib", s_big), ("alloc_overflow", s_huge), ("alloc_negative", s_neg)):
        C.append(dict(name=nm, category="allocation", rc=(1,), args=["run", "--onnx", path, f] + MM,
                      expect=r"(?i)memory|limit|overflow|negative|exceeds" if nm != "alloc_negative" else None))
    m = graph_model([helper.make_node("Expand", ["X", "S"], ["Y"], name="expand")],
                    [vi("X", shape=(1, 1)), shp], [vi("Y", shape=None)])
    path = write(d, "alloc_expand.onnx", m.SerializeToString())
    x11 = write(d, "x11.pb", numpy_helper.from_array(np.ones((1, 1), np.float32), "X").SerializeToString())
    C.append(dict(name="alloc_expand_64gib", category="allocation", rc=(1,), expect=r"(?i)memory|limit",
                  args=["run", "--onnx", path, "--loadInputs", "X:" + x11, "--loadInputs", "S:" + s_big] + MM))
    # A constant that would fold to 64 GiB at build time.
    cshape = numpy_helper.from_array(np.array([1 << 17, 1 << 17], np.int64), "S")
    m = graph_model([helper.make_node("ConstantOfShape", ["S"], ["C"], name="cos"),
                     helper.make_node("Add", ["X", "C"], ["Y"], name="add")],
                    [vi("X", shape=(1, 1))], [vi("Y", shape=None)], [cshape])
    path = write(d, "alloc_fold.onnx", m.SerializeToString())
    C.append(dict(name="alloc_fold_64gib", category="allocation", rc=(1,), expect=r"(?i)memory|limit",
                  args=["run", "--onnx", path, x11] + MM))

    # Plans (a valid plan is built from base.onnx by the runner first).
    C.append(dict(name="__make_plan", category="setup", rc=(0,), expect=None,
                  args=["build", "--onnx", basep, "--saveEngine", os.path.join(d, "base.plan")]))
    return C


def plan_case_list(d):
    plan = open(os.path.join(d, "base.plan"), "rb").read()
    C = []
    for name, data, expect in plan_cases(plan, d):
        path = write(d, name + ".plan", data)
        rc = (0, 1) if expect == "ANY" else (1,)
        expect = None if expect == "ANY" else expect
        C.append(dict(name=name, category="plan", rc=rc, expect=expect,
                      args=["run", "--loadEngine", path, os.path.join(d, "x_ok.pb"), "--maxMemory", "256"]))
    return C
