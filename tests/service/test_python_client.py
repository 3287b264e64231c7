#!/usr/bin/python3
"""The Python client against a real attnserve under mpirun -np 2.

Checks the full flow (create, append, prefill, decode, attend) against a
float64 numpy reference (max |o - ref| <= 2e-4), error codes, the standard
health service and server reflection, then SIGTERM shutdown with exit 0.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np


def reference(q, k, v, causal):
    """softmax(q k^T / sqrt(D)) v per head (GQA), float64. q [T,H,D], k/v [N,Hkv,D]."""
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--attnserve", required=True)
    parser.add_argument("--python-path", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.python_path)
    import grpc
    from ringtree_client import AttentionClient

    workdir = tempfile.mkdtemp(prefix="attnserve-py-")
    port_file, pid_file = os.path.join(workdir, "port"), os.path.join(workdir, "pid")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    log = open(os.path.join(workdir, "log"), "w")
    server = subprocess.Popen(["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", args.attnserve,
                               "--listen", "127.0.0.1:0", "--port-file", port_file, "--pid-file", pid_file],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(600):
            if os.path.exists(port_file) and os.path.exists(pid_file):
                break
            if server.poll() is not None:
                raise SystemExit("attnserve exited early")
            time.sleep(0.05)
        port = int(open(port_file).read())
        client = AttentionClient(f"127.0.0.1:{port}", timeout=60)
        assert client.health() == "SERVING"

        # Reflection lists the service (raw bidi call: ServerReflectionRequest{list_services: ""}).
        reflect = client.channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
        reply = b"".join(reflect(iter([b"\x3a\x00"]), timeout=10))
        assert b"ringtree.v1.AttentionService" in reply, reply

        rng = np.random.default_rng(0)
        H, HKV, D = 8, 2, 64
        s = client.create_session(layers=1, heads=H, kv_heads=HKV, head_dim=D, name="python-test")
        sid = s.session_id
        k = rng.standard_normal((10000, HKV, D), dtype=np.float32)
        v = rng.standard_normal((10000, HKV, D), dtype=np.float32)
        r = client.append_kv(sid, 0, k, v, chunk_tokens=3000)
        assert r.layer_tokens == 10000, r
        worst = 0.0
        q = rng.standard_normal((128, H, D), dtype=np.float32)
        ck = rng.standard_normal((128, HKV, D), dtype=np.float32)
        cv = rng.standard_normal((128, HKV, D), dtype=np.float32)
        k, v = np.concatenate([k, ck]), np.concatenate([v, cv])
        o, lse = client.prefill(sid, 0, q, ck, cv, return_lse=True, output_chunk_tokens=50)
        assert o.shape == (128, H, D) and lse.shape == (128, H)
        worst = max(worst, np.abs(o - reference(q, k, v, True)).max())
        for _ in range(3):
            q = rng.standard_normal((1, H, D), dtype=np.float32)
            dk = rng.standard_normal((1, HKV, D), dtype=np.float32)
            dv = rng.standard_normal((1, HKV, D), dtype=np.float32)
            k, v = np.concatenate([k, dk]), np.concatenate([v, dv])
            worst = max(worst, np.abs(client.decode(sid, 0, q, dk, dv) - reference(q, k, v, True)).max())
        q = rng.standard_normal((4, H, D), dtype=np.float32)
        worst = max(worst, np.abs(client.attend(sid, 0, q) - reference(q, k, v, False)).max())
        # Retrieval mode with a budget covering everything is exact attention.
        from ringtree_client import retrieval_options
        o_r, info = client.attend(sid, 0, q, retrieval=retrieval_options(token_budget=1 << 30))
        assert info.exact and info.tokens_attended == 10131, info
        worst = max(worst, np.abs(o_r - reference(q, k, v, False)).max())
        # Head voting and persistent recall: a full budget is still exact; a
        # second call with persistent_steps keeps the first call's selection.
        o_v, info = client.attend(sid, 0, q, retrieval=retrieval_options(token_budget=1 << 30, head_voting=True))
        assert info.exact, info
        worst = max(worst, np.abs(o_v - reference(q, k, v, False)).max())
        keep = retrieval_options(top_k_spans=2, persistent_steps=4)
        _, first = client.attend(sid, 0, q, retrieval=keep)
        _, second = client.attend(sid, 0, q[::-1].copy(), retrieval=keep)
        assert first.recalled_spans == 0 and second.recalled_spans >= 1, (first, second)
        chosen = {(s.rank, s.position_start) for s in first.spans_used if s.kind == 3}
        assert chosen <= {(s.rank, s.position_start) for s in second.spans_used}, (first, second)
        runs = client.retrieve_kv(sid, 0, q[:1], retrieval_options(top_k_spans=3))
        assert 0 < sum(r[2].shape[0] for r in runs) <= 3 * 64, runs
        for rank, start, rk, rv in runs:
            assert np.array_equal(rk, k[start:start + rk.shape[0]]) and np.array_equal(rv, v[start:start + rv.shape[0]])
        # chunk_tokens reaches the server (a negative one is refused naming
        # it) and the runs merge back the same whatever the chunking.
        small = client.retrieve_kv(sid, 0, q[:1], retrieval_options(top_k_spans=3), chunk_tokens=5)
        assert [(r[0], r[1]) for r in small] == [(r[0], r[1]) for r in runs], (small, runs)
        assert all(np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3]) for a, b in zip(small, runs))
        try:
            client.retrieve_kv(sid, 0, q[:1], retrieval_options(top_k_spans=3), chunk_tokens=-1)
            raise AssertionError("expected INVALID_ARGUMENT for chunk_tokens=-1")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk_tokens" in e.details(), e.details()
        o16 = client.attend(sid, 0, q.astype(np.float16), output_dtype="float16")
        assert o16.dtype == np.float16
        # A bad dtype or mode name is a ValueError naming the argument (it was
        # a bare KeyError 'fp16', or numpy's TypeError for dtype=).
        from ringtree_client import retrieval_options as ro
        for bad, field in ((lambda: client.attend(sid, 0, q, output_dtype="fp16"), "output_dtype"),
                           (lambda: client.attend(sid, 0, q, dtype="bf16"), "dtype"),
                           (lambda: client.append_kv(sid, 0, k[:1], v[:1], dtype="bf16"), "dtype"),
                           (lambda: client.create_session(storage_dtype="fp16"), "storage_dtype"),
                           (lambda: ro(top_k_spans=1, score_mode="best"), "score_mode")):
            try:
                bad()
                raise AssertionError("expected ValueError naming " + field)
            except ValueError as e:
                assert str(e).startswith(field + ": "), e
        # float16 stays float16 on the wire in either byte order (a big-endian
        # one went as float32: twice the bytes), with the same values.
        from ringtree_client import to_tensor, from_tensor
        from ringtree.v1 import attention_pb2 as pb
        be = q.astype(">f2")
        assert to_tensor(be).dtype == pb.FLOAT16 and to_tensor(be).data == to_tensor(q.astype(np.float16)).data
        assert np.array_equal(from_tensor(to_tensor(be)), q.astype(np.float16))
        print(f"python client: max |o - reference| = {worst:.2e}")
        assert worst <= 2e-4, worst
        assert client.get_session(sid).layer_tokens[0] == 10128 + 3
        try:
            client.attend("0" * 32, 0, q)
            raise AssertionError("expected NOT_FOUND")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
        try:
            client.attend(sid, 0, q[:, :4])
            raise AssertionError("expected INVALID_ARGUMENT")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "q.shape[1]" in e.details(), e.details()
        # Conditional writes: a stale expected_layer_tokens writes nothing.
        for call in (lambda: client.append_kv(sid, 0, k[:5], v[:5], expected_layer_tokens=10000),
                     lambda: client.decode(sid, 0, q[:1], k[:1], v[:1], expected_layer_tokens=10130),
                     lambda: client.prefill(sid, 0, q[:2], k[:2], v[:2], expected_layer_tokens=0)):
            try:
                call()
                raise AssertionError("expected FAILED_PRECONDITION")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
                assert "holds 10131 tokens" in e.details(), e.details()
        assert client.get_session(sid).layer_tokens[0] == 10131
        # append_kv's own arguments (audit-clients): k and v of different
        # lengths are refused before anything is sent (v's extra tokens were
        # silently dropped: 8 stored of a 12-token v), and so is a bad
        # chunk_tokens naming it (0 raised UNKNOWN "Exception iterating
        # requests!", -1 sent an empty stream).
        sid3 = client.create_session(layers=1, heads=H, kv_heads=HKV, head_dim=D, name="append-args").session_id
        for bad_v, chunk in ((v[:12], 4), (v[:8], -1)):
            try:
                client.append_kv(sid3, 0, k[:8], bad_v, chunk_tokens=chunk)
                raise AssertionError("expected ValueError (v %s, chunk_tokens %d)" % (bad_v.shape, chunk))
            except ValueError as e:
                assert ("chunk_tokens" if chunk < 0 else "same shape") in str(e), e
        assert client.get_session(sid3).layer_tokens[0] == 0
        assert client.append_kv(sid3, 0, k[:8], v[:8], chunk_tokens=0).layer_tokens == 8
        # The default chunking fits a message whatever the shape: 4096 tokens
        # of an MHA 32 x 128 layer (Llama-2-7B) are 64 MiB of K and 64 of V in
        # float16, which one 4096-token message could not carry (the server
        # refused it: RESOURCE_EXHAUSTED "Received message larger than max").
        sid4 = client.create_session(layers=1, heads=32, kv_heads=32, head_dim=128, name="mha").session_id
        big = np.ones((4096, 32, 128), np.float16)
        assert client.append_kv(sid4, 0, big, big).layer_tokens == 4096
        del big
        # A NaN sent as bfloat16 stays NaN, so the server refuses it (NaN
        # payloads whose rounding carried past the exponent became -0.0 or
        # 0.0 and were attended).
        nan_q = q[:1].copy()
        nan_q.view(np.uint32)[0, 0, 0] = 0x7FFFFFFF
        try:
            client.attend(sid3, 0, nan_q, dtype="bfloat16")
            raise AssertionError("expected INVALID_ARGUMENT for a NaN query")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in e.details(), e.details()
        assert client.delete_session(sid3) > 0 and client.delete_session(sid4) > 0
        # Retries are conditional: a retrying client writes once, at the length it saw.
        retrying = AttentionClient(f"127.0.0.1:{port}", timeout=60, write_retries=3)
        sid2 = retrying.create_session(layers=1, heads=H, kv_heads=HKV, head_dim=D, name="caf\u00e9").session_id
        r = retrying.append_kv(sid2, 0, k[:7], v[:7])
        assert r.layer_tokens == 7 and retrying.get_session(sid2).layer_tokens[0] == 7, r
        assert retrying.get_session(sid2).config.name == "caf\u00e9"
        assert retrying.delete_session(sid2) > 0
        # A retrying write whose length read fails names the write and keeps
        # the read's code (it raised GetSession's own error, naming GetSession).
        for write in (lambda: retrying.append_kv("0" * 32, 0, k[:1], v[:1]),
                      lambda: retrying.decode("0" * 32, 0, q[:1], k[:1], v[:1]),
                      lambda: retrying.prefill("0" * 32, 0, q[:1], k[:1], v[:1])):
            try:
                write()
                raise AssertionError("expected NOT_FOUND")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
                assert e.details().startswith(("[AppendKV] reading", "[Decode] reading", "[Prefill] reading")), e.details()
        retrying.close()
        # timeout=0 is no deadline, as in the C++ client (every call failed
        # with DEADLINE_EXCEEDED at once).
        unbounded = AttentionClient(f"127.0.0.1:{port}", timeout=0)
        assert sid in {s.session_id for s in unbounded.list_sessions()}
        unbounded.close()
        # DecodeBatchStream: three layer-steps on one open call, each answer
        # equal to the reference, in order; an empty step ends the stream.
        with client.open_decode_batch_stream() as stream:
            for _ in range(3):
                q = rng.standard_normal((1, H, D), dtype=np.float32)
                dk = rng.standard_normal((1, HKV, D), dtype=np.float32)
                dv = rng.standard_normal((1, HKV, D), dtype=np.float32)
                k, v = np.concatenate([k, dk]), np.concatenate([v, dv])
                (r,) = stream.step(0, [{"session_id": sid, "q": q, "k": dk, "v": dv}])
                assert r.ok and r.first_position == k.shape[0] - 1, (r.code, r.message)
                assert np.abs(r.o - reference(q, k, v, True)).max() <= 2e-4
        stream = client.open_decode_batch_stream()
        try:
            stream.step(0, [])
            raise AssertionError("expected INVALID_ARGUMENT")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "entries" in e.details(), e.details()
        # ... and so does the next step, with the same RpcError (it raised
        # ValueError "the stream is closed", which an except grpc.RpcError missed).
        try:
            stream.step(0, [{"session_id": sid, "q": q, "k": dk, "v": dv}])
            raise AssertionError("expected the stream's INVALID_ARGUMENT again")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "entries" in e.details(), e.details()
        stream.close()  # the error was raised already
        # A stream dropped without close() ends its call: gRPC's thread that
        # reads its requests goes away (it waited for ever before).
        import gc
        import threading
        threads = threading.active_count()
        dropped = client.open_decode_batch_stream()
        assert threading.active_count() > threads
        del dropped
        gc.collect()
        for _ in range(100):
            if threading.active_count() <= threads:
                break
            time.sleep(0.05)
        assert threading.active_count() <= threads, "a dropped DecodeBatchStream left its thread"
        stats = client.stats()
        assert stats.world_size == 2 and sum(r.kv_tokens for r in stats.ranks) == 10134
        assert client.delete_session(sid) > 0
        client.close()
    finally:
        if os.path.exists(pid_file):
            os.kill(int(open(pid_file).read()), signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            code = -1
        log.close()
    print(open(os.path.join(workdir, "log")).read().strip())
    if not os.environ.get("RINGTREE_KEEP_SERVER_DIRS"):  # the log was printed above
        shutil.rmtree(workdir, ignore_errors=True)
    assert code == 0, f"mpirun exited {code}"
    check_prefill_reassembly()
    print("python client test passed")


def check_prefill_reassembly():
    """The client checks the Prefill stream it reassembles: a server (here a
    stand-in that misbehaves on purpose; the real one cannot) whose messages
    skip tokens, or end early, is an error, never a shorter o."""
    from concurrent import futures
    import grpc
    from ringtree_client import AttentionClient, to_tensor
    from ringtree.v1 import attention_pb2 as pb
    H, D = 2, 4
    plans = {"gap": [(0, 2), (3, 1)], "short": [(0, 2)], "short_lse": [(0, 2), (2, 2)]}

    def prefill(request, context):
        plan = request.session_id
        for offset, n in plans[plan]:
            r = pb.PrefillResponse(token_offset=offset, o=to_tensor(np.zeros((n, H, D), np.float32)))
            if request.options.return_lse:
                lse_rows = 1 if plan == "short_lse" and offset > 0 else n
                r.lse.CopyFrom(to_tensor(np.zeros((lse_rows, H, 1), np.float32)[:, :, 0]))
            yield r
    handler = grpc.method_handlers_generic_handler("ringtree.v1.AttentionService", {
        "Prefill": grpc.unary_stream_rpc_method_handler(
            prefill, request_deserializer=pb.PrefillRequest.FromString,
            response_serializer=pb.PrefillResponse.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    q = np.zeros((4, H, D), np.float32)
    kv = np.zeros((4, 1, D), np.float32)
    try:
        with AttentionClient(f"127.0.0.1:{port}", timeout=10) as client:  # closed on the way out
            for plan, lse, want in (("gap", False, "starts at token 3, expected 2"),
                                    ("short", False, "incomplete (2 of 4 tokens)"),
                                    ("short_lse", True, "lse: streamed output is incomplete (3 of 4")):
                try:
                    client.prefill(plan, 0, q, kv, kv, return_lse=lse)
                    raise AssertionError(plan + ": a broken Prefill stream was accepted")
                except RuntimeError as e:
                    assert want in str(e), (plan, str(e))
    finally:
        server.stop(None)


if __name__ == "__main__":
    main()
