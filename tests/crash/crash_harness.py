#!/usr/bin/python3
"""Crash-consistency harness for durable mode (leveldb fault-injection style).

A 2-rank attnserve with --data-dir takes AppendKV, DecodeBatch and Decode
calls from a driver while a killer SIGKILLs the whole job (every rank and
mpirun, at once) at a random moment. After each kill the service restarts on
the same directory and the harness checks, for every session layer:

  * every acknowledged write is present: the layer holds at least the tokens
    the driver was told were stored;
  * no unacknowledged write is half present: the layer holds exactly the
    acknowledged tokens, or those plus the whole of the one write that was in
    flight on it when the job died (a conditional retry then tells which);
  * the answers equal a float64 replay of the writes: Attend on every layer
    matches numpy attention over the K/V the driver sent (max |o - ref|).

Every write is conditional (expected_layer_tokens), so a write whose reply
was lost cannot be applied twice. Seeded; each kill's moment and the traffic
mix come from the seed.

  /usr/bin/python3 tests/crash/crash_harness.py --attnserve build/coordinator/attnserve \\
      --python-path build/rpc/python --kills 200 --seed 1

Exit 0 and a summary line when every check held; exit 1 naming the first
violation otherwise.
"""
import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 32, 2


def reference(q, k, v):
    """softmax(q k^T / sqrt(D)) v per head (GQA), float64, no mask. q [T,H,D], k/v [N,Hkv,D]."""
    T, H, D = q.shape
    group = H // k.shape[1]
    out = np.zeros((T, H, D))
    for h in range(H):
        kh, vh = k[:, h // group].astype(np.float64), v[:, h // group].astype(np.float64)
        s = q[:, h].astype(np.float64) @ kh.T / np.sqrt(D)
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ vh
    return out


def descendants(pid):
    """Every process below `pid` (from /proc's parent links)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open("/proc/%s/stat" % entry).read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def zombie(pid):
    try:
        stat = open("/proc/%d/stat" % pid).read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


class Server:
    def __init__(self, attnserve, data_dir, workdir, extra):
        self.port_file = os.path.join(workdir, "port")
        self.pid_file = os.path.join(workdir, "pid")
        for f in (self.port_file, self.pid_file):
            if os.path.exists(f):
                os.unlink(f)
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        self.log_path = os.path.join(workdir, "log")
        self.log = open(self.log_path, "a")
        # Open MPI's shared-memory segments in a directory emptied before each
        # start: a killed world leaves its segments behind, and a later job
        # whose 16-bit job id matches (mpirun pids are reused) would attach to
        # them and crash at start.
        shm_dir = os.path.join(workdir, "shm")
        shutil.rmtree(shm_dir, ignore_errors=True)
        os.makedirs(shm_dir)
        self.proc = subprocess.Popen(
            ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none",
             "--mca", "btl_vader_backing_directory", shm_dir, attnserve, "--listen", "127.0.0.1:0",
             "--port-file", self.port_file, "--pid-file", self.pid_file, "--data-dir", data_dir] + extra,
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while not (os.path.exists(self.port_file) and os.path.exists(self.pid_file)):
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit("attnserve did not start:\n" + open(self.log_path).read()[-4000:])
            time.sleep(0.02)
        time.sleep(0.05)
        self.port = int(open(self.port_file).read())

    def kill(self):
        """SIGKILL every process of the job at once: mpirun and its ranks
        (which are mpirun's children, not always in its process group), all
        stopped first so that none runs on after another died."""
        pids = [self.proc.pid] + descendants(self.proc.pid)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        self.proc.wait()
        deadline = time.time() + 30
        while any(os.path.exists("/proc/%d" % p) and not zombie(p) for p in pids):
            if time.time() > deadline:
                raise SystemExit("ranks survived SIGKILL: %s" % pids)
            time.sleep(0.01)

    def stop(self):
        os.kill(int(open(self.pid_file).read()), signal.SIGTERM)
        return self.proc.wait(timeout=60)


class Model:
    """What the driver knows of one session: per layer, the acknowledged K/V
    and at most one write in flight (its rows, sent but not acknowledged)."""

    def __init__(self, session_id):
        self.id = session_id
        self.k = [np.zeros((0, KV_HEADS, HEAD_DIM), np.float32) for _ in range(LAYERS)]
        self.v = [np.zeros((0, KV_HEADS, HEAD_DIM), np.float32) for _ in range(LAYERS)]
        self.pending = [None] * LAYERS  # (k, v) of the write in flight

    def tokens(self, layer):
        return self.k[layer].shape[0]

    def ack(self, layer, k, v):
        self.k[layer] = np.concatenate([self.k[layer], k])
        self.v[layer] = np.concatenate([self.v[layer], v])
        self.pending[layer] = None


def drive(client, models, rng, stop, errors):
    """Random appends and decodes until `stop` is set or the server dies."""
    import grpc
    from ringtree_client import AttentionClient  # noqa: F401
    calls, in_calls, t_start = 0, 0.0, time.time()
    while not stop.is_set():
        if os.environ.get("CRASH_DEBUG") and calls % 20 == 0:
            print("driver: %d calls, %.2f s in calls of %.2f s" % (calls, in_calls, time.time() - t_start), flush=True)
        calls += 1
        t_call = time.time()
        layer = rng.randrange(LAYERS)
        kind = rng.random()
        try:
            if kind < 0.25:  # AppendKV of 1..300 tokens on one session
                m = rng.choice(models)
                n = rng.randrange(1, 300)
                k = np.random.default_rng(rng.randrange(1 << 30)).standard_normal((n, KV_HEADS, HEAD_DIM)).astype(np.float32)
                v = np.random.default_rng(rng.randrange(1 << 30)).standard_normal((n, KV_HEADS, HEAD_DIM)).astype(np.float32)
                m.pending[layer] = (k, v)
                client.append_kv(m.id, layer, k, v, chunk_tokens=128, expected_layer_tokens=m.tokens(layer))
                m.ack(layer, k, v)
                in_calls += time.time() - t_call
            else:  # DecodeBatch: one token for every session on this layer
                entries, rows = [], []
                for m in models:
                    gen = np.random.default_rng(rng.randrange(1 << 30))
                    q = gen.standard_normal((1, HEADS, HEAD_DIM)).astype(np.float32)
                    k = gen.standard_normal((1, KV_HEADS, HEAD_DIM)).astype(np.float32)
                    v = gen.standard_normal((1, KV_HEADS, HEAD_DIM)).astype(np.float32)
                    m.pending[layer] = (k, v)
                    entries.append({"session_id": m.id, "q": q, "k": k, "v": v,
                                    "expected_layer_tokens": m.tokens(layer)})
                    rows.append((m, q, k, v))
                t_call = time.time()
                results = client.decode_batch(layer, entries)
                in_calls += time.time() - t_call
                for (m, q, k, v), r in zip(rows, results):
                    if not r.ok:
                        errors.append("decode_batch entry for %s failed: %s %s" % (m.id, r.code, r.message))
                        stop.set()
                        return
                    m.ack(layer, k, v)
                    if m.tokens(layer) > 1:
                        # The decode's own answer: causal over everything up to its token.
                        ref = reference(q, m.k[layer], m.v[layer])
                        if np.abs(r.o - ref).max() > 2e-4:
                            errors.append("decode answer differs from the replay by %g" % np.abs(r.o - ref).max())
                            stop.set()
                            return
        except BaseException as e:
            if os.environ.get("CRASH_DEBUG"):
                print("driver: exception", type(e), flush=True)
            if not isinstance(e, grpc.RpcError):
                raise
            if os.environ.get("CRASH_DEBUG"):
                print("driver: call failed", e.code(), sum(p is not None for m in models for p in m.pending), flush=True)
            return  # the job was killed under the call: the write stays pending
        except Exception as e:  # noqa: BLE001
            if stop.is_set():
                return
            errors.append("driver: %r" % e)
            stop.set()
            return


def reconcile(client, models, kill_no):
    """After a restart: the server's lengths against the driver's model.
    Returns how many writes in flight were found applied whole."""
    applied = 0
    for m in models:
        info = client.get_session(m.id)
        for layer in range(LAYERS):
            have, acked = info.layer_tokens[layer], m.tokens(layer)
            pend = m.pending[layer]
            if os.environ.get("CRASH_DEBUG") and pend is not None:
                print("reconcile %s layer %d: have %d acked %d pending %d" % (m.id[:6], layer, have, acked, pend[0].shape[0]), flush=True)
            if have == acked:
                m.pending[layer] = None
                continue
            if pend is not None and have == acked + pend[0].shape[0]:
                m.ack(layer, *pend)  # the write in flight was applied whole; its reply was lost
                applied += 1
                continue
            extra = "" if pend is None else " (in flight: %d tokens)" % pend[0].shape[0]
            raise SystemExit("kill %d: session %s layer %d holds %d tokens, %d acknowledged%s: %s" % (
                kill_no, m.id, layer, have, acked, extra,
                "ACKNOWLEDGED TOKENS LOST" if have < acked else "PHANTOM OR TORN WRITE"))
    return applied


def verify_answers(client, models, rng, kill_no):
    worst = 0.0
    for m in models:
        for layer in range(LAYERS):
            if m.tokens(layer) == 0:
                continue
            q = np.random.default_rng(rng.randrange(1 << 30)).standard_normal((2, HEADS, HEAD_DIM)).astype(np.float32)
            o = client.attend(m.id, layer, q)
            err = float(np.abs(o - reference(q, m.k[layer], m.v[layer])).max())
            worst = max(worst, err)
            if err > 2e-4:
                raise SystemExit("kill %d: session %s layer %d answers differ from the replay by %g" % (
                    kill_no, m.id, layer, err))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attnserve", required=True)
    parser.add_argument("--python-path", required=True)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--max-run-ms", type=int, default=600, help="traffic before a kill: uniform in [20, this]")
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()
    sys.path.insert(0, args.python_path)
    from ringtree_client import AttentionClient

    rng = random.Random(args.seed)
    workdir = tempfile.mkdtemp(prefix="ringtree-crash-")
    data_dir = os.path.join(workdir, "data")
    started = time.time()
    server = Server(args.attnserve, data_dir, workdir, args.server_arg)
    client = AttentionClient("127.0.0.1:%d" % server.port, timeout=30)
    models = []
    for _ in range(args.sessions):
        s = client.create_session(layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, span_tokens=16)
        models.append(Model(s.session_id))
    client.close()
    acked_before = 0
    worst = 0.0
    applied_in_flight = in_flight = 0
    try:
        for kill_no in range(1, args.kills + 1):
            client = AttentionClient("127.0.0.1:%d" % server.port, timeout=30)
            stop, errors = threading.Event(), []
            driver = threading.Thread(target=drive, args=(client, models, random.Random(rng.randrange(1 << 30)),
                                                          stop, errors))
            driver.start()
            time.sleep(rng.uniform(0.02, args.max_run_ms / 1000.0))
            server.kill()  # whatever the driver is doing now, a call may be in flight
            stop.set()
            driver.join(timeout=60)
            client.close()
            if errors:
                raise SystemExit("kill %d: %s" % (kill_no, errors[0]))
            server = Server(args.attnserve, data_dir, workdir, args.server_arg)
            client = AttentionClient("127.0.0.1:%d" % server.port, timeout=30)
            in_flight += sum(p is not None for m in models for p in m.pending)
            applied_in_flight += reconcile(client, models, kill_no)
            worst = max(worst, verify_answers(client, models, rng, kill_no))
            client.close()
            tokens = sum(m.tokens(l) for m in models for l in range(LAYERS))
            if kill_no % 10 == 0 or kill_no == args.kills:
                print("[crash] %d/%d kills, %d tokens acknowledged (+%d since the last report), %.0f s" % (
                    kill_no, args.kills, tokens, tokens - acked_before, time.time() - started), flush=True)
                acked_before = tokens
        code = server.stop()
        if code != 0:
            raise SystemExit("the last attnserve exited %d" % code)
    except BaseException:
        server.kill()
        print("log tail:\n" + open(server.log_path).read()[-3000:], file=sys.stderr)
        raise
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    tokens = sum(m.tokens(l) for m in models for l in range(LAYERS))
    print("[crash] PASS: %d kills, %d tokens acknowledged and present, 0 lost, 0 torn or phantom; "
          "of %d writes in flight at a kill, %d were applied whole (reply lost) and the others not at all; "
          "max |o - replay| %.2e; %.0f s" % (args.kills, tokens, in_flight, applied_in_flight, worst,
                                             time.time() - started))


if __name__ == "__main__":
    main()
