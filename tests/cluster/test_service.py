#!/usr/bin/python3
"""The attention service on 2 emulated hosts, started exactly as the README
says (HOSTFILE=hosts RANKS=2 launch/attnserve ...), driven by the Python client
from the launching side over the bridge.

Checks: the two ranks run on the two hosts (rank 0 listens on host 1's
address); create, append, prefill, decode, attend (exact and retrieval with a
full budget) and retrieve_kv match a float64 numpy reference (max |o - ref|
<= 2e-4); the KV crossed host 2's shaped link; SIGTERM to launch/attnserve
ends every rank with exit 0.

Exit 77 (ctest SKIP) without root or network namespaces.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_common as cc  # noqa: E402


def reference(q, k, v, causal):
    """softmax(q k^T / sqrt(D)) v per head (GQA), float64; q [T,H,D] at the last T positions."""
    T, H, D = q.shape
    N, Hkv, _ = k.shape
    group = H // Hkv
    out = np.zeros((T, H, D))
    for h in range(H):
        kh, vh = k[:, h // group].astype(np.float64), v[:, h // group].astype(np.float64)
        s = q[:, h].astype(np.float64) @ kh.T / np.sqrt(D)
        if causal:
            pos_q = N - T + np.arange(T)
            s[np.arange(N)[None, :] > pos_q[:, None]] = -np.inf
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ vh
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attnserve", required=True)
    ap.add_argument("--python-path", required=True)
    args = ap.parse_args()
    cc.require_namespaces()
    sys.path.insert(0, args.python_path)
    import grpc
    from ringtree_client import AttentionClient, retrieval_options

    with cc.Cluster("rtts", 2, 1) as c:
        service = cc.Service(c, args.attnserve, ["--listen", "0.0.0.0:0"])
        code = None
        try:
            port = service.port
            on = {i: c.pids(i, "attnserve") for i in (1, 2)}
            assert len(on[1]) == 1 and len(on[2]) == 1, "expected one rank per host, got %s" % on
            address = "%s:%d" % (c.address(1), port)
            before = c.link_bytes()
            client = AttentionClient(address, timeout=60)
            assert client.health() == "SERVING"
            rng = np.random.default_rng(3)
            H, HKV, D = 8, 2, 64
            sid = client.create_session(layers=1, heads=H, kv_heads=HKV, head_dim=D, name="cluster").session_id
            k = rng.standard_normal((4000, HKV, D), dtype=np.float32)
            v = rng.standard_normal((4000, HKV, D), dtype=np.float32)
            assert client.append_kv(sid, 0, k, v, chunk_tokens=1500).layer_tokens == 4000
            worst = 0.0
            q = rng.standard_normal((64, H, D), dtype=np.float32)
            ck = rng.standard_normal((64, HKV, D), dtype=np.float32)
            cv = rng.standard_normal((64, HKV, D), dtype=np.float32)
            k, v = np.concatenate([k, ck]), np.concatenate([v, cv])
            o = client.prefill(sid, 0, q, ck, cv)
            worst = max(worst, np.abs(o - reference(q, k, v, True)).max())
            for _ in range(3):
                q = rng.standard_normal((1, H, D), dtype=np.float32)
                dk = rng.standard_normal((1, HKV, D), dtype=np.float32)
                dv = rng.standard_normal((1, HKV, D), dtype=np.float32)
                k, v = np.concatenate([k, dk]), np.concatenate([v, dv])
                worst = max(worst, np.abs(client.decode(sid, 0, q, dk, dv) - reference(q, k, v, True)).max())
            q = rng.standard_normal((4, H, D), dtype=np.float32)
            worst = max(worst, np.abs(client.attend(sid, 0, q) - reference(q, k, v, False)).max())
            o_r, info = client.attend(sid, 0, q, retrieval=retrieval_options(token_budget=1 << 30))
            assert info.exact and info.tokens_attended == 4067, info
            worst = max(worst, np.abs(o_r - reference(q, k, v, False)).max())
            runs = client.retrieve_kv(sid, 0, q[:1], retrieval_options(top_k_spans=3))
            assert runs and {r[0] for r in runs} <= {0, 1}, runs
            for rank, start, rk, rv in runs:
                assert np.array_equal(rk, k[start:start + rk.shape[0]]) and np.array_equal(rv, v[start:start + rv.shape[0]])
            stats = client.stats()
            per_rank = [r.kv_tokens for r in stats.ranks]
            assert stats.world_size == 2 and sum(per_rank) == 4067 and min(per_rank) > 0, per_rank
            moved = {i: b - before[i] for i, b in c.link_bytes().items()}
            print("service on %s (2 hosts): max |o - reference| = %.2e; KV tokens per rank %s; bytes into each "
                  "host over its link %s" % (address, worst, per_rank, moved), flush=True)
            assert worst <= 2e-4, worst
            # Host 2's KV shard (~half of 4067 tokens, k+v fp32) went over its link.
            assert moved[2] >= per_rank[1] * HKV * D * 4 * 2, moved
            try:
                client.attend("0" * 32, 0, q)
                raise AssertionError("expected NOT_FOUND")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
            client.close()
            code = service.stop()
        finally:
            service.close()
        assert code == 0, "launch/attnserve exited %s after SIGTERM" % code
        left = c.pids(1, "attnserve") + c.pids(2, "attnserve")
        assert not left, left
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
