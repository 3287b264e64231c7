"""Shared pieces of the emulated-cluster tests (label `cluster`).

Each test brings up its own cluster (CLUSTER_NAME rtt<test>, so it never
touches a cluster someone else made) with launch/cluster, and removes it in
`finally` and again at start (a run killed by ctest's timeout leaves nothing
behind for the next one). Without root or network namespaces the test exits
with SKIP (77) and the reason; ctest reports it as skipped, never as passed.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

SKIP = 77
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LAUNCH = os.path.join(REPO, "launch")
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def skip(reason):
    print("SKIPPED: " + reason, flush=True)
    sys.exit(SKIP)


def require_namespaces():
    """Skips (exit 77) unless this process can make namespaces, veths and tbf qdiscs."""
    if os.geteuid() != 0:
        skip("needs root (network namespaces, veth, tc)")
    for tool in ("ip", "tc", "unshare"):
        if subprocess.run(["sh", "-c", "command -v " + tool], capture_output=True).returncode != 0:
            skip("'%s' not installed" % tool)
    probe = "rtprobe%d" % os.getpid()
    try:
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if r.returncode != 0:
            skip("cannot create a network namespace: " + r.stderr.strip())
        r = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                            "rate", "1gbit", "burst", "128kb", "latency", "20ms"], capture_output=True, text=True)
        if r.returncode != 0:
            skip("tc tbf not available: " + r.stderr.strip())
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def build_dir():
    return os.environ.get("BUILD_DIR") or os.path.join(REPO, "build")


class Cluster:
    """launch/cluster up K ... on enter, down on exit (also on any exception)."""

    def __init__(self, name, hosts, slots, bandwidth="1gbit", workdir=None, bring_up=True):
        self.name, self.hosts, self.slots, self.bandwidth = name, hosts, slots, bandwidth
        self.bring_up = bring_up  # False: only make sure it is down before and after
        self.workdir = workdir or tempfile.mkdtemp(prefix="cluster-%s-" % name)
        self.hostfile = os.path.join(self.workdir, "hosts")
        self.env = dict(os.environ, CLUSTER_NAME=name, **ROOT_ENV)
        for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy", "all_proxy"):
            self.env.pop(proxy, None)

    def cluster(self, *args, check=True):
        r = subprocess.run([os.path.join(LAUNCH, "cluster")] + list(args), env=self.env, capture_output=True,
                           text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError("launch/cluster %s failed (%d): %s%s" % (" ".join(args), r.returncode, r.stdout,
                                                                         r.stderr))
        return r

    def __enter__(self):
        self.cluster("down", check=False)
        if not self.bring_up:
            return self
        up = ["up", str(self.hosts), "--slots", str(self.slots), "--bandwidth", self.bandwidth, "--hostfile",
              self.hostfile]
        t0 = time.time()
        self.cluster(*up)
        self.up_seconds = time.time() - t0
        again = self.cluster(*up)  # idempotent: the same up again changes nothing
        assert "already up" in again.stderr and again.stdout.strip() == self.hostfile, again
        status = self.cluster("status").stdout
        print(status.strip(), flush=True)
        self.subnet = [l.split("subnet ")[1].split(",")[0] for l in status.splitlines() if "subnet " in l][0]
        return self

    def leftovers(self):
        """Whatever of this cluster still exists: namespaces, links, name files, hosts entries, state."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
        left = [l.split()[0] for l in out if l.startswith(self.name + "-host")]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.split("\n")
        left += [l.split(": ")[1].split("@")[0] for l in links if ": %s-" % self.name in l]
        if os.path.isdir("/etc/netns"):
            left += ["/etc/netns/" + d for d in os.listdir("/etc/netns") if d.startswith(self.name + "-")]
        if "ringtree-cluster %s\n" % self.name in open("/etc/hosts").read():
            left.append("/etc/hosts block")
        if os.path.exists("/run/ringtree-cluster/" + self.name):
            left.append("/run/ringtree-cluster/" + self.name)
        return left

    def __exit__(self, *exc):
        self.cluster("down", check=False)
        left = self.leftovers()
        if left:
            print("FAIL: left after down: %s" % left, flush=True)
            if exc[0] is None:
                raise AssertionError("left after down: %s" % left)
        if exc[0] is None:
            shutil.rmtree(self.workdir, ignore_errors=True)  # kept for a look when the test failed
        else:
            print("work directory kept: " + self.workdir, flush=True)
        return False

    def host(self, i):
        return "%s-host%d" % (self.name, i)

    def address(self, i):
        return self.subnet.replace(".0/24", ".%d" % i)

    def pids(self, i, comm=None):
        """Processes in host i's namespace (optionally only those named `comm`)."""
        out = subprocess.run(["ip", "netns", "pids", self.host(i)], capture_output=True, text=True).stdout.split()
        pids = [int(p) for p in out]
        if comm is None:
            return pids
        mine = []
        for p in pids:
            try:
                if open("/proc/%d/comm" % p).read().strip() == comm:
                    mine.append(p)
            except OSError:
                pass
        return mine

    def link_bytes(self):
        """Bytes sent into each host over its shaped link (tbf on the root-side veth)."""
        out = {}
        for i in range(1, self.hosts + 1):
            s = subprocess.run(["tc", "-s", "qdisc", "show", "dev", "%s-veth%d" % (self.name, i)], capture_output=True,
                               text=True).stdout
            assert "tbf" in s, s
            out[i] = int(s.split("Sent ")[1].split(" bytes")[0])
        return out


