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


def reference_attention(q, k, v, causal=False, window=0, doc_offsets=None, q_offset=0, kv_offset=0, scale=None):
    """Exact attention in float64: q [Tq, H, D], k/v [Tk, Hkv, D] (float arrays).

    Masks on absolute positions (query i at q_offset + i, key j at kv_offset + j):
    causal (key <= query), window W (key > query - W, with causal), documents
    (same document of doc_offsets). Returns (o [Tq, H, D], lse [Tq, H]) float64;
    a row that sees no key gets o = 0, lse = -inf.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    tq, heads, dim = q.shape
    tk, kv_heads, _ = k.shape
    group = heads // kv_heads
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    qp = q_offset + np.arange(tq)[:, None]
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
    kx = np.repeat(k, group, axis=1)  # [Tk, H, D]: query head h uses kv head h // group
    vx = np.repeat(v, group, axis=1)
    s = np.einsum("qhd,khd->hqk", q, kx) * scale
    s = np.where(visible[None], s, -np.inf)
    m = s.max(axis=2, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    total = p.sum(axis=2, keepdims=True)
    o = np.einsum("hqk,khd->qhd", p / np.where(total > 0, total, 1.0), vx)
    with np.errstate(divide="ignore"):
        lse = (np.log(total) + m_safe)[:, :, 0].T  # [Tq, H]
    lse = np.where(total[:, :, 0].T > 0, lse, -np.inf)
    return o, lse
