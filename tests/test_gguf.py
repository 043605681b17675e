"""GGUF (llama.cpp) loading: the embedded SmolLM2 against transformers, synthetic files per tensor type,
a tiny GGUF model against transformers' Llama, and the errors for damaged or unsupported files.

Synthetic files are written with `gguf.GGUFWriter` in llama.cpp's layout: shapes reversed on disk (the
writer does that), and the rows of `attn_q` / `attn_k` permuted by llama.cpp's `permute` (interleaved
RoPE pairs), which `GGUFSource` must undo.

The reference dequantizers below are written from llama.cpp's block structs (`ggml-common.h`) and
`dequantize_row_*` (`ggml-quants.c`), independently of `gguf.quants` (which `GGUFSource` uses); the
K-quant packers follow `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref`. Tensors are built on the
(rows, cols) numpy layout: each row is a run of whole blocks.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from transformers import LlamaConfig, LlamaForCausalLM

import loopus_jax
from loopus_jax import config as C
from loopus_jax.convert.gguf import GGUFSource
from loopus_jax.convert.hf import build_from_source

# --------------------------------------------------------------------------------------------------
# Writing synthetic GGUF files
# --------------------------------------------------------------------------------------------------

# GGUF per-layer tensor name -> HF name suffix (written here from llama.cpp's tensor naming, not
# imported from the library).
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` of q/k rows (HF half-split -> interleaved RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_index(rows: int, n_head: int) -> np.ndarray:
    """`idx` with llama_cpp_permute(w) == w[idx]; the HF layout of a GGUF tensor g is g[argsort(idx)]."""
    return llama_cpp_permute(np.arange(rows)[:, None], n_head)[:, 0]


def tensor_plan(cfg: dict, tied: bool = False) -> dict[str, tuple[str, tuple[int, int] | tuple[int], int | None]]:
    """GGUF name -> (HF name, HF shape, number of heads llama.cpp permutes its rows by, or None)."""
    d, v, ff, hd = cfg["hidden"], cfg["vocab"], cfg["ff"], cfg["head_dim"]
    h, kv = cfg["heads"], cfg["kv_heads"]
    plan = {
        "token_embd.weight": ("model.embed_tokens.weight", (v, d), None),
        "output_norm.weight": ("model.norm.weight", (d,), None),
    }
    if not tied:
        plan["output.weight"] = ("lm_head.weight", (v, d), None)
    per_layer = {
        "attn_norm.weight": ((d,), None),
        "ffn_norm.weight": ((d,), None),
        "attn_q.weight": ((h * hd, d), h),
        "attn_k.weight": ((kv * hd, d), kv),
        "attn_v.weight": ((kv * hd, d), None),
        "attn_output.weight": ((d, h * hd), None),
        "ffn_gate.weight": ((ff, d), None),
        "ffn_up.weight": ((ff, d), None),
        "ffn_down.weight": ((d, ff), None),
    }
    for i in range(cfg["layers"]):
        for name, (shape, n_perm) in per_layer.items():
            plan[f"blk.{i}.{name}"] = (f"model.layers.{i}.{LAYER_NAMES[name]}", shape, n_perm)
    return plan


def metadata(cfg: dict, arch: str = "llama") -> dict[str, int | float]:
    return {
        f"{arch}.block_count": cfg["layers"],
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": cfg["hidden"],
        f"{arch}.feed_forward_length": cfg["ff"],
        f"{arch}.attention.head_count": cfg["heads"],
        f"{arch}.attention.head_count_kv": cfg["kv_heads"],
        f"{arch}.attention.key_length": cfg["head_dim"],
        f"{arch}.attention.value_length": cfg["head_dim"],
        f"{arch}.attention.layer_norm_rms_epsilon": cfg["eps"],
        f"{arch}.rope.freq_base": cfg["theta"],
        f"{arch}.vocab_size": cfg["vocab"],
    }


def write_gguf(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, QT | None]],
    meta: dict[str, int | float],
    *,
    arch: str = "llama",
    tokens: list[str] | None = None,
) -> Path:
    """A GGUF file; `tensors` maps a GGUF name to (numpy-layout array or raw block bytes, raw type or None)."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        if isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    if tokens is not None:
        w.add_token_list(tokens)
    for name, (arr, raw) in tensors.items():
        if raw is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------------------------------
