"""PyTorch attention backend: a model's attention layers keep their KV in the
RingTree service, one session per sequence (docs/api.md, "PyTorch").

A model's attention layer computes q, k, v (RoPE applied) and calls::

    from ringtree_client import AttentionClient
    from ringtree_client.torch_backend import ServiceAttention

    with ServiceAttention(AttentionClient(address), layers=4, heads=8, kv_heads=2, head_dim=32) as attn:
        outs = attn.prefill(layer, seq_ids, [q0, q1], [k0, k1], [v0, v1])  # prompts: [T_i, H, D] each
        o = attn.decode(layer, seq_ids, q, k, v)   # one token per sequence: q [B, H, D], k/v [B, Hkv, D]

prefill sends one Prefill RPC (ring attention) per sequence; decode sends one
DecodeBatch RPC per layer for the whole batch (tree attention, one engine
step), or with transport="stream" one step on a DecodeBatchStream kept open
across the generation. A sequence's session is created on its first prefill or decode and
deleted by release(seq_id) or close() (also on leaving a `with` block).

Tensors: float32 (and float16) CPU tensors are passed to the wire through
Tensor.numpy() without a copy (views of the batch, no per-sequence copies
either); other dtypes are converted to float32 first. Outputs come back as
float32 tensors (torch.from_numpy on the decoded reply, no further copy), cast
to the query's dtype and device if they differ.

Every write is conditional on the length the backend expects
(expected_layer_tokens), so a layer called twice or out of step with the
service fails loudly (FAILED_PRECONDITION) instead of storing K/V at wrong
positions.
"""
import grpc
import numpy as np
import torch

from .client import retrieval_options  # noqa: F401  (re-exported for callers)


class ServiceAttentionError(RuntimeError):
    """One or more sequences of a call failed; .failures = [(seq_id, code, message)].
    Sequences not listed were applied (their positions advanced)."""

    def __init__(self, method, layer, failures):
        super().__init__("%s layer %d: %s" % (method, layer, "; ".join(
            "sequence %r: %s %s" % (s, getattr(c, "name", c), m) for s, c, m in failures)))
        self.failures = failures


