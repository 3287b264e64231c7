"""A slow exact NumPy float64 reference for checking results, and bfloat16 helpers."""
import numpy as np


def to_bfloat16(x):
    """float32 array -> uint16 bfloat16 bit patterns (round to nearest even; NaN kept)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)


def from_bfloat16(h):
    """uint16 bfloat16 bit patterns -> float32 array."""
    return (np.ascontiguousarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def reference_attention(q, k, v, causal=False, window=0, doc_offsets=None, q_offset=0, kv_offset=0, scale=None,
                        q_positions=None):
    """Exact attention in float64: q [Tq, H, D], k/v [Tk, Hkv, D] (float arrays).

    Masks on absolute positions (query i at q_offset + i, key j at kv_offset + j):
    causal (key <= query), window W (key > query - W, with causal), documents
    (same document of doc_offsets). q_positions (optional, [Tq] ints) gives each
    query row its own absolute position instead (e.g. a sample of rows). Returns (o [Tq, H, D], lse [Tq, H]) float64;
    a row that sees no key gets o = 0, lse = -inf.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    tq, heads, dim = q.shape
    tk, kv_heads, _ = k.shape
    group = heads // kv_heads
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    qp = (q_offset + np.arange(tq) if q_positions is None else np.asarray(q_positions, dtype=np.int64))[:, None]
    kp = kv_offset + np.arange(tk)[None, :]
    visible = np.ones((tq, tk), dtype=bool)
    if causal:
        visible &= kp <= qp
        if window > 0:
            visible &= kp > qp - window
    if doc_offsets is not None and len(doc_offsets) > 0:
        bounds = np.asarray(doc_offsets, dtype=np.int64)
        qd = np.searchsorted(bounds, qp, side="right")
        kd = np.searchsorted(bounds, kp, side="right")
        visible &= qd == kd
    o = np.zeros((tq, heads, dim))
    lse = np.full((tq, heads), -np.inf)
    for h in range(heads):  # one [Tq, Tk] score matrix at a time (BLAS matmul)
        kh = k[:, h // group]  # query head h uses kv head h // group
        s = np.where(visible, (q[:, h] @ kh.T) * scale, -np.inf)
        m = s.max(axis=1, keepdims=True)
        m_safe = np.where(np.isfinite(m), m, 0.0)
        p = np.exp(s - m_safe)
        total = p.sum(axis=1)
        seen = total > 0
        o[:, h] = (p @ v[:, h // group]) / np.where(seen, total, 1.0)[:, None]
        with np.errstate(divide="ignore"):
            lse[:, h] = np.where(seen, np.log(np.where(seen, total, 1.0)) + m_safe[:, 0], -np.inf)
    return o, lse
