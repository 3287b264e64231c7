#!/usr/bin/python3
"""The PyTorch backend (ringtree_client.torch_backend) against a real attnserve
under mpirun -np 2 on loopback.

The Llama-style example model (python/examples/llama_service.py: 4 layers,
hidden 256, 8 heads, 2 KV heads, head_dim 32, RoPE, SwiGLU, random weights),
a batch of 4 sequences with prompts of 23, 70, 131 and 190 tokens:

1. Exact, fp32 storage: the model with its KV in the service and the same
   model with PyTorch attention over a local KV cache run in lockstep (both
   fed the reference's greedy tokens); the logits of the whole prefill and of
   each of 40 decode steps agree within TOLERANCE * max |reference logit|,
   every decode step is one DecodeBatch RPC per layer, and the greedy tokens
   are the same.
2. Retrieval mode with a token budget covering everything (span_tokens 16,
   so spans are scored and selected on both ranks): every decode reports
   exact attention, and free-running greedy generation gives the reference's
   tokens.
3. A write out of step with the service (a layer decoded twice) fails with
   FAILED_PRECONDITION for that sequence only; close() deletes every session;
   SIGTERM stops the server with exit 0.
"""
import argparse
import os
import sys
import time

import torch

# Measured on the project's machine: max |logit diff| / max |logit| = 2-3e-6
# (fp32 rounding: the local model's own prefill-vs-incremental logits differ by
# as much); 2e-5 leaves 10x of headroom and still catches any wrong position,
# mask or head mapping (those give 1e-1 and more).
TOLERANCE = 2e-5
PROMPT_LENGTHS = [23, 70, 131, 190]
DECODE_STEPS = 40


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--attnserve", required=True)
    parser.add_argument("--python-path", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.python_path)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python", "examples"))
    import grpc
    from ringtree_client import AttentionClient
    from ringtree_client.torch_backend import ServiceAttention, ServiceAttentionError, retrieval_options
    from llama_service import Config, LocalAttention, LocalServer, TinyLlama, decode_step, generate, prefill_step

    torch.set_num_threads(1)
    cfg = Config()
    model = TinyLlama(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    seq_ids = ["seq%d" % i for i in range(len(prompts))]
    shape = (cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim)

    server = LocalServer(args.attnserve)
    started = time.time()
    try:
        client = AttentionClient(server.address, timeout=120)

        # 1. Exact decode through DecodeBatch, lockstep with the local model.
        ref = LocalAttention(*shape)
        worst, scale = 0.0, 0.0
        with ServiceAttention(client, *shape, storage_dtype="float32", name="torch-test") as attn:
            t0 = time.time()

            def compare(step, a, b):
                nonlocal worst, scale
                d, s = (a - b).abs().max().item(), b.abs().max().item()
                assert d <= TOLERANCE * s, "%s: max |logit diff| %.3e > %.0e * max |logit| %.2f" % (
                    step, d, TOLERANCE, s)
                worst, scale = max(worst, d), max(scale, s)
            logits, last = prefill_step(model, attn, seq_ids, prompts)
            ref_logits, ref_last = prefill_step(model, ref, seq_ids, prompts)
            compare("prefill", logits, ref_logits)
            ref_tokens = []
            for step in range(DECODE_STEPS):
                tokens = ref_last.argmax(-1)
                assert torch.equal(last.argmax(-1), tokens), "greedy tokens differ before decode step %d" % step
                ref_tokens.append(tokens)
                last = decode_step(model, attn, seq_ids, tokens)
                ref_last = decode_step(model, ref, seq_ids, tokens)
                compare("decode step %d" % step, last, ref_last)
            elapsed = time.time() - t0
            assert attn.rpcs["DecodeBatch"] == cfg.layers * DECODE_STEPS, attn.rpcs
            assert attn.rpcs["Prefill"] == cfg.layers * len(seq_ids), attn.rpcs
            for s, n in zip(seq_ids, PROMPT_LENGTHS):
                info = client.get_session(attn.sessions[s])
                assert list(info.layer_tokens) == [n + DECODE_STEPS] * cfg.layers, info
            print("exact: prefill + %d decode steps x %d sequences, %d layers: max |logit diff| %.2e, "
                  "max |logit| %.2f, ratio %.2e (tolerance %.0e); %.1f s, RPCs %s" % (
                      DECODE_STEPS, len(seq_ids), cfg.layers, worst, scale, worst / scale, TOLERANCE, elapsed,
                      attn.rpcs))

            # 3a. A layer decoded twice in one step is out of step with the
            # service: that sequence fails, the others are applied.
            attn.tokens["seq1"][0] -= 1
            q = torch.randn(len(seq_ids), cfg.heads, cfg.head_dim)
            kv = torch.randn(len(seq_ids), cfg.kv_heads, cfg.head_dim)
            try:
                attn.decode(0, seq_ids, q, kv, kv)
                raise AssertionError("expected ServiceAttentionError")
            except ServiceAttentionError as e:
                assert [f[0] for f in e.failures] == ["seq1"], e.failures
                assert e.failures[0][1] == grpc.StatusCode.FAILED_PRECONDITION, e.failures
            for s, n in zip(seq_ids, PROMPT_LENGTHS):
                got = client.get_session(attn.sessions[s]).layer_tokens[0]
                assert got == n + DECODE_STEPS + (s != "seq1"), (s, got)
            # 3c. A layer outside the model is a ValueError naming it, before
            # any call (layers raised IndexError, -1 sent the last layer's
            # length as expected_layer_tokens).
            for bad in (cfg.layers, -1):
                for call in (lambda: attn.decode(bad, seq_ids, q, kv, kv),
                             lambda: attn.prefill(bad, seq_ids[:1], [q[:1]], [kv[:1]], [kv[:1]])):
                    try:
                        call()
                        raise AssertionError("expected ValueError for layer %d" % bad)
                    except ValueError as e:
                        assert "layer %d" % bad in str(e), e
            sessions = dict(attn.sessions)
        # 3b. close() (leaving the with block) deleted the sessions.
        live = {s.session_id for s in client.list_sessions()}
        assert not live & set(sessions.values()), live

        # 1b. The same lockstep decode with every layer-step on one open
        # DecodeBatchStream; a step refused as a whole (an empty batch: the
        # message's INVALID_ARGUMENT ends the stream) raises, and the next
        # decode opens a new stream.
        ref = LocalAttention(*shape)
        with ServiceAttention(client, *shape, name="torch-stream", transport="stream") as attn:
            t0 = time.time()
            logits, last = prefill_step(model, attn, seq_ids, prompts)
            ref_logits, ref_last = prefill_step(model, ref, seq_ids, prompts)
            worst_stream = (logits - ref_logits).abs().max().item()
            for step in range(DECODE_STEPS):
                tokens = ref_last.argmax(-1)
                assert torch.equal(last.argmax(-1), tokens), "stream: greedy tokens differ before step %d" % step
                assert torch.equal(tokens, ref_tokens[step]), "stream: tokens differ from the unary run"
                last = decode_step(model, attn, seq_ids, tokens)
                ref_last = decode_step(model, ref, seq_ids, tokens)
                d, s = (last - ref_last).abs().max().item(), ref_last.abs().max().item()
                assert d <= TOLERANCE * s, "stream decode step %d: %.3e > %.0e * %.2f" % (step, d, TOLERANCE, s)
                worst_stream = max(worst_stream, d)
            elapsed_stream = time.time() - t0
            assert attn.rpcs["DecodeBatchStream"] == cfg.layers * DECODE_STEPS, attn.rpcs
            assert attn.rpcs["DecodeBatch"] == 0, attn.rpcs
            q = torch.randn(len(seq_ids), cfg.heads, cfg.head_dim)
            kv = torch.randn(len(seq_ids), cfg.kv_heads, cfg.head_dim)
            try:
                attn.decode(0, [], q[:0], kv[:0], kv[:0])
                raise AssertionError("expected a refusal of the whole step")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            assert attn._stream is None
            attn.decode(0, seq_ids, q, kv, kv)
            assert attn.rpcs["DecodeBatchStream"] == cfg.layers * DECODE_STEPS + 1, attn.rpcs
            for s, n in zip(seq_ids, PROMPT_LENGTHS):
                assert client.get_session(attn.sessions[s]).layer_tokens[0] == n + DECODE_STEPS + 1
        print("stream: prefill + %d decode steps on one DecodeBatchStream: max |logit diff| %.2e; %.1f s "
              "(unary: %.1f s)" % (DECODE_STEPS, worst_stream, elapsed_stream, elapsed))

        # 2. Retrieval mode with a budget covering everything: same tokens.
        ref = LocalAttention(*shape)
        ref_gen, _ = generate(model, ref, seq_ids, prompts, DECODE_STEPS)
        assert torch.equal(ref_gen, torch.stack(ref_tokens, 1))
        infos = []
        budget = retrieval_options(token_budget=1 << 30)
        with ServiceAttention(client, *shape, retrieval=budget, span_tokens=16, name="torch-retrieval") as attn:
            decode = attn.decode

            def recording_decode(*a):
                o = decode(*a)
                infos.extend(attn.last_retrieval)
                return o
            attn.decode = recording_decode
            t0 = time.time()
            gen, _ = generate(model, attn, seq_ids, prompts, DECODE_STEPS)
            elapsed = time.time() - t0
            assert attn.rpcs["DecodeBatch"] == cfg.layers * DECODE_STEPS, attn.rpcs
        assert len(infos) == cfg.layers * DECODE_STEPS * len(seq_ids)
        assert all(i.exact for i in infos), [i for i in infos if not i.exact][:1]
        assert sum(i.selected_spans for i in infos) > 0
        assert torch.equal(gen, ref_gen), (gen, ref_gen)
        print("retrieval (token_budget covering everything, span_tokens 16): %d decode steps, all exact, "
              "%d spans selected in all, same %d tokens; %.1f s" % (
                  DECODE_STEPS, sum(i.selected_spans for i in infos), gen.numel(), elapsed))
        client.close()
    finally:
        code = server.stop()
    print(open(server.log_path).read().strip().splitlines()[-1])
    assert code == 0, "mpirun exited %d" % code
    print("torch backend test passed in %.1f s" % (time.time() - started))


if __name__ == "__main__":
    main()