# Independent block formats (llama.cpp ggml-common.h) and reference dequantization (ggml-quants.c)
# --------------------------------------------------------------------------------------------------

QK_K = 256
BLOCKS = {
    QT.Q8_0: (32, np.dtype([("d", "<f2"), ("qs", "i1", 32)])),
    QT.Q4_0: (32, np.dtype([("d", "<f2"), ("qs", "u1", 16)])),
    QT.Q4_1: (32, np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])),
    QT.Q4_K: (QK_K, np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", QK_K // 2)])),
    QT.Q6_K: (QK_K, np.dtype([("ql", "u1", QK_K // 2), ("qh", "u1", QK_K // 4), ("scales", "i1", QK_K // 16), ("d", "<f2")])),
}
f32 = np.float32


def _deq_q8_0(b: np.ndarray) -> np.ndarray:  # y[j] = qs[j] * d
    return b["qs"].astype(f32) * b["d"].astype(f32)[:, None]


def _deq_q4_0(b: np.ndarray) -> np.ndarray:  # y[j] = ((qs[j] & 0xF) - 8) * d; y[j + 16] = ((qs[j] >> 4) - 8) * d
    d = b["d"].astype(f32)[:, None]
    x = np.concatenate([(b["qs"] & 0x0F).astype(np.int32) - 8, (b["qs"] >> 4).astype(np.int32) - 8], axis=1)
    return x.astype(f32) * d


def _deq_q4_1(b: np.ndarray) -> np.ndarray:  # y[j] = (qs[j] & 0xF) * d + m; y[j + 16] = (qs[j] >> 4) * d + m
    d, m = b["d"].astype(f32)[:, None], b["m"].astype(f32)[:, None]
    x = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4], axis=1).astype(f32)
    return x * d + m


def _scale_min_k4(j: int, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp `get_scale_min_k4`: the 6-bit scale and min of sub-block j from the 12 packed bytes."""
    if j < 4:
        return s[:, j] & 63, s[:, j + 4] & 63
    return (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4), (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)


def _deq_q4_k(b: np.ndarray) -> np.ndarray:
    d, dmin = b["d"].astype(f32), b["dmin"].astype(f32)
    y = np.empty((len(b), QK_K), f32)
    for k in range(QK_K // 64):  # j = 64 k, is = 2 k, q advances 32 bytes
        q = b["qs"][:, 32 * k : 32 * k + 32]
        sc1, m1 = _scale_min_k4(2 * k, b["scales"])
        sc2, m2 = _scale_min_k4(2 * k + 1, b["scales"])
        d1, mm1 = d * sc1.astype(f32), dmin * m1.astype(f32)
        d2, mm2 = d * sc2.astype(f32), dmin * m2.astype(f32)
        y[:, 64 * k : 64 * k + 32] = d1[:, None] * (q & 0xF).astype(f32) - mm1[:, None]
        y[:, 64 * k + 32 : 64 * k + 64] = d2[:, None] * (q >> 4).astype(f32) - mm2[:, None]
    return y


def _deq_q6_k(b: np.ndarray) -> np.ndarray:
    d = b["d"].astype(f32)
    y = np.empty((len(b), QK_K), f32)
    for n in range(QK_K // 128):  # y, ql, qh, sc advance by 128, 64, 32, 8
        ql = b["ql"][:, 64 * n : 64 * n + 64].astype(np.int32)
        qh = b["qh"][:, 32 * n : 32 * n + 32].astype(np.int32)
        sc = b["scales"][:, 8 * n : 8 * n + 8].astype(f32)
        for ll in range(32):
            i = ll // 16
            q1 = ((ql[:, ll] & 0xF) | (((qh[:, ll] >> 0) & 3) << 4)) - 32
            q2 = ((ql[:, ll + 32] & 0xF) | (((qh[:, ll] >> 2) & 3) << 4)) - 32
            q3 = ((ql[:, ll] >> 4) | (((qh[:, ll] >> 4) & 3) << 4)) - 32
            q4 = ((ql[:, ll + 32] >> 4) | (((qh[:, ll] >> 6) & 3) << 4)) - 32
            y[:, 128 * n + ll] = d * sc[:, i] * q1.astype(f32)
            y[:, 128 * n + ll + 32] = d * sc[:, i + 2] * q2.astype(f32)
            y[:, 128 * n + ll + 64] = d * sc[:, i + 4] * q3.astype(f32)
            y[:, 128 * n + ll + 96] = d * sc[:, i + 6] * q4.astype(f32)
    return y


DEQUANT = {QT.Q8_0: _deq_q8_0, QT.Q4_0: _deq_q4_0, QT.Q4_1: _deq_q4_1, QT.Q4_K: _deq_q4_k, QT.Q6_K: _deq_q6_k}


def reference_dequant(data: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of `data` (as written) in the numpy layout `shape`."""
    if qtype == QT.F32:
        return np.asarray(data, f32).reshape(shape)
    if qtype == QT.F16:
        return np.asarray(data, np.float16).astype(f32).reshape(shape)
    if qtype == QT.BF16:  # the upper 16 bits of a float32
        return (np.ascontiguousarray(data).view("<u2").astype(np.uint32) << 16).view(f32).reshape(shape)
    _, block = BLOCKS[qtype]
    return DEQUANT[qtype](np.ascontiguousarray(data).reshape(-1).view(block)).reshape(shape)


def pack_q4_k(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mn: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Q4_K blocks from f16 d/dmin [n], 6-bit scales/mins [n, 8] and 4-bit quants [n, 256] (quantize_row_q4_K_ref)."""
    b = np.zeros(len(d), BLOCKS[QT.Q4_K][1])
    b["d"], b["dmin"] = d, dmin
    s = np.zeros((len(d), 12), np.uint8)
    for j in range(8):
        ls, lm = sc[:, j].astype(np.uint8), mn[:, j].astype(np.uint8)
        if j < 4:
            s[:, j], s[:, j + 4] = ls, lm
        else:
            s[:, j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            s[:, j - 4] |= (ls >> 4) << 6
            s[:, j] |= (lm >> 4) << 6
    b["scales"] = s
    L = L.astype(np.uint8)
    b["qs"] = np.concatenate([L[:, j : j + 32] | (L[:, j + 32 : j + 64] << 4) for j in range(0, QK_K, 64)], axis=1)
    return b


def pack_q6_k(d: np.ndarray, scales: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Q6_K blocks from f16 d [n], int8 scales [n, 16] and 6-bit quants L in [0, 64) [n, 256] (quantize_row_q6_K_ref)."""
    b = np.zeros(len(d), BLOCKS[QT.Q6_K][1])
    b["d"], b["scales"] = d, scales
    L = L.astype(np.uint8)
    ql, qh = [], []
    for j in range(0, QK_K, 128):
        a, c, e, g = (L[:, j + o : j + o + 32] for o in (0, 32, 64, 96))
        ql += [(a & 0xF) | ((e & 0xF) << 4), (c & 0xF) | ((g & 0xF) << 4)]
        qh.append((a >> 4) | ((c >> 4) << 2) | ((e >> 4) << 4) | ((g >> 4) << 6))
    b["ql"], b["qh"] = np.concatenate(ql, axis=1), np.concatenate(qh, axis=1)
    return b


def random_k_quant(qtype: QT, shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw bytes [rows, row bytes], exact float values [rows, cols]) of random K-quant blocks.

    The values come from the fields' meaning (value = d*scale*q - dmin*min for Q4_K with sub-blocks
    of 32; d*scale*(q - 32) for Q6_K with sub-blocks of 16), not from a decoder.
    """
    n = shape[0] * shape[1] // QK_K
    d = (rng.uniform(0.5, 2.0, n) * 1e-3).astype(np.float16)
    if qtype == QT.Q4_K:
        dmin = (rng.uniform(0.5, 2.0, n) * 1e-3).astype(np.float16)
        sc, mn, L = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8)), rng.integers(0, 16, (n, QK_K))
        blocks = pack_q4_k(d, dmin, sc, mn, L)
        dl = (d.astype(f32)[:, None] * sc.astype(f32)).repeat(32, axis=1)
        ml = (dmin.astype(f32)[:, None] * mn.astype(f32)).repeat(32, axis=1)
        values = dl * L.astype(f32) - ml
    else:
        scales, L = rng.integers(-128, 128, (n, 16)).astype(np.int8), rng.integers(0, 64, (n, QK_K))
        blocks = pack_q6_k(d, scales, L)
        dl = (d.astype(f32)[:, None] * scales.astype(f32)).repeat(16, axis=1)
        values = dl * (L - 32).astype(f32)
    return blocks.view(np.uint8).reshape(shape[0], -1), values.reshape(shape)


def error_bound(w: np.ndarray, qtype: QT) -> np.ndarray:
    """An elementwise bound on |dequantize(quantize(w)) - w| for the quantizers gguf implements in numpy.

    eps16 = 2^-11 is the relative rounding error of float16 (the block scales are stored as f16).
    F32 exact; F16 round-to-nearest: eps16*|x| + 2^-25 (half the subnormal spacing); BF16: 2^-8*|x|.
    Q8_0 (blocks of 32): d = amax/127, q = round(x/d): d/2 + 127*|d16 - d| <= d*(1/2 + 127*eps16).
    Q4_0: d = -m/8 (m the block's largest-magnitude value), q = clip(round(x/d) + 8, 0, 15) - 8 in [-8, 7],
    so -m clips to 7d: error <= |d| (else |d|/2), plus 8*|d|*eps16.
    Q4_1: d = (max - min)/15, m = min, q = round((x - min)/d) in [0, 15]: d/2 + 15*d*eps16 + |min|*eps16.
    A 1e-6 relative float32 slack is added for the float32 arithmetic of the quantizer itself.
    """
    eps16 = 2.0**-11
    a = np.abs(w)
    if qtype == QT.F32:
        return np.zeros_like(w)
    if qtype == QT.F16:
        return eps16 * a + 2.0**-25
    if qtype == QT.BF16:
        return 2.0**-8 * a
    blocks = w.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    if qtype == QT.Q8_0:
        b = (amax / 127) * (0.5 + 127 * eps16)
    elif qtype == QT.Q4_0:
        b = (amax / 8) * (1 + 8 * eps16)
    elif qtype == QT.Q4_1:
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        d = (hi - lo) / 15
        b = d * (0.5 + 15 * eps16) + np.abs(lo) * eps16
    else:
        raise AssertionError(qtype)
    return (np.broadcast_to(b, blocks.shape) + 1e-6 * amax).reshape(w.shape)


# --------------------------------------------------------------------------------------------------
# 2. Every supported tensor type, read back through GGUFSource
# --------------------------------------------------------------------------------------------------

# Rows of 256 so the K-quants (super-blocks of 256) fit every matrix.
QUANT_CFG = dict(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, ff=256, vocab=64, eps=1e-5, theta=10000.0)
QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1]  # gguf 0.19 quantizes these in numpy
HAND_PACKED = [QT.Q4_K, QT.Q6_K]  # gguf 0.19 only dequantizes these: blocks built here


def _encode(w_gguf: np.ndarray, qtype: QT) -> tuple[np.ndarray, QT | None]:
    if qtype == QT.F32:
        return w_gguf.astype(f32), None
    if qtype == QT.F16:
        return w_gguf.astype(np.float16), None
    return gguf.quants.quantize(w_gguf, qtype), qtype


@pytest.fixture(scope="module")
def quant_files(tmp_path_factory):
    """qtype -> (path, {HF name: (expected read-back, original weights or None, error bound or None)})."""
    out = {}
    root = tmp_path_factory.mktemp("gguf_quant")
    for qtype in QUANTIZABLE + HAND_PACKED:
        rng = np.random.default_rng(int(qtype))
        tensors, expect = {}, {}
        for gname, (hf_name, shape, n_perm) in tensor_plan(QUANT_CFG).items():
            if len(shape) == 1:  # norms stay F32, as llama.cpp writes them
                w = rng.normal(1.0, 0.2, shape).astype(f32)
                tensors[gname] = (w, None)
                expect[hf_name] = (w, w, np.zeros_like(w))
                continue
            idx = permute_index(shape[0], n_perm) if n_perm else np.arange(shape[0])
            inv = np.argsort(idx)
            if qtype in HAND_PACKED:
                raw, values = random_k_quant(qtype, shape, rng)  # values: GGUF (permuted) row order
                ref = reference_dequant(raw, qtype, shape)
                # The reference decoder and the packer agree on the format (a check of this test's code).
                np.testing.assert_array_equal(ref, values)
                tensors[gname] = (raw, qtype)
                expect[hf_name] = (ref[inv], values[inv], np.zeros(shape, f32))
            else:
                w = rng.normal(0.0, 0.05, shape).astype(f32)  # HF layout
                w_gguf = llama_cpp_permute(w, n_perm) if n_perm else w
                np.testing.assert_array_equal(w_gguf, w[idx])
                data, raw_type = _encode(w_gguf, qtype)
                ref = reference_dequant(data, qtype, shape)
                tensors[gname] = (data, raw_type)
                expect[hf_name] = (ref[inv], w, error_bound(w_gguf, qtype)[inv])
        path = write_gguf(root / f"tiny_{qtype.name}.gguf", tensors, metadata(QUANT_CFG))
        out[qtype] = (path, expect)
    return out


@pytest.mark.parametrize("qtype", QUANTIZABLE + HAND_PACKED, ids=lambda q: q.name)
def test_tensor_type_reads_back(quant_files, qtype):
    path, expect = quant_files[qtype]
    src = GGUFSource(path)
    matrix_types = {t.tensor_type for t in src.reader.tensors if len(t.shape) == 2}
    assert matrix_types == {qtype}
    assert sorted(src.keys()) == sorted(expect)
    for name, (ref, original, bound) in expect.items():
        got = src.get(name)
        assert got.dtype == np.float32 and got.shape == ref.shape == tuple(src.shape(name)), name
        # (a) bit-exact against the independent reference decoder (q/k un-permuted to HF order).
        np.testing.assert_array_equal(got, ref, err_msg=f"{qtype.name} {name}")
        # (b) within the format's quantization error of the weights we started from.
        err = np.abs(got - original)
        assert np.all(err <= bound), f"{qtype.name} {name}: error {err.max()} above bound at {np.argmax(err - bound)}"
    if qtype in (QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1):  # (b) is a real check: quantization changed the weights
        ref, original, _ = expect["model.layers.0.mlp.up_proj.weight"]
        assert np.abs(ref - original).max() > 0


@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda q: q.name)
def test_tensor_types_build_model(quant_files, qtype):
    """The whole model builds from the file, with q/k in HF order (un-permuted) inside our parameters."""
    path, expect = quant_files[qtype]
    src = GGUFSource(path)
    cfg = C.from_hf(src.hf_config)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 256, 4, 2, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (256, 64, False)
    model = build_from_source(src, cfg)
    d = cfg.hidden_size
    for i in range(cfg.num_layers):
        wq = np.asarray(model.layers.wq[...][i]).reshape(d, -1).T  # ours [D, heads, hd] -> HF [heads*hd, D]
        wk = np.asarray(model.layers.wk[...][i]).reshape(d, -1).T
        np.testing.assert_array_equal(wq, expect[f"model.layers.{i}.self_attn.q_proj.weight"][0])
        np.testing.assert_array_equal(wk, expect[f"model.layers.{i}.self_attn.k_proj.weight"][0])
        np.testing.assert_array_equal(
            np.asarray(model.layers.w_down[...][i]).T, expect[f"model.layers.{i}.mlp.down_proj.weight"][0]
        )
    np.testing.assert_array_equal(np.asarray(model.embed[...]), expect["model.embed_tokens.weight"][0])
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]).T, expect["lm_head.weight"][0])


def test_q_proj_unpermute_recovers_hf_layout(tmp_path):
    """A q_proj whose rows are labelled by their HF index reads back in HF order (F32, exact)."""
    cfg = dict(QUANT_CFG, layers=1)
    rng = np.random.default_rng(0)
    tensors = {}
    for gname, (_, shape, n_perm) in tensor_plan(cfg).items():
        w = rng.normal(0, 0.05, shape).astype(f32)
        if gname.startswith("blk.0.attn_q"):
            w = np.broadcast_to(np.arange(shape[0], dtype=f32)[:, None], shape).copy()
        tensors[gname] = (llama_cpp_permute(w, n_perm) if n_perm else w, None)
    src = GGUFSource(write_gguf(tmp_path / "rows.gguf", tensors, metadata(cfg)))
    q = src.get("model.layers.0.self_attn.q_proj.weight")
    np.testing.assert_array_equal(q[:, 0], np.arange(q.shape[0], dtype=f32))
    # On disk the rows are interleaved per head: head 0 holds HF rows 0, 32, 1, 33, ... (head_dim 64).
    disk = tensors["blk.0.attn_q.weight"][0][:4, 0]
    np.testing.assert_array_equal(disk, [0, 32, 1, 33])


# --------------------------------------------------------------------------------------------------
# 3. A tiny GGUF model against transformers' Llama built from the same float32 weights
# --------------------------------------------------------------------------------------------------

TINY = dict(layers=2, hidden=48, heads=4, kv_heads=2, head_dim=16, ff=80, vocab=96, eps=1e-5, theta=1000.0)


def tiny_torch_llama(tied: bool) -> LlamaForCausalLM:
    """A random float32 Llama (norms around 1, explicit head_dim 16 != 48 // 4, non-default RoPE theta)."""
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=TINY["vocab"],
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["ff"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        head_dim=TINY["head_dim"],
        rms_norm_eps=TINY["eps"],
        rope_theta=TINY["theta"],
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(p, 1.0, 0.2)
            elif "embed_tokens" in name:
                torch.nn.init.normal_(p, 0.0, 0.5)
            else:
                torch.nn.init.normal_(p, 0.0, p.shape[-1] ** -0.5)
    return model


def torch_to_gguf_tensors(model: LlamaForCausalLM, tied: bool) -> dict[str, tuple[np.ndarray, None]]:
    """The model's weights under llama.cpp names, F32, q/k rows permuted as llama.cpp's converter does."""
    sd = {k: v.detach().numpy().astype(f32) for k, v in model.state_dict().items()}
    hf_to_gguf = {v: k for k, v in GLOBAL_NAMES.items()}
    out = {}
    for hf_name, w in sd.items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name in hf_to_gguf:
            out[hf_to_gguf[hf_name]] = (w, None)
            continue
        _, _, i, rest = hf_name.split(".", 3)
        gname = {v: k for k, v in LAYER_NAMES.items()}[rest]
        if gname == "attn_q.weight":
            w = llama_cpp_permute(w, TINY["heads"])
        elif gname == "attn_k.weight":
            w = llama_cpp_permute(w, TINY["kv_heads"])
        out[f"blk.{i}.{gname}"] = (np.ascontiguousarray(w), None)
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_vocab_from_token_list"])
def test_tiny_gguf_logits_match_transformers(tmp_path, tied):
    ref_model = tiny_torch_llama(tied)
    meta = metadata(TINY)
    tokens = None
    if tied:  # vocab size from the token list, as in llama.cpp files without `llama.vocab_size`
        del meta["llama.vocab_size"]
        tokens = [f"tok{i}" for i in range(TINY["vocab"])]
    path = write_gguf(tmp_path / "tiny.gguf", torch_to_gguf_tensors(ref_model, tied), meta, tokens=tokens)
    src = GGUFSource(path)
    cfg = C.from_hf(src.hf_config)
    assert cfg.tie_word_embeddings == tied and cfg.head_dim == 16 and cfg.rope_theta == 1000.0
    assert cfg.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)  # GGUF stores it as float32
    assert cfg.vocab_size == TINY["vocab"]
    model = build_from_source(src, cfg)
    ids = np.random.default_rng(1).integers(0, TINY["vocab"], (2, 12)).astype(np.int32)
    ours = np.asarray(loopus_jax.forward(model, ids).logits)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids).long()).logits.numpy()
    assert ours.shape == ref.shape
    assert np.abs(ref).max() > 0.5  # O(1) logits, so 1e-5 absolute is a tight check
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 128}


def llama_cpp_rope_freqs(theta: float, dim: int, p: dict) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf for Llama 3.x: one divisor per frequency (written from its formula)."""
    out = []
    for freq in 1.0 / (theta ** (np.arange(0, dim, 2) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < p["original_max_position_embeddings"] / p["high_freq_factor"]:
            out.append(1.0)
        elif wavelen > p["original_max_position_embeddings"] / p["low_freq_factor"]:
            out.append(p["factor"])
        else:
            s = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"]
            )
            out.append(1 / ((1 - s) / p["factor"] + s))
    return np.asarray(out, np.float32)


def test_llama3_rope_freqs_tensor_becomes_llama3_scaling(tmp_path):
    """Llama 3.x GGUFs carry RoPE scaling as a `rope_freqs.weight` tensor: we recover the HF parameters
    and match transformers' llama3 RoPE. theta 1000, head_dim 16 puts two frequencies in the smooth band
    (wavelengths 35 and 84 between 128/4 and 128) and two below it, so every branch is exercised; the
    logits at positions up to 23 differ from unscaled RoPE by far more than the 1e-5 tolerance."""
    torch.manual_seed(0)
    ref_model = tiny_torch_llama(tied=False)
    ref_model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": TINY["theta"], **LLAMA3}
    scaled = LlamaForCausalLM(ref_model.config).float().eval()
    scaled.load_state_dict(ref_model.state_dict())
    tensors = torch_to_gguf_tensors(scaled, tied=False)
    tensors["rope_freqs.weight"] = (llama_cpp_rope_freqs(TINY["theta"], TINY["head_dim"], LLAMA3), None)
    path = write_gguf(tmp_path / "llama3.gguf", tensors, metadata(TINY))
    src = GGUFSource(path)
    cfg = C.from_hf(src.hf_config)
    assert cfg.rope_type == "llama3" and dict(cfg.rope_params) == LLAMA3
    model = build_from_source(src, cfg)
    ids = np.random.default_rng(1).integers(0, TINY["vocab"], (2, 24)).astype(np.int32)
    ours = np.asarray(loopus_jax.forward(model, ids).logits)
    with torch.no_grad():
        ref = scaled(torch.from_numpy(ids).long()).logits.numpy()
        unscaled = ref_model(torch.from_numpy(ids).long()).logits.numpy()
    assert np.abs(ref - unscaled).max() > 1e-3  # the scaling matters at these positions
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_rope_freqs_no_llama3_parameters_reproduce(tmp_path):
    tensors = tiny_f32_tensors()
    tensors["rope_freqs.weight"] = (np.linspace(1.0, 3.0, TINY["head_dim"] // 2).astype(np.float32) ** 2, None)
    path = write_gguf(tmp_path / "odd.gguf", tensors, metadata(TINY))
    with pytest.raises(loopus_jax.LoopusError, match="rope_freqs.weight matches no llama3 rope scaling"):
        GGUFSource(path)


# --------------------------------------------------------------------------------------------------
# 4. Errors
# --------------------------------------------------------------------------------------------------


def tiny_f32_tensors(seed: int = 0) -> dict[str, tuple[np.ndarray, None]]:
    rng = np.random.default_rng(seed)
    out = {}
    for gname, (_, shape, _) in tensor_plan(TINY).items():
        out[gname] = (rng.normal(1.0 if len(shape) == 1 else 0.0, 0.1, shape).astype(f32), None)
    return out


def test_valid_tiny_file_loads(tmp_path):
    """The baseline the error tests damage: this file loads."""
    src = GGUFSource(write_gguf(tmp_path / "ok.gguf", tiny_f32_tensors(), metadata(TINY)))
    build_from_source(src, C.from_hf(src.hf_config))


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", tiny_f32_tensors(), metadata(TINY, arch="gpt2"), arch="gpt2")
    with pytest.raises(loopus_jax.LoopusError, match=r"unsupported GGUF architecture 'gpt2'.*llama"):
        GGUFSource(path)
    with pytest.raises(loopus_jax.LoopusError, match="unsupported GGUF architecture 'gpt2'"):
        loopus_jax.load(path)


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "feed_forward_length", "attention.head_count"])
def test_missing_metadata_key(tmp_path, key):
    meta = metadata(TINY)
    del meta[f"llama.{key}"]
    path = write_gguf(tmp_path / "nokey.gguf", tiny_f32_tensors(), meta)
    with pytest.raises(loopus_jax.LoopusError, match=rf"metadata lacks llama\.{key}\b"):
        GGUFSource(path)


@pytest.mark.parametrize("name", ["blk.0.attn_foo.weight", "mystery.weight"])
def test_unknown_tensor_name(tmp_path, name):
    tensors = tiny_f32_tensors()
    tensors[name] = (np.zeros((4, 48), f32), None)
    path = write_gguf(tmp_path / "extra.gguf", tensors, metadata(TINY))
    with pytest.raises(loopus_jax.LoopusError, match=rf"unexpected GGUF tensor '{name}' for architecture llama"):
        GGUFSource(path)


def test_missing_tensor(tmp_path):
    tensors = tiny_f32_tensors()
    del tensors["blk.1.ffn_down.weight"]
    src = GGUFSource(write_gguf(tmp_path / "missing.gguf", tensors, metadata(TINY)))
    with pytest.raises(loopus_jax.LoopusError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.down_proj\.weight"):
        build_from_source(src, C.from_hf(src.hf_config), what=str(src.path))


def test_metadata_disagreeing_with_tensor_shapes(tmp_path):
    meta = metadata(TINY)
    meta["llama.feed_forward_length"] = TINY["ff"] * 2
    src = GGUFSource(write_gguf(tmp_path / "shape.gguf", tiny_f32_tensors(), meta))
    with pytest.raises(loopus_jax.LoopusError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        build_from_source(src, C.from_hf(src.hf_config))


def test_unsupported_tensor_type(tmp_path):
    tensors = tiny_f32_tensors()
    tensors["token_embd.weight"] = (np.zeros((TINY["vocab"], TINY["hidden"]), np.int8), None)  # GGML I8
    src = GGUFSource(write_gguf(tmp_path / "i8.gguf", tensors, metadata(TINY)))
    with pytest.raises(loopus_jax.LoopusError, match="token_embd.weight has unsupported quantization I8"):
        src.get("model.embed_tokens.weight")


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.02, 0.0])
def test_truncated_file(tmp_path, fraction):
    full = write_gguf(tmp_path / "full.gguf", tiny_f32_tensors(), metadata(TINY))
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(loopus_jax.LoopusError, match="truncated or not a valid GGUF file"):
        GGUFSource(cut)
    with pytest.raises(loopus_jax.LoopusError, match="truncated or not a valid GGUF file"):
        loopus_jax.load(cut)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip, not a gguf" * 10)
    with pytest.raises(loopus_jax.LoopusError, match="truncated or not a valid GGUF file"):
        loopus_jax.load(bad)


# --------------------------------------------------------------------------------------------------
# 1. The embedded SmolLM2-135M-Instruct (Q4_1 / Q8_0 / F32) against transformers' GGUF loader
# --------------------------------------------------------------------------------------------------

SENTENCE = "The quick brown fox jumps over the lazy dog, then it runs into the forest to look for something to eat."


@pytest.fixture(scope="module")
def smollm2():
    """(our model, our tokenizer, transformers float32 model, transformers tokenizer), loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = loopus_jax.default_model_path()
    model, tok = loopus_jax.load(p)
    hf_model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return model, tok, hf_model, hf_tok


@pytest.mark.slow
def test_smollm2_file_types():
    src = GGUFSource(loopus_jax.default_model_path())
    types = {t.tensor_type for t in src.reader.tensors}
    assert {QT.Q4_1, QT.Q8_0, QT.F32} <= types
    assert src.hf_config["num_hidden_layers"] == 30 and src.hf_config["tie_word_embeddings"]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    """Tolerance 1e-3 absolute: both sides dequantize to the same float32 weights, so the remaining
    difference is float32 accumulation order (XLA vs torch matmuls, softmax, RMSNorm) compounded over
    30 layers, on logits of magnitude ~30 (1e-3 is ~3e-5 relative); measured ~1.3e-4."""
    model, tok, hf_model, _ = smollm2
    ids = np.array([tok(SENTENCE)["input_ids"]], np.int32)
    assert ids.shape[1] > 15
    ours = np.asarray(loopus_jax.forward(model, ids).logits)
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(ids).long()).logits.float().numpy()
    assert ours.shape == ref.shape == (1, ids.shape[1], 49152)
    assert np.abs(ref).max() > 10
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_generate(smollm2):
    model, tok, hf_model, _ = smollm2
    prompt = tok("The capital of France is")["input_ids"]
    n_new = 8
    with torch.no_grad():
        x = torch.tensor([prompt])
        out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    ref = out[0, len(prompt) :].tolist()
    seq = list(prompt)
    for _ in range(n_new):  # no KV cache: the whole growing sequence each step
        logits = np.asarray(loopus_jax.forward(model, np.array([seq], np.int32)).logits)
        seq.append(int(logits[0, -1].argmax()))
    assert seq[len(prompt) :] == ref
    assert "Paris" in tok.decode(seq[len(prompt) :])


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    _, tok, _, hf_tok = smollm2
    texts = [
        SENTENCE,
        "  leading spaces,\ttabs and\nnew lines\n\n",
        "Ünïcödé — café, naïve, 東京, emoji 🚀!",
        "x = 12345 + 678.9e-3; print(x)",
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids) == hf_tok.decode(ids)
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == hf_tok.apply_chat_template(
        chat, add_generation_prompt=True
    )