def popen_session(cmd, env, log_path, cwd=None):
    log = open(log_path, "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True), log


class Service:
    """launch/attnserve [ARGS] --port-file on the cluster's hosts (HOSTFILE, RANKS = hosts x slots), waiting
    until it is ready; stop() sends SIGTERM (forwarded to rank 0), returns the exit code, kills whatever is
    left of it (also mpirun, which launch/attnserve starts in its own session) and prints the log's tail."""

    def __init__(self, cluster, attnserve, args, ready_seconds=60):
        self.log_path = os.path.join(cluster.workdir, "log")
        self.port_file = os.path.join(cluster.workdir, "port")
        env = dict(cluster.env, HOSTFILE=cluster.hostfile, RANKS=str(cluster.hosts * cluster.slots),
                   ATTNSERVE_BIN=os.path.abspath(attnserve))
        self.proc, self.log = popen_session([os.path.join(LAUNCH, "attnserve")] + list(args) +
                                            ["--port-file", self.port_file], env, self.log_path)
        try:
            deadline = time.time() + ready_seconds
            while not (os.path.exists(self.port_file) and os.path.getsize(self.port_file) > 0):
                if self.proc.poll() is not None:
                    raise AssertionError("attnserve exited early:\n" + self.text())
                if time.time() > deadline:
                    raise AssertionError("attnserve not ready in %d s:\n" % ready_seconds + self.text())
                time.sleep(0.05)
            self.port = int(open(self.port_file).read())
        except BaseException:
            self.close()
            raise

    def text(self):
        return open(self.log_path).read()

    def stop(self, timeout=60):
        self.proc.send_signal(signal.SIGTERM)  # launch/attnserve forwards it to rank 0
        return self.proc.wait(timeout=timeout)

    def close(self, tail=3000):
        stop_group(self.proc)
        subprocess.run(["pkill", "-KILL", "-f", self.port_file], capture_output=True)  # mpirun of a broken run
        if not self.log.closed:
            self.log.close()
        print(self.text().strip()[-tail:], flush=True)


def stop_group(proc):
    """Kills what a test started (its whole session) if it still runs."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def reference(q, k, v, causal):
    """float64 attention, q [T,H,D], k/v [N,Hkv,D] (GQA); o [T,H,D], lse [T,H]."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    t, h, d = q.shape
    tk, hkv, _ = k.shape
    kk, vv = np.repeat(k, h // hkv, axis=1), np.repeat(v, h // hkv, axis=1)
    s = np.einsum("thd,jhd->htj", q, kk) / np.sqrt(d)
    if causal:
        s[:, np.arange(tk)[None, :] > np.arange(t)[:, None]] = -np.inf
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    return np.einsum("htj,jhd->thd", p / l, vv), (m + np.log(l))[..., 0].T
