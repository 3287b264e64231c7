#!/usr/bin/python3
"""attnjob across emulated hosts when a host dies or a rank freezes mid-job.

  --fail kill     2 hosts x 2 ranks; once the ring is running, every process
                  of host 2 (its Open MPI daemon and ranks 2 and 3) gets SIGKILL
                  (launch/cluster kill-host).
  --fail freeze   3 hosts x 1 rank; once the ring is running, rank 1 (on host 2)
                  gets SIGSTOP. Open MPI cannot see this; attnjob's peer
                  watchdog must (--peer-timeout, default 10 s).

Outcome required either way: mpirun and every surviving rank exit non-zero
within 30 s of the failure, the output names the lost rank and its host, no
attnjob process is left on any host, and neither the output file nor its
temporary exists. Prints the time from the failure to the exit of mpirun.

Exit 77 (ctest SKIP) without root or network namespaces.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_common as cc  # noqa: E402

BOUND = 30.0  # seconds from the failure to every survivor's exit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attnjob", required=True)
    ap.add_argument("--fail", choices=["kill", "freeze"], required=True)
    ap.add_argument("--peer-timeout", type=float, default=None, help="pass --peer-timeout to attnjob (default: its own)")
    args = ap.parse_args()
    cc.require_namespaces()
    hosts, slots = (2, 2) if args.fail == "kill" else (3, 1)
    ranks = hosts * slots
    lost_host = 2
    with cc.Cluster("rttf" + args.fail[0], hosts, slots) as c:
        w = c.workdir
        # Big enough that the ring runs for a while on 2 shared cores (minutes
        # unperturbed), small enough to read in a second.
        t, h, hkv, d = 16384, 8, 2, 64
        rng = np.random.default_rng(7)
        for name, heads in (("q", h), ("k", hkv), ("v", hkv)):
            np.save(os.path.join(w, name + ".npy"), rng.standard_normal((t, heads, d), dtype=np.float32))
        out = os.path.join(w, "o.npy")
        cmd = [os.path.join(cc.LAUNCH, "mpirun-ringtree"), "-np", str(ranks), "--hostfile", c.hostfile,
               args.attnjob, "--q", os.path.join(w, "q.npy"), "--k", os.path.join(w, "k.npy"), "--v",
               os.path.join(w, "v.npy"), "--out", out, "--threads", "1"]
        if args.peer_timeout is not None:
            cmd += ["--peer-timeout", str(args.peer_timeout)]
        log_path = os.path.join(w, "log")
        proc, log = cc.popen_session(cmd, c.env, log_path)
        try:
            # "In the middle": rank 0 has printed the job line (inputs read,
            # temporary output created, ring started) and every rank is alive.
            deadline = time.time() + 90
            while time.time() < deadline:
                if "ring step" in open(log_path).read() or "job:" in open(log_path).read():
                    break
                if proc.poll() is not None:
                    raise AssertionError("attnjob ended before the failure:\n" + open(log_path).read())
                time.sleep(0.1)
            else:
                raise AssertionError("attnjob did not start within 90 s:\n" + open(log_path).read())
            time.sleep(1.0)
            assert proc.poll() is None, "attnjob ended before the failure:\n" + open(log_path).read()
            temps = [x for x in os.listdir(w) if x.startswith("o.npy.tmp.")]
            assert temps, "no temporary output while the job runs: %s" % os.listdir(w)
            victims = c.pids(lost_host, "attnjob")
            assert len(victims) == slots, "expected %d attnjob ranks on host %d, found %s" % (slots, lost_host,
                                                                                              victims)
            survivors = {i: c.pids(i, "attnjob") for i in range(1, hosts + 1) if i != lost_host}
            lost_ranks = list(range((lost_host - 1) * slots, lost_host * slots))
            t_fail = time.time()
            if args.fail == "kill":
                r = subprocess.run([os.path.join(cc.LAUNCH, "cluster"), "kill-host", c.host(lost_host)], env=c.env,
                                   capture_output=True, text=True)
                assert r.returncode == 0, r.stderr
            else:
                os.kill(victims[0], signal.SIGSTOP)
            # Every surviving rank exits (on its own host), and mpirun with them.
            exit_of = {}
            while time.time() - t_fail < BOUND + 15:
                for i, pids in survivors.items():
                    for p in pids:
                        if p not in exit_of and not os.path.exists("/proc/%d" % p):
                            exit_of[p] = time.time() - t_fail
                if proc.poll() is not None and len(exit_of) == sum(len(p) for p in survivors.values()):
                    break
                time.sleep(0.05)
            t_mpirun = time.time() - t_fail if proc.poll() is not None else None
            log.close()
            text = open(log_path).read()
            print(text[-4000:], flush=True)
            print("%s of host %d (ranks %s): survivors exited after %s s, mpirun after %s s (exit %s)" % (
                "SIGKILL of every process" if args.fail == "kill" else "SIGSTOP of rank %d" % lost_ranks[0],
                lost_host, lost_ranks, ", ".join("%.1f" % s for s in sorted(exit_of.values())),
                "%.1f" % t_mpirun if t_mpirun is not None else "NEVER", proc.returncode), flush=True)
            assert t_mpirun is not None, "mpirun still running %.0f s after the failure (hang)" % (BOUND + 15)
            assert proc.returncode != 0, "mpirun exited 0 after a failure"
            assert t_mpirun <= BOUND, "mpirun exited %.1f s after the failure (bound %.0f s)" % (t_mpirun, BOUND)
            assert max(exit_of.values()) <= BOUND, exit_of
            # The message names a lost rank and its host.
            pattern = r"lost rank (%s) on host %s\b" % ("|".join(map(str, lost_ranks)), re.escape(c.host(lost_host)))
            assert re.search(pattern, text), "no message matching /%s/ in the output" % pattern
            if args.fail == "freeze":
                assert "no heartbeat" in text, "the frozen rank was not reported as silent"
            left = [p for i in range(1, hosts + 1) for p in c.pids(i, "attnjob")]
            # The frozen rank itself is stopped: Open MPI's daemon kills it too.
            assert not left, "attnjob processes left on the hosts: %s" % left
            files = sorted(os.listdir(w))
            assert "o.npy" not in files and not [x for x in files if ".tmp." in x], \
                "output or temporary left behind: %s" % files
        finally:
            cc.stop_group(proc)
            if not log.closed:
                log.close()
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
