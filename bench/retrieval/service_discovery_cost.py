#!/usr/bin/python3
"""What span discovery costs a Prefill in the service (issue 15: <= 5% of
the prefill's time).

Starts attnserve (2 ranks on loopback), then alternates Prefill calls of the
same random chunk on fresh sessions with FIXED and DISCOVERED span
boundaries (span_tokens 16: spans of 4..16 tokens, a band of 64 keys, rows
and columns), and prints each pair and the median ratio. The discovered
session's extra time is the band capture in the ring plus the scores and the
segmentation on every rank.

    /usr/bin/python3 bench/retrieval/service_discovery_cost.py --tokens 32768 --pairs 3
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(root, "python", "examples"))
from llama_service import LocalServer, find_python_dir  # noqa: E402  (the example's server launcher)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--span-tokens", type=int, default=16)
    p.add_argument("--build-dir", default=os.path.join(root, "build"))
    a = p.parse_args()
    sys.path.insert(0, find_python_dir(a.build_dir))
    from ringtree_client import AttentionClient

    rng = np.random.default_rng(1)
    t, h, hkv, d = a.tokens, a.heads, a.kv_heads, a.head_dim
    q = rng.standard_normal((t, h, d), dtype=np.float32)
    k = rng.standard_normal((t, hkv, d), dtype=np.float32)
    v = rng.standard_normal((t, hkv, d), dtype=np.float32)
    mib = 2 * (q.nbytes + k.nbytes + v.nbytes) // (1 << 20) + 64
    server = LocalServer(os.path.join(a.build_dir, "coordinator", "attnserve"), ranks=2,
                         args=("--max-message-mib", str(min(2047, mib)), "--max-prefill-tokens", str(max(t, 65536))))
    print("attnserve (2 ranks) at %s; prefill of %d tokens, H=%d, Hkv=%d, D=%d, causal, span_tokens %d"
          % (server.address, t, h, hkv, d, a.span_tokens), flush=True)
    # The CPU, kernel path and BLAS core the ranks run on (attnserve prints them at start).
    for line in open(server.log_path):
        if "kernel path" in line:
            print(line.strip(), flush=True)
            break
    try:
        c = AttentionClient(server.address, max_message_bytes=min(2047, mib) << 20)
        rows = []
        for pair in range(a.pairs):
            times = {}
            for kind in (("fixed", "discovered") if pair % 2 == 0 else ("discovered", "fixed")):
                s = c.create_session(heads=h, kv_heads=hkv, head_dim=d, span_tokens=a.span_tokens,
                                     span_boundaries=kind)
                t0 = time.perf_counter()
                c.prefill(s.session_id, 0, q, k, v)
                times[kind] = time.perf_counter() - t0
                c.delete_session(s.session_id)
            ratio = times["discovered"] / times["fixed"]
            rows.append((times["fixed"], times["discovered"], ratio))
            print("pair %d: fixed %.3f s  discovered %.3f s  ratio %.3f" % (pair, times["fixed"], times["discovered"], ratio),
                  flush=True)
        print("median: fixed %.3f s  discovered %.3f s  discovered / fixed %.3f (extra %.1f%%)"
              % (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows),
                 statistics.median(r[2] for r in rows), 100 * (statistics.median(r[2] for r in rows) - 1)))
    finally:
        code = server.stop()
        if code != 0:
            print("attnserve exited %d; log: %s" % (code, server.log_path))


if __name__ == "__main__":
    main()
