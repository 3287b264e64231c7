"""AttentionClient: numpy in, numpy out, over gRPC (see __init__.py)."""
import grpc
import numpy as np

from ringtree.v1 import attention_pb2 as pb
from ringtree.v1 import attention_pb2_grpc as pb_grpc

_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}
_SCORE_MODES = {"blend": pb.BLEND, "upper": pb.UPPER_BOUND, "mean": pb.MEAN_KEY,
                "reps": pb.REPRESENTATIVE}


def _choice(table, value, field):
    """table[value], or ValueError naming the argument and its choices (a bad
    name raised a bare KeyError, or numpy's TypeError for to_tensor's dtype)."""
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError("%s: %r, expected one of %s" % (field, value, ", ".join(sorted(table)))) from None


def retrieval_options(top_k_spans=0, token_budget=0, mass_tolerance=None, score_mode=None,
                      head_voting=False, persistent_steps=0):
    """ringtree.v1.RetrievalOptions for decode/attend/retrieve_kv (see docs/api.md).
    score_mode: "blend", "upper", "mean", "reps"; None = the server's default
    (REPRESENTATIVE, which is BLEND unless attnserve keeps index vectors)."""
    r = pb.RetrievalOptions(top_k_spans=top_k_spans, token_budget=token_budget,
                            score_mode=(_choice(_SCORE_MODES, score_mode, "score_mode") if score_mode
                                        else pb.SPAN_SCORE_MODE_UNSPECIFIED),
                            head_voting=head_voting, persistent_steps=persistent_steps)
    if mass_tolerance is not None:
        r.mass_tolerance = mass_tolerance
    return r


def _to_bfloat16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    # A NaN stays a (quiet) NaN: rounding its payload could carry into the
    # exponent (Inf) or wrap past 2^32 (+-0), hiding it from the server's check.
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def to_tensor(array, dtype=None):
    """numpy array -> ringtree.v1.Tensor. dtype: "float32", "float16" or
    "bfloat16"; default: float16 arrays stay float16, everything else float32."""
    array = np.asarray(array)
    if dtype is not None:
        _choice(_DTYPES, dtype, "dtype")
    if dtype is None:
        # Any byte order: a big-endian float16 array is float16 too.
        dtype = "float16" if array.dtype.kind == "f" and array.dtype.itemsize == 2 else "float32"
    if dtype == "bfloat16":
        data = _to_bfloat16_bits(array.astype(np.float32)).tobytes()
    else:
        data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=_DTYPES[dtype], shape=list(array.shape), data=data)


def from_tensor(tensor):
    """ringtree.v1.Tensor -> numpy array (float32, or float16 if sent as such)."""
    shape = tuple(tensor.shape)
    if tensor.dtype == pb.FLOAT32:
        return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).copy()
    if tensor.dtype == pb.FLOAT16:
        return np.frombuffer(tensor.data, dtype="<f2").reshape(shape).copy()
    if tensor.dtype == pb.BFLOAT16:
        bits = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32).reshape(shape).copy()
    raise ValueError("tensor has no dtype")


class AppliedEarlierError(Exception):
    """A retried prefill/decode found that an earlier attempt was applied (its
    reply was lost): the tokens are stored once, the output is not available."""

    def __init__(self, method, expected, tokens):
        super().__init__("%s: an earlier attempt was applied (the layer went from %d to %d tokens) but its "
                         "reply was lost; the output is not available" % (method, expected, expected + tokens))
        self.layer_tokens = expected + tokens


class WriteRpcError(grpc.RpcError):
    """A write's failure found by the client, as a grpc.RpcError (code(),
    details()): the length read before a retrying write failed; details()
    names the write's method, then the read's own error."""

    def __init__(self, code, details):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def __str__(self):
        return "%s: %s" % (self._code.name, self._details)


class BatchResult:
    """One entry's answer in a decode_batch/attend_batch: ok, code
    (grpc.StatusCode), message; when ok: o [T, H, D], lse [T, H] (with
    return_lse, else None), first_position (decode), layer_tokens, retrieval
    (RetrievalInfo for retrieval entries, else None)."""
    __slots__ = ("ok", "code", "message", "o", "lse", "first_position", "layer_tokens", "retrieval")

    def __init__(self, r, return_lse):
        self.code = _STATUS_CODES.get(r.status.code, grpc.StatusCode.UNKNOWN)
        self.ok = self.code == grpc.StatusCode.OK
        self.message = r.status.message
        self.o = from_tensor(r.o) if self.ok else None
        self.lse = from_tensor(r.lse) if self.ok and return_lse else None
        self.first_position = getattr(r, "first_position", 0)
        self.layer_tokens = r.layer_tokens
        self.retrieval = r.retrieval if r.HasField("retrieval") else None

    def __repr__(self):
        return "BatchResult(%s%s)" % (self.code.name, "" if self.ok else ": " + self.message)


_STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}


class DecodeBatchStream:
    """One open DecodeBatchStream call: step() sends one layer-step and
    returns its BatchResults (as decode_batch), in order. The client's
    timeout does not apply (the stream lives as long as the generation). A
    step refused as a whole ends the stream: grpc.RpcError with the
    server's status, then and on later steps."""

    def __init__(self, client):
        import queue
        self._client = client
        self._requests = queue.Queue()
        self._responses = client.stub.DecodeBatchStream(iter(self._requests.get, None), metadata=client.metadata)
        self._closed = False
        self._error = None  # the server's grpc.RpcError that ended the stream

    def step(self, layer, entries, scale=0.0, return_lse=False, output_dtype="float32", dtype=None):
        if self._error is not None:
            raise self._error  # the server's status, on every later step too
        if self._closed:
            raise ValueError("DecodeBatchStream: the stream is closed")
        self._requests.put(self._client._decode_batch_request(layer, entries, scale, return_lse, output_dtype,
                                                              dtype))
        try:
            response = next(self._responses)
        except StopIteration:
            self._end()
            raise RuntimeError("DecodeBatchStream: the server ended the stream") from None
        except grpc.RpcError as e:
            self._error = e
            self._end()
            raise
        return [BatchResult(r, return_lse) for r in response.results]

    def close(self):
        """Ends the stream (raises grpc.RpcError if the server ended it with an error)."""
        if self._closed:
            return
        self._end()
        for _ in self._responses:
            pass

    def _end(self):
        self._closed = True
        self._requests.put(None)  # ends the request iterator gRPC's thread reads

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._end()
            self._responses.cancel()
        return False

    def __del__(self):
        # A stream dropped without close(): end the call, or gRPC's thread
        # that reads the requests would wait for the next one for ever.
        try:
            if not self._closed:
                self._end()
                self._responses.cancel()
        except Exception:  # interpreter shutdown: nothing left to free
            pass


