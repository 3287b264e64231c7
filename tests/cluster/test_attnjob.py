#!/usr/bin/python3
"""attnjob across emulated hosts (launch/cluster) through launch/mpirun-ringtree
--hostfile, exactly as on real hosts.

  --hosts K --slots S --ranks P   the result equals the single-process run
                                  (attnjob -np 1 on this machine, max |diff|
                                  <= 1e-5) and the float64 numpy reference
                                  (2e-4), for causal and non-causal; the
                                  ranks really ran on different hosts and the
                                  KV crossed the shaped links (tc byte counters).
  --readme                        the README's "Several hosts" block runs as
                                  written (in a directory where build/ is the
                                  build under test) and its o.npy is right.

Exit 77 (ctest SKIP) without root or network namespaces.
"""
import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_common as cc  # noqa: E402

TIMEOUT = 120


def run(cmd, env, cwd=None):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError("TIMEOUT (hang?) after %ds: %s" % (TIMEOUT, " ".join(cmd)))
    print("$ %s   (%.1f s, exit %d)" % (" ".join(cmd), time.time() - t0, p.returncode), flush=True)
    if p.returncode != 0:
        raise AssertionError("exit %d\nstdout:\n%s\nstderr:\n%s" % (p.returncode, p.stdout, p.stderr))
    return p


def write_inputs(workdir, t, h, hkv, d, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((t, h, d), dtype=np.float32)
    k = rng.standard_normal((t, hkv, d), dtype=np.float32)
    v = rng.standard_normal((t, hkv, d), dtype=np.float32)
    for name, a in (("q", q), ("k", k), ("v", v)):
        np.save(os.path.join(workdir, name + ".npy"), a)
    return q, k, v


def check_hosts(args, attnjob):
    name = "rtt%d%d" % (args.hosts, args.slots)
    with cc.Cluster(name, args.hosts, args.slots) as c:
        w = c.workdir
        q, k, v = write_inputs(w, 768, 4, 2, 32, seed=args.hosts * 10 + args.slots)
        f = lambda n: os.path.join(w, n)
        # Where the ranks run: hostname of every rank, through the same launcher.
        where = run([os.path.join(cc.LAUNCH, "mpirun-ringtree"), "-np", str(args.ranks), "--hostfile", c.hostfile,
                     "hostname"], c.env).stdout.split()
        expect = sorted(c.host(1 + r // args.slots) for r in range(args.ranks))
        assert sorted(where) == expect, "ranks ran on %s, expected %s" % (where, expect)
        for causal in (True, False):
            flag = ["--causal"] if causal else []
            tag = "causal" if causal else "full"
            before = c.link_bytes()
            run([os.path.join(cc.LAUNCH, "mpirun-ringtree"), "-np", str(args.ranks), "--hostfile", c.hostfile,
                 attnjob, "--q", f("q.npy"), "--k", f("k.npy"), "--v", f("v.npy"), "--out", f("o_%s.npy" % tag),
                 "--lse", f("lse_%s.npy" % tag), "--threads", "1", "--quiet"] + flag, c.env)
            after = c.link_bytes()
            # Single process, on this machine, no hostfile.
            run([os.path.join(cc.LAUNCH, "mpirun-ringtree"), "-np", "1", attnjob, "--q", f("q.npy"), "--k",
                 f("k.npy"), "--v", f("v.npy"), "--out", f("o1_%s.npy" % tag), "--lse", f("lse1_%s.npy" % tag),
                 "--threads", "1", "--quiet"] + flag, dict(c.env, OMPI_MCA_btl_tcp_if_include="lo"))
            o, lse = np.load(f("o_%s.npy" % tag)), np.load(f("lse_%s.npy" % tag))
            o1, lse1 = np.load(f("o1_%s.npy" % tag)), np.load(f("lse1_%s.npy" % tag))
            ro, rl = cc.reference(q, k, v, causal)
            d1, dl = np.abs(o - o1).max(), np.abs(lse - lse1).max()
            dr = np.abs(o - ro).max()
            # Each rank's KV shard (k+v, fp32) passes every other host's link.
            kv_bytes = 768 * 2 * 32 * 4 * 2
            moved = {i: after[i] - before[i] for i in after}
            print("%s: %d hosts x %d ranks: max |o - single| %.2e, |lse - single| %.2e, |o - ref| %.2e; bytes into "
                  "each host over its link %s" % (tag, args.hosts, args.slots, d1, dl, dr, moved), flush=True)
            assert d1 <= 1e-5 and dl <= 1e-5, (d1, dl)
            assert dr <= 2e-4, dr
            for i, b in moved.items():
                assert b >= kv_bytes * args.slots // args.ranks * (args.ranks - args.slots) // 2, \
                    "host %d received only %d bytes over its link: the ranks did not talk over it" % (i, b)
            assert not [x for x in os.listdir(w) if ".tmp." in x], os.listdir(w)
    print("PASS", flush=True)


def readme_block():
    text = open(os.path.join(cc.REPO, "README.md")).read()
    m = re.search(r"\*\*Several hosts\.\*\*.*?```(?:sh|bash)?\n(.*?)```", text, re.S)
    assert m, "README: no code block in the 'Several hosts' paragraph"
    return m.group(1)


def check_readme(args, attnjob):
    block = readme_block()
    print("README block:\n" + block, flush=True)
    assert "launch/mpirun-ringtree" in block and "--hostfile hosts" in block, block
    # The block makes and removes the cluster itself (CLUSTER_NAME = this test's).
    with cc.Cluster("rttr", 2, 2, bring_up=False) as c:
        w = c.workdir
        os.symlink(cc.LAUNCH, os.path.join(w, "launch"))
        os.symlink(os.path.dirname(os.path.dirname(attnjob)), os.path.join(w, "build"))
        q, k, v = write_inputs(w, 512, 8, 2, 64, seed=5)
        # bash -e: any failing line fails the test.
        p = subprocess.run(["bash", "-e", "-x", "-c", block], cwd=w, env=c.env, capture_output=True, text=True,
                           timeout=TIMEOUT)
        print(p.stdout[-3000:], p.stderr[-3000:], flush=True)
        assert p.returncode == 0, "README block exited %d" % p.returncode
        assert not c.leftovers(), "left after the block's down: %s" % c.leftovers()
        ro, _ = cc.reference(q, k, v, "--causal" in block)
        diff = np.abs(np.load(os.path.join(w, "o.npy")) - ro).max()
        print("README block: o.npy max |o - reference| %.2e" % diff, flush=True)
        assert diff <= 2e-4, diff
        # down after a partial up: a namespace and a veth that no state file knows of.
        subprocess.run(["ip", "netns", "add", "rttr-host9"], check=True)
        subprocess.run(["ip", "link", "add", "rttr-veth9", "type", "veth", "peer", "name", "rttr-p9"], check=True)
        assert len(c.leftovers()) >= 2, c.leftovers()
        c.cluster("down")
        assert not c.leftovers(), "down after a partial up left %s" % c.leftovers()
    print("PASS", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attnjob", required=True)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    cc.require_namespaces()
    attnjob = os.path.abspath(args.attnjob)
    if args.readme:
        check_readme(args, attnjob)
    else:
        check_hosts(args, attnjob)


if __name__ == "__main__":
    main()
