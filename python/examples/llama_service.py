#!/usr/bin/python3
"""A small Llama-style decoder whose attention KV lives in the RingTree service.

Random weights: token embedding, N layers of (RMSNorm, attention with RoPE and
GQA, RMSNorm, SwiGLU MLP), final RMSNorm, LM head. A batch of sequences with
different prompt lengths is prefilled (one Prefill RPC per sequence and
layer, ring attention) and then generates greedily, one DecodeBatch RPC per
layer per step for the whole batch (tree attention); the K/V of every layer
of every sequence stay in the service (ringtree_client.torch_backend).

    /usr/bin/python3 python/examples/llama_service.py                 # starts attnserve (2 ranks, loopback)
    /usr/bin/python3 python/examples/llama_service.py --address 127.0.0.1:50051
    ... --check              # also runs the model with local PyTorch attention and compares logits
    ... --retrieval-budget N # retrieval-mode decode with a token budget of N

The model (TinyLlama), the local attention (LocalAttention) and the server
starter (LocalServer) are used by tests/service/test_torch_backend.py too.
"""
import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Config:
    def __init__(self, vocab=1000, hidden=256, layers=4, heads=8, kv_heads=2, head_dim=32, ffn=688,
                 rope_theta=10000.0, eps=1e-5):
        self.vocab, self.hidden, self.layers = vocab, hidden, layers
        self.heads, self.kv_heads, self.head_dim, self.ffn = heads, kv_heads, head_dim, ffn
        self.rope_theta, self.eps = rope_theta, eps


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, positions, theta):
    """Rotary embedding (Llama's rotate-half form). x [N, heads, D], positions [N]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]   # [N, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]        # [N, 1, D]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class TinyLlama(torch.nn.Module):
    """Llama-style decoder with random weights. Tokens of all sequences are
    packed: forward(tokens [N], positions [N], seq_ids, lengths, attn, prefill)
    where sequence i owns lengths[i] consecutive tokens; attention goes to
    attn (ServiceAttention or LocalAttention): attn.prefill(layer, seq_ids,
    [q_i], [k_i], [v_i]) for prompts, attn.decode(layer, seq_ids, q, k, v) for
    one token per sequence."""

    def __init__(self, cfg, seed=0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)

        def w(*shape, std):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * std, requires_grad=False)

        h, c = cfg.hidden, cfg
        self.embed = w(c.vocab, h, std=1.0)
        self.layers = torch.nn.ModuleList()
        for _ in range(c.layers):
            layer = torch.nn.Module()
            layer.attn_norm = torch.nn.Parameter(1.0 + 0.1 * torch.randn(h, generator=g), requires_grad=False)
            # q/k larger than 1/sqrt(h) so attention is peaked (positions matter), not near-uniform.
            layer.wq = w(c.heads * c.head_dim, h, std=2.0 / math.sqrt(h))
            layer.wk = w(c.kv_heads * c.head_dim, h, std=2.0 / math.sqrt(h))
            layer.wv = w(c.kv_heads * c.head_dim, h, std=1.0 / math.sqrt(h))
            layer.wo = w(h, c.heads * c.head_dim, std=1.0 / math.sqrt(c.heads * c.head_dim))
            layer.mlp_norm = torch.nn.Parameter(1.0 + 0.1 * torch.randn(h, generator=g), requires_grad=False)
            layer.w_gate = w(c.ffn, h, std=1.0 / math.sqrt(h))
            layer.w_up = w(c.ffn, h, std=1.0 / math.sqrt(h))
            layer.w_down = w(h, c.ffn, std=1.0 / math.sqrt(c.ffn))
            self.layers.append(layer)
        self.final_norm = torch.nn.Parameter(torch.ones(h), requires_grad=False)
        self.lm_head = w(c.vocab, h, std=1.0 / math.sqrt(h))

    @torch.no_grad()
    def forward(self, tokens, positions, seq_ids, lengths, attn, prefill):
        c = self.cfg
        x = self.embed[tokens]                                              # [N, hidden]
        for i, layer in enumerate(self.layers):
            hn = rms_norm(x, layer.attn_norm, c.eps)
            q = (hn @ layer.wq.T).view(-1, c.heads, c.head_dim)
            k = (hn @ layer.wk.T).view(-1, c.kv_heads, c.head_dim)
            v = (hn @ layer.wv.T).view(-1, c.kv_heads, c.head_dim)
            q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
            if prefill:
                outs = attn.prefill(i, seq_ids, q.split(lengths), k.split(lengths), v.split(lengths))
                o = torch.cat(outs)
            else:
                o = attn.decode(i, seq_ids, q, k, v)
            x = x + o.reshape(-1, c.heads * c.head_dim) @ layer.wo.T
            hn = rms_norm(x, layer.mlp_norm, c.eps)
            x = x + (torch.nn.functional.silu(hn @ layer.w_gate.T) * (hn @ layer.w_up.T)) @ layer.w_down.T
        return rms_norm(x, self.final_norm, c.eps) @ self.lm_head.T        # [N, vocab]


class LocalAttention:
    """The reference: PyTorch attention over a local KV cache, same interface
    as ServiceAttention (float32, causal, GQA, scale 1/sqrt(head_dim))."""

    def __init__(self, layers, heads, kv_heads, head_dim):
        self.layers, self.heads, self.kv_heads, self.head_dim = layers, heads, kv_heads, head_dim
        self.kv = {}  # seq_id -> per layer [k [L, Hkv, D], v [L, Hkv, D]]

    def seq_len(self, seq_id, layer=0):
        return self.kv[seq_id][layer][0].shape[0] if seq_id in self.kv else 0

    def _attend(self, layer, seq_id, q, k, v):
        cache = self.kv.setdefault(seq_id, [[torch.zeros(0, self.kv_heads, self.head_dim)] * 2
                                            for _ in range(self.layers)])
        K = torch.cat([cache[layer][0], k])
        V = torch.cat([cache[layer][1], v])
        cache[layer] = [K, V]
        group = self.heads // self.kv_heads
        Kh, Vh = K.repeat_interleave(group, 1).transpose(0, 1), V.repeat_interleave(group, 1).transpose(0, 1)
        s = q.transpose(0, 1) @ Kh.transpose(1, 2) / math.sqrt(self.head_dim)   # [H, T, L]
        T, L = q.shape[0], K.shape[0]
        mask = torch.arange(L)[None, :] > (L - T + torch.arange(T))[:, None]
        s = s.masked_fill(mask, float("-inf"))
        return (torch.softmax(s, -1) @ Vh).transpose(0, 1)                       # [T, H, D]

    def prefill(self, layer, seq_ids, q, k, v):
        return [self._attend(layer, s, qi, ki, vi) for s, qi, ki, vi in zip(seq_ids, q, k, v)]

    def decode(self, layer, seq_ids, q, k, v):
        return torch.cat([self._attend(layer, s, q[i:i + 1], k[i:i + 1], v[i:i + 1])
                          for i, s in enumerate(seq_ids)])

    def close(self):
        self.kv.clear()


def prefill_step(model, attn, seq_ids, prompts):
    """Runs the prompts (lists of token ids) of a batch; returns all logits
    [sum of lengths, vocab] and the last-token logits [B, vocab]."""
    lengths = [len(p) for p in prompts]
    tokens = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(attn.seq_len(s), attn.seq_len(s) + n) for s, n in zip(seq_ids, lengths)])
    logits = model(tokens, positions, seq_ids, lengths, attn, prefill=True)
    last = torch.cumsum(torch.tensor(lengths), 0) - 1
    return logits, logits[last]


def decode_step(model, attn, seq_ids, tokens):
    """One token per sequence; returns logits [B, vocab]."""
    positions = torch.tensor([attn.seq_len(s) for s in seq_ids])
    return model(torch.as_tensor(tokens), positions, seq_ids, [1] * len(seq_ids), attn, prefill=False)


def generate(model, attn, seq_ids, prompts, steps):
    """Greedy generation; returns the generated tokens [B, steps] and the
    logits of every step (prefill's last-token logits first)."""
    _, logits = prefill_step(model, attn, seq_ids, prompts)
    history, out = [logits], []
    for _ in range(steps):
        tokens = logits.argmax(-1)
        out.append(tokens)
        logits = decode_step(model, attn, seq_ids, tokens)
        history.append(logits)
    return torch.stack(out, 1), history


def find_python_dir(build):
    for b in [build, os.path.join(ROOT, "build")]:
        if b and os.path.exists(os.path.join(b, "rpc", "python", "ringtree_client")):
            return os.path.join(b, "rpc", "python")
    raise SystemExit("ringtree_client not found under %s/rpc/python: build first (launch/build)" % build)


class LocalServer:
    """attnserve under `mpirun -np ranks` on a free loopback port; stopped
    with SIGTERM to rank 0 (every rank exits 0)."""

    def __init__(self, attnserve, ranks=2, args=()):
        self.dir = tempfile.mkdtemp(prefix="attnserve-torch-")
        port_file, self.pid_file = os.path.join(self.dir, "port"), os.path.join(self.dir, "pid")
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        self.log_path = os.path.join(self.dir, "log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none", attnserve,
                                      "--listen", "127.0.0.1:0", "--port-file", port_file,
                                      "--pid-file", self.pid_file, *args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(1200):
            if os.path.exists(port_file) and os.path.exists(self.pid_file) and open(port_file).read().strip():
                break
            if self.proc.poll() is not None:
                raise SystemExit("attnserve exited early:\n" + open(self.log_path).read())
            time.sleep(0.05)
        self.address = "127.0.0.1:%d" % int(open(port_file).read())

    def stop(self):
        """SIGTERM to rank 0; returns mpirun's exit code."""
        if os.path.exists(self.pid_file):
            os.kill(int(open(self.pid_file).read()), signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = -1
        self.log.close()
        return code


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="a running attnserve (default: start one with 2 ranks on loopback)")
    parser.add_argument("--build-dir", default=os.environ.get("BUILD_DIR", os.path.join(ROOT, "build")))
    parser.add_argument("--prompt-lengths", default="23,70,131,190", help="one sequence per length")
    parser.add_argument("--steps", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--retrieval-budget", type=int, default=0, help="retrieval-mode decode with this token budget")
    parser.add_argument("--check", action="store_true", help="compare with local PyTorch attention")
    parser.add_argument("--transport", default="unary", choices=["unary", "stream"],
                        help="decode steps as DecodeBatch calls or on one DecodeBatchStream")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, find_python_dir(args.build_dir))
    from ringtree_client import AttentionClient
    from ringtree_client.torch_backend import ServiceAttention, retrieval_options

    torch.set_num_threads(1)
    cfg = Config(layers=args.layers)
    model = TinyLlama(cfg, seed=args.seed)
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, cfg.vocab, (n,), generator=g).tolist() for n in lengths]
    seq_ids = ["seq%d" % i for i in range(len(prompts))]

    server = None
    if not args.address:
        server = LocalServer(os.path.join(args.build_dir, "coordinator", "attnserve"))
        print("started attnserve (2 ranks) at", server.address)
    status = 0
    try:
        client = AttentionClient(args.address or server.address, timeout=120)
        retrieval = retrieval_options(token_budget=args.retrieval_budget) if args.retrieval_budget else None
        print("model: %d layers, hidden %d, %d heads, %d kv heads, head_dim %d, vocab %d; prompts %s; KV %s%s" % (
            cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.vocab, lengths, args.storage_dtype,
            ", retrieval budget %d" % args.retrieval_budget if retrieval else ""))
        with ServiceAttention(client, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim,
                              storage_dtype=args.storage_dtype, retrieval=retrieval, name="llama",
                              transport=args.transport) as attn:
            start = time.time()
            tokens, history = generate(model, attn, seq_ids, prompts, args.steps)
            elapsed = time.time() - start
            stored = [client.get_session(attn.sessions[s]).layer_tokens[0] for s in seq_ids]
            print("generated %d tokens x %d sequences in %.2f s (%s RPCs: %s); KV in the service: %s tokens per layer" % (
                args.steps, len(seq_ids), elapsed, sum(attn.rpcs.values()),
                ", ".join("%s %d" % kv for kv in attn.rpcs.items() if kv[1]), stored))
        for s, p, t in zip(seq_ids, prompts, tokens.tolist()):
            print("  %s (prompt %3d): %s" % (s, len(p), " ".join(map(str, t[:16])) + (" ..." if len(t) > 16 else "")))
        if args.check:
            ref = LocalAttention(cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim)
            ref_tokens, ref_history = generate(model, ref, seq_ids, prompts, args.steps)
            # Logits are comparable while both runs have fed the same tokens:
            # up to the first step where a generated token differs.
            differ = (tokens != ref_tokens).any(0).nonzero()
            upto = int(differ[0]) + 1 if len(differ) else len(history)
            diff = max((a - b).abs().max().item() for a, b in zip(history[:upto], ref_history[:upto]))
            scale = max(b.abs().max().item() for b in ref_history[:upto])
            same = len(differ) == 0
            print("check against local PyTorch attention: max |logit diff| %.2e (logits up to %.1f)%s, tokens %s" % (
                diff, scale, "" if same else " over the first %d steps" % upto,
                "identical" if same else "identical for the first %d steps" % (upto - 1)))
            status = 0 if same else 1
        client.close()
    finally:
        if server is not None:
            code = server.stop()
            print("attnserve stopped (exit %d)" % code)
            status = status or (code != 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