class AttentionClient:
    """Thread-safe client. Failed calls raise grpc.RpcError (e.code(), e.details()).

    timeout: seconds per call (None or 0 = no deadline).

    write_retries: append_kv/prefill/decode calls that fail with
    DEADLINE_EXCEEDED or UNAVAILABLE are sent again up to this many times,
    conditionally (expected_layer_tokens = the layer's length before the first
    attempt), so a write whose reply was lost is never applied twice. Assumes
    one writer per layer."""

    def __init__(self, address="127.0.0.1:50051", token=None, root_certificates=None, timeout=None,
                 max_message_bytes=256 << 20, write_retries=0):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.AttentionServiceStub(self.channel)
        self.metadata = [("authorization", "Bearer " + token)] if token else None
        self.timeout = timeout
        self.write_retries = write_retries

    _RETRYABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)

    def _write(self, method, session_id, layer, tokens, expected, attempt, applied):
        """Runs attempt(expected) with the write_retries policy (see class doc)."""
        if self.write_retries > 0 and expected is None:
            # The layer's length, read first so that every attempt is
            # conditional, under the same retry policy as the write.
            for pre in range(self.write_retries + 1):
                try:
                    info = self.get_session(session_id)
                    break
                except grpc.RpcError as e:
                    if pre >= self.write_retries or e.code() not in self._RETRYABLE:
                        # The write's failure, with its code and its method named (docs/api.md).
                        raise WriteRpcError(e.code(), "[%s] reading the layer's length before the write: %s"
                                            % (method, e.details())) from e
            if 0 <= layer < len(info.layer_tokens):
                expected = info.layer_tokens[layer]
        tries = 0
        while True:
            try:
                return attempt(expected)
            except grpc.RpcError as e:
                code = e.code()
                if tries > 0 and code == grpc.StatusCode.FAILED_PRECONDITION and expected is not None:
                    try:
                        info = self.get_session(session_id)
                    except grpc.RpcError:
                        raise e from None  # the write's error, not the check's
                    if layer < len(info.layer_tokens) and info.layer_tokens[layer] == expected + tokens:
                        return applied(expected)
                    raise
                if tries >= self.write_retries or code not in self._RETRYABLE:
                    raise
                tries += 1

    def _kw(self):
        # timeout 0 (or None) = no deadline, as ClientOptions::timeout and
        # health() (0 made every call DEADLINE_EXCEEDED at once).
        return {"metadata": self.metadata, "timeout": self.timeout or None}

    # --- sessions ---------------------------------------------------------
    def create_session(self, layers=1, heads=8, kv_heads=8, head_dim=64, storage_dtype="float32",
                       span_tokens=0, sink_tokens=0, window_tokens=0, name="", attention_window=0,
                       span_boundaries="fixed"):
        """attention_window > 0: sliding-window attention (Decode and Prefill
        see the last attention_window positions; Attend needs retrieval and
        then sees every stored span); not retrieval's window_tokens.
        span_boundaries: "fixed" or "discovered" (Prefill's spans follow its
        own attention, Ltri-LLM)."""
        if span_boundaries not in ("fixed", "discovered"):
            raise ValueError("span_boundaries: 'fixed' or 'discovered', got %r" % (span_boundaries,))
        config = pb.SessionConfig(layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                  storage_dtype=_choice(_DTYPES, storage_dtype, "storage_dtype"), span_tokens=span_tokens,
                                  sink_tokens=sink_tokens, window_tokens=window_tokens, name=name,
                                  attention_window=attention_window,
                                  span_boundaries=pb.SPAN_BOUNDARIES_DISCOVERED if span_boundaries == "discovered"
                                  else pb.SPAN_BOUNDARIES_FIXED)
        return self.stub.CreateSession(pb.CreateSessionRequest(config=config), **self._kw())

    def get_session(self, session_id):
        return self.stub.GetSession(pb.GetSessionRequest(session_id=session_id), **self._kw())

    def list_sessions(self):
        return list(self.stub.ListSessions(pb.ListSessionsRequest(), **self._kw()).sessions)

    def delete_session(self, session_id):
        return self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), **self._kw()).freed_bytes

    # --- KV and attention -------------------------------------------------
    # K and V bytes per AppendKV message when chunk_tokens is 0: half of
    # attnserve's default --max-message-mib (64), whatever the session's shape.
    APPEND_CHUNK_BYTES = 32 << 20

    def append_kv(self, session_id, layer, k, v, chunk_tokens=0, dtype=None, expected_layer_tokens=None):
        """Streams k, v [T, kv_heads, head_dim] in chunks; all or nothing.
        chunk_tokens: tokens per message; 0 = at most 4096 and at most
        APPEND_CHUNK_BYTES (32 MiB) of K and V per message.
        expected_layer_tokens: store only if the layer holds exactly that many
        tokens (else FAILED_PRECONDITION, nothing stored)."""
        k, v = np.asarray(k), np.asarray(v)
        if k.ndim == 0 or k.shape != v.shape:
            raise ValueError("append_kv: k %s and v %s must have the same shape [T, kv_heads, head_dim]"
                             % (k.shape, v.shape))
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, (int, np.integer)) or chunk_tokens < 0:
            raise ValueError("append_kv: chunk_tokens: %r, expected an int >= 1 (0 = the default)" % (chunk_tokens,))
        if dtype is not None:  # here, not in chunks(): gRPC turns its exceptions into UNKNOWN
            _choice(_DTYPES, dtype, "dtype")
        if chunk_tokens == 0:
            wire = dtype or ("float16" if k.dtype.kind == "f" and k.dtype.itemsize == 2 else "float32")
            row = 2 * int(np.prod(k.shape[1:], dtype=np.int64)) * (4 if wire == "float32" else 2)
            chunk_tokens = max(1, min(4096, self.APPEND_CHUNK_BYTES // max(1, row)))
        chunk_tokens = int(chunk_tokens)

        def attempt(expected):
            def chunks():
                for start in range(0, max(1, k.shape[0]), chunk_tokens):
                    r = pb.AppendKVRequest(session_id=session_id, layer=layer,
                                           k=to_tensor(k[start:start + chunk_tokens], dtype),
                                           v=to_tensor(v[start:start + chunk_tokens], dtype))
                    if start == 0 and expected is not None:
                        r.expected_layer_tokens = expected
                    yield r
            return self.stub.AppendKV(chunks(), **self._kw())

        def applied(expected):
            return pb.AppendKVResponse(appended_tokens=k.shape[0], first_position=expected,
                                       layer_tokens=expected + k.shape[0])
        return self._write("AppendKV", session_id, layer, k.shape[0], expected_layer_tokens, attempt, applied)

    @staticmethod
    def _options(scale, return_lse, output_dtype):
        return pb.AttentionOptions(scale=scale, return_lse=return_lse, output_dtype=_choice(_DTYPES, output_dtype, "output_dtype"))

    def prefill(self, session_id, layer, q, k, v, scale=0.0, return_lse=False, output_dtype="float32",
                dtype=None, output_chunk_tokens=0, expected_layer_tokens=None):
        """Stores k/v of the chunk; returns o [T, H, D] (and lse [T, H]).
        expected_layer_tokens: conditional write, as in append_kv. A retry
        that finds the chunk already stored raises AppliedEarlierError."""
        request = pb.PrefillRequest(session_id=session_id, layer=layer, q=to_tensor(q, dtype),
                                    k=to_tensor(k, dtype), v=to_tensor(v, dtype),
                                    options=self._options(scale, return_lse, output_dtype),
                                    output_chunk_tokens=output_chunk_tokens)

        def attempt(expected):
            if expected is not None:
                request.expected_layer_tokens = expected
            outs, lses = [], []
            rows = 0  # output tokens received so far: the messages must follow each other
            for message in self.stub.Prefill(request, **self._kw()):
                if message.token_offset != rows:
                    raise RuntimeError("[Prefill] o: a response message starts at token %d, expected %d"
                                       % (message.token_offset, rows))
                outs.append(from_tensor(message.o))
                rows += outs[-1].shape[0]
                if return_lse:
                    lses.append(from_tensor(message.lse))
            tokens = np.asarray(q).shape[0]
            o = np.concatenate(outs, axis=0) if outs else None
            if o is None or o.shape[0] != tokens:
                raise RuntimeError("[Prefill] o: streamed output is incomplete (%d of %d tokens)" % (rows, tokens))
            if not return_lse:
                return o
            lse = np.concatenate(lses, axis=0)
            if lse.shape[0] != tokens:
                raise RuntimeError("[Prefill] lse: streamed output is incomplete (%d of %d tokens)"
                                   % (lse.shape[0], tokens))
            return o, lse

        def applied(expected):
            raise AppliedEarlierError("Prefill", expected, np.asarray(k).shape[0])
        return self._write("Prefill", session_id, layer, np.asarray(k).shape[0], expected_layer_tokens, attempt,
                           applied)

    @staticmethod
    def _result(r, return_lse, retrieval):
        out = [from_tensor(r.o)]
        if return_lse:
            out.append(from_tensor(r.lse))
        if retrieval is not None:
            out.append(r.retrieval)  # RetrievalInfo: spans_used, max_skipped_mass_bound, exact, ...
        return out[0] if len(out) == 1 else tuple(out)

    def decode(self, session_id, layer, q, k, v, scale=0.0, return_lse=False, output_dtype="float32", dtype=None,
               retrieval=None, expected_layer_tokens=None):
        """Appends k/v, returns o [T, H, D] (and lse). Batched server-side.
        retrieval: RetrievalOptions (see retrieval_options()) for retrieval mode;
        then the RetrievalInfo is returned last. expected_layer_tokens:
        conditional write, as in append_kv. A retry that finds the tokens
        already stored raises AppliedEarlierError."""
        request = pb.DecodeRequest(session_id=session_id, layer=layer, q=to_tensor(q, dtype),
                                   k=to_tensor(k, dtype), v=to_tensor(v, dtype),
                                   options=self._options(scale, return_lse, output_dtype))
        if retrieval is not None:
            request.retrieval.CopyFrom(retrieval)

        def attempt(expected):
            if expected is not None:
                request.expected_layer_tokens = expected
            return self._result(self.stub.Decode(request, **self._kw()), return_lse, retrieval)

        def applied(expected):
            raise AppliedEarlierError("Decode", expected, np.asarray(k).shape[0])
        return self._write("Decode", session_id, layer, np.asarray(k).shape[0], expected_layer_tokens, attempt,
                           applied)

    def attend(self, session_id, layer, q, scale=0.0, return_lse=False, output_dtype="float32", dtype=None,
               retrieval=None):
        """Queries against everything stored, no append; o [T, H, D] (and lse).
        retrieval: as in decode()."""
        request = pb.AttendRequest(session_id=session_id, layer=layer, q=to_tensor(q, dtype),
                                   options=self._options(scale, return_lse, output_dtype))
        if retrieval is not None:
            request.retrieval.CopyFrom(retrieval)
        return self._result(self.stub.Attend(request, **self._kw()), return_lse, retrieval)

    def decode_batch(self, layer, entries, scale=0.0, return_lse=False, output_dtype="float32", dtype=None):
        """Many sessions' decode steps for one layer in one call (an engine's
        micro-batch). entries: dicts {"session_id", "q" [T, H, D], "k", "v"
        [T, Hkv, D], optional "retrieval" (retrieval_options()), optional
        "expected_layer_tokens"}. Returns a BatchResult per entry, in order;
        each entry succeeds or fails on its own. Raises grpc.RpcError only
        when the call as a whole was refused (auth, empty or oversized batch,
        expired deadline). Not retried (use expected_layer_tokens)."""
        request = self._decode_batch_request(layer, entries, scale, return_lse, output_dtype, dtype)
        response = self.stub.DecodeBatch(request, **self._kw())
        return [BatchResult(r, return_lse) for r in response.results]

    def _decode_batch_request(self, layer, entries, scale, return_lse, output_dtype, dtype):
        request = pb.DecodeBatchRequest(layer=layer, options=self._options(scale, return_lse, output_dtype))
        for e in entries:
            entry = request.entries.add(session_id=e["session_id"], q=to_tensor(e["q"], dtype),
                                        k=to_tensor(e["k"], dtype), v=to_tensor(e["v"], dtype))
            if e.get("retrieval") is not None:
                entry.retrieval.CopyFrom(e["retrieval"])
            if e.get("expected_layer_tokens") is not None:
                entry.expected_layer_tokens = e["expected_layer_tokens"]
        return request

    def open_decode_batch_stream(self):
        """A DecodeBatchStream: decode_batch for a whole generation on one
        open call (docs/api.md). Use as a context manager or close() it."""
        return DecodeBatchStream(self)

    def attend_batch(self, layer, entries, scale=0.0, return_lse=False, output_dtype="float32", dtype=None):
        """Many sessions' attends for one layer in one call. entries: dicts
        {"session_id", "q", optional "retrieval"}. As decode_batch."""
        request = pb.AttendBatchRequest(layer=layer, options=self._options(scale, return_lse, output_dtype))
        for e in entries:
            entry = request.entries.add(session_id=e["session_id"], q=to_tensor(e["q"], dtype))
            if e.get("retrieval") is not None:
                entry.retrieval.CopyFrom(e["retrieval"])
        response = self.stub.AttendBatch(request, **self._kw())
        return [BatchResult(r, return_lse) for r in response.results]

    def retrieve_kv(self, session_id, layer, q, retrieval, include_always=False, scale=0.0, dtype=None,
                    chunk_tokens=0):
        """KV retrieval: returns [(rank, position_start, k, v)] runs in position
        order, k/v [n, kv_heads, head_dim] as float32 numpy arrays.
        chunk_tokens: tokens of K/V per response message (0: the server's
        default); the runs are merged back whatever the chunking."""
        request = pb.RetrieveKVRequest(session_id=session_id, layer=layer, q=to_tensor(q, dtype), scale=scale,
                                       retrieval=retrieval, include_always=include_always,
                                       chunk_tokens=chunk_tokens)
        runs = []
        for m in self.stub.RetrieveKV(request, **self._kw()):
            k, v = from_tensor(m.k), from_tensor(m.v)
            if runs and runs[-1][0] == m.rank and runs[-1][1] + runs[-1][2].shape[0] == m.position_start:
                rank, start, k0, v0 = runs[-1]
                runs[-1] = (rank, start, np.concatenate([k0, k]), np.concatenate([v0, v]))
            else:
                runs.append((m.rank, m.position_start, k, v))
        return runs

    def stats(self):
        return self.stub.Stats(pb.StatsRequest(), **self._kw())

    def health(self, service=""):
        """Standard grpc.health.v1 check; returns "SERVING", "NOT_SERVING", ..."""
        check = self.channel.unary_unary("/grpc.health.v1.Health/Check",
                                         request_serializer=lambda name: (b"\n" + bytes([len(name)]) + name.encode()
                                                                          if name else b""),
                                         response_deserializer=lambda data: data)
        data = check(service, timeout=self.timeout or 10)
        status = data[1] if len(data) >= 2 and data[0] == 0x08 else 0
        return {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}.get(status, "UNKNOWN")

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