def _numpy(t):
    """torch tensor -> numpy array sharing its memory when it is a contiguous
    float32/float16 CPU tensor (else one conversion)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in (torch.float32, torch.float16):
        t = t.to(torch.float32)
    return t.contiguous().numpy()


class ServiceAttention:
    """Attention of one model whose KV lives in the service, one session per sequence.

    client: an AttentionClient. layers/heads/kv_heads/head_dim: the model's.
    storage_dtype: "float32" or "bfloat16" (K/V storage in the service).
    scale: softmax scale (None = 1/sqrt(head_dim)). retrieval: RetrievalOptions
    (retrieval_options(...)) for retrieval-mode decode, None = exact; prefill
    is always exact. wire_dtype: dtype of q/k/v on the wire (None = the
    tensor's, "bfloat16" halves the bytes of bf16 storage). span_tokens,
    sink_tokens, window_tokens: the sessions' SessionConfig (0 = server
    defaults). conditional: send expected_layer_tokens with every write.
    transport: "unary" (one DecodeBatch call per layer-step) or "stream" (one
    DecodeBatchStream call kept open across steps, opened at the first decode
    and again after a step the server refused as a whole; close() ends it)."""

    def __init__(self, client, layers, heads, kv_heads, head_dim, storage_dtype="float32", scale=None,
                 retrieval=None, wire_dtype=None, span_tokens=0, sink_tokens=0, window_tokens=0,
                 name="torch", conditional=True, transport="unary"):
        if heads % kv_heads:
            raise ValueError("heads (%d) must be a multiple of kv_heads (%d)" % (heads, kv_heads))
        if transport not in ("unary", "stream"):
            raise ValueError("transport: %r, expected \"unary\" or \"stream\"" % (transport,))
        self.transport = transport
        self._stream = None
        self.client = client
        self.layers, self.heads, self.kv_heads, self.head_dim = layers, heads, kv_heads, head_dim
        self.storage_dtype = storage_dtype
        self.scale = 0.0 if scale is None else float(scale)
        self.retrieval = retrieval
        self.wire_dtype = wire_dtype
        self.session_config = dict(span_tokens=span_tokens, sink_tokens=sink_tokens, window_tokens=window_tokens)
        self.name = name
        self.conditional = conditional
        self.sessions = {}   # seq_id -> session_id
        self.tokens = {}     # seq_id -> [stored tokens per layer]
        self.last_retrieval = None  # decode in retrieval mode: [RetrievalInfo] of the last call, in batch order
        # Calls made: Prefill and DecodeBatch per call; DecodeBatchStream
        # counts the steps sent on the open stream (transport="stream").
        self.rpcs = {"Prefill": 0, "DecodeBatch": 0, "DecodeBatchStream": 0}

    # --- sessions ---------------------------------------------------------
    def _session(self, seq_id):
        sid = self.sessions.get(seq_id)
        if sid is None:
            info = self.client.create_session(layers=self.layers, heads=self.heads, kv_heads=self.kv_heads,
                                              head_dim=self.head_dim, storage_dtype=self.storage_dtype,
                                              name="%s/%s" % (self.name, seq_id), **self.session_config)
            sid = self.sessions[seq_id] = info.session_id
            self.tokens[seq_id] = [0] * self.layers
        return sid

    def seq_len(self, seq_id, layer=0):
        """Tokens stored for the sequence in a layer (its next position)."""
        return self.tokens[seq_id][layer] if seq_id in self.tokens else 0

    def release(self, seq_id):
        """Deletes the sequence's session (its KV on every rank)."""
        sid = self.sessions.pop(seq_id, None)
        self.tokens.pop(seq_id, None)
        if sid is not None:
            self.client.delete_session(sid)

    def close(self):
        """Ends the decode stream, if open, and deletes every session of this
        backend (the client stays open)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except grpc.RpcError:
                pass  # the server ended it with an error, already raised to the caller
        for seq_id in list(self.sessions):
            self.release(seq_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # --- checks -----------------------------------------------------------
    def _check(self, name, x, rank, heads):
        if x.dim() != rank or x.shape[-2] != heads or x.shape[-1] != self.head_dim:
            raise ValueError("%s: shape %s, expected %s[..., %d, %d]" % (
                name, tuple(x.shape), "[T, H, D]" if rank == 3 else "[B, H, D]", heads, self.head_dim))

    def _check_layer(self, method, layer):
        # Before any session or index: layer == layers raised IndexError and a
        # negative one read another layer's length (Python's negative index).
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.layers:
            raise ValueError("%s: layer %r, expected 0..%d (layers=%d)" % (method, layer, self.layers - 1,
                                                                           self.layers))

    def _expected(self, seq_id, layer):
        return self.tokens[seq_id][layer] if self.conditional else None

    # --- prefill ----------------------------------------------------------
    def prefill(self, layer, seq_ids, q, k, v):
        """Prompt chunks of several sequences (variable lengths) for one layer.
        q, k, v: lists of per-sequence tensors q [T_i, H, D], k/v [T_i, Hkv, D]
        (or tensors [B, T, H, D] when the lengths are equal). The chunk takes
        the sequence's next positions and attends everything before it plus
        itself causally. Returns the outputs in the same form (list of
        [T_i, H, D], or [B, T, H, D])."""
        self._check_layer("prefill", layer)
        stacked = torch.is_tensor(q)
        if len(seq_ids) != len(q) or len(k) != len(q) or len(v) != len(q):
            raise ValueError("prefill: %d seq_ids, %d q, %d k, %d v" % (len(seq_ids), len(q), len(k), len(v)))
        outs = []
        for seq_id, qi, ki, vi in zip(seq_ids, q, k, v):
            self._check("q", qi, 3, self.heads)
            self._check("k", ki, 3, self.kv_heads)
            self._check("v", vi, 3, self.kv_heads)
            if not (qi.shape[0] == ki.shape[0] == vi.shape[0] >= 1):
                raise ValueError("prefill: sequence %r has %d q, %d k, %d v tokens" % (
                    seq_id, qi.shape[0], ki.shape[0], vi.shape[0]))
            sid = self._session(seq_id)
            o = self.client.prefill(sid, layer, _numpy(qi), _numpy(ki), _numpy(vi), scale=self.scale,
                                    dtype=self.wire_dtype, expected_layer_tokens=self._expected(seq_id, layer))
            self.rpcs["Prefill"] += 1
            self.tokens[seq_id][layer] += qi.shape[0]
            outs.append(self._out(o, qi))
        return torch.stack(outs) if stacked else outs

    # --- decode -----------------------------------------------------------
    def decode(self, layer, seq_ids, q, k, v):
        """One decode step of a batch of sequences for one layer, in one
        DecodeBatch RPC. q [B, H, D] (or [B, 1, H, D]), k/v [B, Hkv, D] (or
        [B, 1, Hkv, D]): one new token per sequence, at its next position.
        Returns o shaped like q. In retrieval mode the RetrievalInfo of each
        sequence is in self.last_retrieval."""
        self._check_layer("decode", layer)
        shape = q.shape
        if q.dim() == 4:
            q, k, v = q.squeeze(1), k.squeeze(1), v.squeeze(1)
        self._check("q", q, 3, self.heads)
        self._check("k", k, 3, self.kv_heads)
        self._check("v", v, 3, self.kv_heads)
        if not (len(seq_ids) == q.shape[0] == k.shape[0] == v.shape[0]):
            raise ValueError("decode: %d seq_ids, q %s, k %s, v %s" % (
                len(seq_ids), tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("decode: a sequence appears twice in seq_ids (one token per sequence per step)")
        qn, kn, vn = _numpy(q), _numpy(k), _numpy(v)
        entries = []
        for i, seq_id in enumerate(seq_ids):
            entry = {"session_id": self._session(seq_id), "q": qn[i:i + 1], "k": kn[i:i + 1], "v": vn[i:i + 1]}
            if self.retrieval is not None:
                entry["retrieval"] = self.retrieval
            if self.conditional:
                entry["expected_layer_tokens"] = self.tokens[seq_id][layer]
            entries.append(entry)
        results = self._decode_entries(layer, entries)
        failures = []
        for seq_id, r in zip(seq_ids, results):
            if r.ok:
                self.tokens[seq_id][layer] += 1
            else:
                failures.append((seq_id, r.code, r.message))
        if failures:
            raise ServiceAttentionError("decode", layer, failures)
        if self.retrieval is not None:
            self.last_retrieval = [r.retrieval for r in results]
        o = np.concatenate([r.o for r in results]) if len(results) > 1 else results[0].o
        return self._out(o, q).reshape(shape)

    def _decode_entries(self, layer, entries):
        """All entries of one layer's decode step -> per-entry results (.ok,
        .code, .message, .o, .retrieval), in entry order."""
        if self.transport == "unary":
            results = self.client.decode_batch(layer, entries, scale=self.scale, dtype=self.wire_dtype)
            self.rpcs["DecodeBatch"] += 1
            return results
        if self._stream is None:
            self._stream = self.client.open_decode_batch_stream()
        try:
            results = self._stream.step(layer, entries, scale=self.scale, dtype=self.wire_dtype)
        except (grpc.RpcError, RuntimeError):
            self._stream = None  # the stream has ended; the next decode opens another
            raise
        self.rpcs["DecodeBatchStream"] += 1
        return results

    def _out(self, o, like):
        t = torch.from_numpy(o)
        if t.dtype != like.dtype or like.device.type != "cpu":
            t = t.to(dtype=like.dtype, device=like.device)
        return t
