#!/usr/bin/python3
"""A scaling model of RingTree past this machine (docs/scaling.md).

    /usr/bin/python3 bench/cluster/scaling_model.py --calibrate bench/results/cluster/cluster.jsonl \
        [--check] [--out-dir bench/results/cluster] [--ranks-per-host 8] [--threads-per-rank 1]

Calibrated from the calibration runs inside one run of bench/cluster/run.sh,
never from the point being predicted (docs/scaling.md, "The model"):
  prefill kernel   t_step(n): one causal ring step at N/P = n, measured right before each point
                   (one rank computing one step's work next to a twin rank, each in its own
                   session); log-log interpolated, a n^2 through the largest n beyond
  decode kernel    local decode over N/P tokens, measured the same way
  links            per (rate, TCP progress mode): the one-way MPI ping-pong, 8 B .. 32 MiB
                   (log-log interpolation; alpha + B / bw beyond); shared memory the same
  duplex factor k  a ring step's exchange takes k x the one-way time; k from a calibration ring
                   decode (N = 32768) per (rate, mode); past this machine 1
  fixed cost alpha per step, from calls at small sizes with their own compute taken out:
                   ring prefill N/P = 32 (per ring step), decode N = 2048 (per tree round, per
                   ring-decode step), an 8-row 2x2 reduction (per placement and topology); past
                   this machine the same calls with 2 ranks on 2 cores and no link
  time-sharing     a reduction among 4 ranks on one emulated host (4 ranks on 2 cores) is the
                   base of the 2x2 reductions; past this machine ranks have their own cores

Ring (prefill and the ring-decode baseline) is simulated step by step for
every rank: at step s rank r computes on the block it holds while it sends it
to r+1 and receives the next from r-1. A transfer starts when both ends have
posted it: at the start of the step when the transport moves data in the
background ("overlap": Open MPI's TCP with btl_tcp_progress_thread=1, or an
RDMA NIC), or only when both ends have finished the step's compute ("no
overlap": Open MPI's TCP without a progress thread moves data only inside MPI
calls, and the ring calls MPI between kernel calls only). A step ends when its
compute and both transfers are done. Causal work per (rank, step) follows the
layout: zigzag gives every rank half a block per step, contiguous gives rank r
a full block from owners below it, half from itself, none from above.

Tree decode = local decode over N/P + the reduction: a binomial tree of
ceil(log2 P) rounds of one message of rows (D+1) 4 bytes; a round costs the
link's t(B) when the pair is on different hosts, shared memory's otherwise.
Flat with ranks placed by host (by slot) has the same rounds as two-level;
flat with ranks spread over hosts (by node, or any placement the library does
not see) pays the link on every round; two-level pays log2(ranks per host)
shared-memory rounds then log2(hosts) link rounds.

--check compares every point measured on the emulated cluster with the
model and prints the error (target: within 20%).
"""
import argparse
import copy
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np

MIB = 1 << 20


# ----------------------------------------------------------------------------- calibration
class Link:
    """alpha: one-way latency; bw: one-way rate; bw_ex: rate each way when both
    ends send at once (a ring step), which on shared cores is not 2x."""

    def __init__(self, name, alpha, bw, bw_ex=None, table=None, table_ex=None, table_ring=None):
        self.name, self.alpha, self.bw = name, alpha, bw
        self.bw_ex = bw_ex or bw
        # Measured (bytes, seconds): inside their range t() interpolates them
        # (log-log), so protocol steps at mid sizes are the measured ones.
        # table_ring: the ring's own calls (Irecv + Isend, then WaitAll), in
        # runs that measured it; a ring step's transfer takes that time.
        self.table, self.table_ex, self.table_ring = table, table_ex, table_ring
        self.bw_ring = (table_ring[-1][0] / max(1e-9, table_ring[-1][1] - alpha)) if table_ring else None
        # duplex: a ring step's exchange (both ends send B at once, with the
        # ring's calls and its progress mode) takes duplex x the one-way time
        # of B: 1 when the two directions move at once, 2 when one waits for
        # the other. Measured by a ring decode on the cluster
        # (Calibration.ring_duplex); None: not measured.
        self.duplex = None

    def with_duplex(self, k):
        other = copy.copy(self)
        other.duplex = k
        return other

    @staticmethod
    def _interp(table, nbytes, alpha, bw):
        if not table or nbytes > table[-1][0]:
            base = table[-1] if table else (0, alpha)
            return base[1] + (nbytes - base[0]) / bw
        xs = np.log([max(1, b) for b, _ in table])
        ys = np.log([t for _, t in table])
        return float(np.exp(np.interp(math.log(max(1, nbytes)), xs, ys)))

    def t(self, nbytes):
        return self._interp(self.table, nbytes, self.alpha, self.bw)

    def t_ex(self, nbytes):
        return self._interp(self.table_ex, nbytes, self.alpha, self.bw_ex)

    def t_ring(self, nbytes):
        """One ring step's exchange (both ends send nbytes to each other with
        the ring's calls): duplex x the one-way time; None when the run did
        not measure the duplex factor."""
        return self.duplex * self.t(nbytes) if self.duplex is not None else None

    def __repr__(self):
        ring = ", %.3f GB/s each way with the ring's calls (ping-pong)" % (self.bw_ring / 1e9) if self.bw_ring else ""
        if self.duplex is not None:
            ring += "; a ring step's exchange: %.2f x the one-way time (ring decode)" % self.duplex
        return "%s: alpha %.1f us, bw %.3f GB/s one way, %.3f GB/s each way in an exchange%s" % (
            self.name, 1e6 * self.alpha, self.bw / 1e9, self.bw_ex / 1e9, ring)


# Progress modes under which a ring step's transfer moves while ranks compute:
# the ring's own TransferPoller (dist/transfer_poller.h, the default) and
# Open MPI's btl_tcp_progress_thread. "none" (and "default" in runs made
# before the poller existed) move data only inside MPI calls.
OVERLAP_MODES = ("thread", "poller")

def nominal_bw(rate):
    s = rate.lower()
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}
    num = s[:-3]
    return float(num[:-1]) * mult[num[-1]] / 8 if num[-1] in mult else float(num) / 8


class Calibration:
    def __init__(self, rows, for_rate=None, for_progress=None):
        self.rows = rows
        self.for_rate, self.for_progress = for_rate, for_progress
        m = next(r["machine"] for r in rows if "machine" in r)
        self.machine = m

        # Calibration rows: those measured just before the points of
        # `for_rate` and `for_progress` (run.sh measures each kernel size right
        # before the cluster point of that size), else those of `for_rate`,
        # else (None, or runs that calibrated once) all of them; the median of
        # each size.
        def calib(label):
            rs = [r for r in rows if r.get("label") == label and
                  (for_rate is None or r.get("calib_for", for_rate) == for_rate)]
            mine = [r for r in rs if for_progress is not None and r.get("calib_progress") == for_progress]
            return mine or rs or [r for r in rows if r.get("label") == label]

        def median_by(rs, key, value):
            g = defaultdict(list)
            for r in rs:
                g[key(r)].append(value(r))
            ks = sorted(g)
            return np.array(ks, float), np.array([float(np.median(g[k])) for k in ks])

        # Prefill kernel, per causal ring step, a = 2 H D / R (causal: half of 4 n^2 H D).
        cp = calib("calib_prefill")
        if not cp:
            sys.exit("[model] no calib_prefill rows in the results")
        self.heads_p, self.hd_p = cp[0]["heads"], cp[0]["head_dim"]
        # Per-step compute of the busiest rank (2 ranks x 1 thread at once, on shared memory).
        # (run.sh: one rank computing one step's work at once with a twin, in
        # runs since 2026-12-01 10:41; 2 ranks x 2 steps before.)
        n, t = median_by(cp, lambda r: r["tokens"] / r["machine"]["ranks"],
                         lambda r: max((x["compute_s"] + x["merge_s"]) / max(1, x["steps"]) for x in r["per_rank"]))
        # Outside the measured N/P: a n^2 through the largest one (its rate R).
        self.c0 = 0.0
        self.a = t[-1] / n[-1] ** 2
        self.R = 2 * self.heads_p * self.hd_p / self.a  # FLOP/s of the prefill kernel, one rank
        self.prefill_points = list(zip(n, t))
        # Decode kernel: t = d0 + bytes / Bdec.
        cd = calib("calib_decode")
        self.kvh_d, self.hd_d, self.heads_d = cd[0]["kv_heads"], cd[0]["head_dim"], cd[0]["heads"]
        b, td = median_by(cd, lambda r: r["tokens"] / r["machine"]["ranks"] * r["kv_heads"] * r["head_dim"] * 8,
                          lambda r: r["tree_compute_ms_per_step_max_rank"] / 1e3)
        # Outside the measured sizes: the rate of the largest one.
        self.d0, self.Bdec = 0.0, b[-1] / td[-1]
        self.decode_points = list(zip(b, td))
        # Batch step compute (1 rank over one shard of every session), by rows.
        self.batch = {(r["heads"], r["batch"]): r["step_ms"] / 1e3 for r in rows if r.get("label") == "calib_batch"}
        # Links.
        self.links = {}
        pp = defaultdict(dict)
        shm_rows = defaultdict(list)
        for r in rows:
            if r["bench"] != "pingpong":
                continue
            if r.get("label") == "pingpong_shm":
                shm_rows[(r.get("calib_for", for_rate) == for_rate or for_rate is None, r["bytes"])].append(r)
                continue
            tag = "2x2" if r.get("label") == "pingpong_2x2" else ""
            pp[(r["link"], r["progress"], tag)][r["bytes"]] = r
        mine = any(k[0] for k in shm_rows)  # this rate's own shared-memory ping-pong, else all
        for (own, b_), rs in shm_rows.items():  # the median run of each size
            if own or not mine:
                prev = pp[("shm", "default", "")].get(b_)
                rs = rs + ([prev] if prev else [])
                pp[("shm", "default", "")][b_] = sorted(rs, key=lambda r: r["one_way_us_median"])[len(rs) // 2]
        self.links4 = {}
        self.alpha_min = {}
        for (link, progress, tag), d in pp.items():
            key = (link, progress)
            if not tag:  # the fastest of the small messages (8 B, 1 KiB)
                self.alpha_min[key] = min(d[b]["one_way_us_min"] for b in d if b <= 1024) * 1e-6
            alpha = d[8]["one_way_us_median"] * 1e-6
            big = max(d)
            one = d[big]["one_way_us_median"] * 1e-6
            ex = d[big].get("exchange_us_median", d[big]["one_way_us_median"]) * 1e-6
            sizes = sorted(d)
            ring = ([(b, d[b]["ring_exchange_us_median"] * 1e-6) for b in sizes]
                    if all("ring_exchange_us_median" in d[b] for b in sizes) else None)
            lk = Link("%s/%s%s" % (link, progress, " 2x2" if tag else ""), alpha, big / max(1e-9, one - alpha),
                      big / max(1e-9, ex - alpha),
                      [(b, d[b]["one_way_us_median"] * 1e-6) for b in sizes],
                      [(b, d[b].get("exchange_us_median", d[b]["one_way_us_median"]) * 1e-6) for b in sizes], ring)
            (self.links4 if tag else self.links)[key] = lk
        # A reduction among 4 ranks sharing this machine's cores, shared memory only.
        r4 = defaultdict(list)
        for r in calib("calib_reduce_4"):
            r4[(r["heads"], r["batch"])].append(r["reduce_only_ms_median"] / 1e3)
        self.reduce4 = {k: float(np.median(v)) for k, v in r4.items()}
        self.shm = self.links.get(("shm", "default"), Link("shm", 1e-6, 5e9))
        # Shared memory past this machine: the minimum latency, the median rate.
        self.shm_clean = Link("shm (min latency)", self.alpha_min.get(("shm", "default"), 1e-6), self.shm.bw,
                              self.shm.bw_ex, table_ring=self.shm.table_ring)
        # Per-call fixed costs, measured at a small size where compute and
        # transfer take microseconds (run.sh: small_calls, calib_small_reduce):
        # on the cluster per (link, progress), and with 2 ranks on shared
        # memory ("shm", the projections' value).
        self.small = defaultdict(list)
        for r in rows:
            label = r.get("label", "")
            if not label.startswith("calib_small_"):
                continue
            if r["link"] == "shm" and for_rate is not None and any(
                    x.get("label") == label and x.get("calib_for") == for_rate for x in rows) \
                    and r.get("calib_for") != for_rate:
                continue  # the shared-memory calibration made before this rate's points
            key = (label[len("calib_small_"):], r["link"], r["progress"])
            if label == "calib_small_reduce":
                key += (r["map_by"], r["topology"])
            self.small[key].append(r)
        self._overheads = {}
        for key in list(self.links):
            k = self.ring_duplex(*key)
            if k is not None:
                self.links[key] = self.links[key].with_duplex(k)

    def ring_duplex(self, link_name, progress):
        """The duplex factor of (link, progress) (Link.duplex): k such that the
        model of the calibration ring decode (run.sh: calib_ring_decode, N =
        32768, a 33.5 MB block each way at P = 2), with that run's own compute
        and a ring step's transfer of k x the one-way time, equals its measured
        median. The median over those runs; None when there are none."""
        rs = [r for r in self.rows if r.get("label") == "calib_ring_decode" and r["link"] == link_name
              and r["progress"] == progress]
        if not rs or (link_name, progress) not in self.links:
            return None
        ks = []
        for r in rs:
            P = r["machine"]["ranks"]
            c = r["ring_compute_ms_per_step_max_rank"] / 1e3 / P
            overlap = progress in OVERLAP_MODES
            target = r["ring_ms_median"] / 1e3
            lo, hi = 0.1, 10.0
            for _ in range(40):  # the model's time grows with k
                k = 0.5 * (lo + hi)
                t = predict_decode(self, r["tokens"], P, self.links[(link_name, progress)].with_duplex(k), overlap,
                                   "ring", 1, "two-level", r["heads"], r["queries"], compute=c)
                lo, hi = (k, hi) if t < target else (lo, k)
            ks.append(0.5 * (lo + hi))
        return float(np.median(ks))

    def overhead(self, what, link_name, progress, method=None, map_by=None, topology=None):
        """The per-step fixed cost α of a call, in seconds, measured at a small
        size: (median measured time - the model's time of that call without α,
        with the call's own measured compute), divided by the steps it has.
        what:
          "prefill": per ring step (a ring prefill of N/P = 32 at P = 2: two
            steps; the handshake is modelled apart);
          "decode": method "tree": per reduction round (a decode of N = 2048
            at P = 2: one round); "ring": per ring step;
          "reduce": per reduction (8 rows among 2 hosts x 2 ranks, by
            map_by and topology).
        0 when the run did not measure it (runs before these calibrations)."""
        key = (what, link_name, progress) + ((map_by, topology) if what == "reduce" else ())
        memo = key + (method,)
        if memo in self._overheads:
            return self._overheads[memo]
        rs = self.small.get(key, [])
        link = self.shm if link_name == "shm" else self.link(link_name, progress)
        overlap = progress in OVERLAP_MODES or link_name == "shm"
        vals = []
        for r in rs:
            P = r["machine"]["ranks"]
            if what == "prefill":
                rc = [x["compute_s"] + x["merge_s"] for x in sorted(r["per_rank"], key=lambda x: x["rank"])]
                core = predict_prefill(self, r["tokens"], P, link, overlap, r.get("layout", "zigzag"), r["heads"],
                                       r["kv_heads"], r["head_dim"], rank_compute=rc)[0]
                vals.append((r["seconds"] - core) / P)
            elif what == "decode":
                c = r["%s_compute_ms_per_step_max_rank" % method] / 1e3 / (1 if method == "tree" else P)
                core = predict_decode(self, r["tokens"], P, link, overlap, method, 1, "two-level", r["heads"],
                                      r["queries"], compute=c)
                steps = math.ceil(math.log2(P)) if method == "tree" else P
                vals.append((r["%s_ms_median" % method] / 1e3 - core) / steps)
            else:
                link4 = self.links4.get((link_name, progress), link)
                core = reduce_2x2(self, r, link4, "two-level" if topology == "two-level" else "flat-spread")
                vals.append(r["reduce_only_ms_median"] / 1e3 - core)
        self._overheads[memo] = float(np.median(vals)) if vals else 0.0
        return self._overheads[memo]

    def t_step(self, n, frac=0.5):
        """Compute of one causal ring step (half of n x n visible): the measured
        per-step time, log-log interpolated between the calibrated N/P; the
        c0 + a n^2 fit outside them. frac scales to other visible fractions."""
        if frac <= 0:
            return 0.0
        ns = [p[0] for p in self.prefill_points]
        if ns[0] <= n <= ns[-1]:
            t = float(np.exp(np.interp(math.log(n), np.log(ns), np.log([p[1] for p in self.prefill_points]))))
        else:
            t = self.c0 + self.a * n * n
        return t * frac / 0.5

    def t_decode(self, n_tokens, kv_heads=None, head_dim=None):
        """Local decode over n_tokens: interpolated between the calibrated
        sizes (by KV bytes), the d0 + bytes / Bdec fit outside them."""
        kv_heads = kv_heads or self.kvh_d
        head_dim = head_dim or self.hd_d
        b = n_tokens * kv_heads * head_dim * 8
        bs = [p[0] for p in self.decode_points]
        if len(bs) > 1 and bs[0] <= b <= bs[-1]:
            return float(np.exp(np.interp(math.log(b), np.log(bs), np.log([p[1] for p in self.decode_points]))))
        return self.d0 + b / self.Bdec

    def link(self, rate, progress, nominal=False):
        """The link as measured in this run; nominal=True (projections): the
        nominal rate less TCP/IP headers, with the lowest latency measured."""
        if not nominal and (rate, progress) in self.links:
            return self.links[(rate, progress)]
        # Past this machine: nominal rate less TCP/IP headers, latency as measured.
        alphas = [l.alpha for (r, p), l in self.links.items() if p == progress and r != "shm"]
        alpha = float(np.median(alphas)) if alphas else 20e-6
        # The minimum over the ping-pongs: this machine is shared, so medians
        # include other work's time slices, which a real host would not have.
        mins = [self.alpha_min[k] for k in self.alpha_min if k[1] == progress and k[0] != "shm"]
        alpha = float(np.median(mins)) if mins else alpha
        bw = nominal_bw(rate) * 0.94
        return Link("%s/%s (nominal)" % (rate, progress), alpha, bw, bw)  # no table: alpha + B / bw

    def summary(self):
        out = ["calibration (%s, kernel path %s, from the same run):" % (self.machine.get("cpu"),
                                                                       self.machine.get("kernel_path"))]
        out.append("  prefill kernel, 1 thread per rank, 2 ranks at once, per causal ring step (interpolated "
                   "between these; beyond, a n^2 through the largest: R = %.1f GFLOP/s):" % (self.R / 1e9))
        out.append("    " + "  ".join("N/P=%d %.3f ms (%.1f GFLOP/s)" % (n, 1e3 * t, 2 * n * n * self.heads_p * self.hd_p / t / 1e9)
                                      for n, t in self.prefill_points))
        out.append("  decode kernel, 1 thread per rank, 2 ranks at once (interpolated; beyond, %.2f GB/s of KV):"
                   % (self.Bdec / 1e9))
        out.append("    " + "  ".join("N/P=%d %.3f ms (%.2f GB/s)" % (b / (self.kvh_d * self.hd_d * 8), 1e3 * t, b / t / 1e9)
                                      for b, t in self.decode_points))
        for (h, b), t in sorted(self.reduce4.items()):
            own = reduce_time(self, 4, 4, h * b, self.hd_d, self.shm_clean, "two-level")
            out.append("  reduction of %d rows among 4 ranks on shared memory (4 ranks on this machine's 2 cores): "
                       "%.3f ms, time-sharing factor %.1f against %.3f ms modelled with a core per rank"
                       % (h * b, 1e3 * t, t / own, 1e3 * own))
        for key in sorted(self.links, key=lambda k: (k[0] != "shm", k)):
            out.append("  link %s" % self.links[key])
        for key in sorted(self.links4):
            out.append("  link %s (ranks 0 and 3 of 2 hosts x 2 ranks, 1 and 2 polling)" % self.links4[key])
        keys = sorted({k[1:3] for k in self.small if k[0] != "reduce"}, key=lambda k: (k[0] != "shm", k))
        if keys:
            out.append("  fixed cost alpha per step, measured at a small size (prefill N/P = 32, per ring step; "
                       "decode N = 2048, per tree round / per ring step):")
            for link_name, progress in keys:
                out.append("    %-7s %-8s prefill %7.3f ms   decode tree %7.3f ms   ring %7.3f ms" % (
                    link_name, progress, 1e3 * self.overhead("prefill", link_name, progress),
                    1e3 * self.overhead("decode", link_name, progress, "tree"),
                    1e3 * self.overhead("decode", link_name, progress, "ring")))
        rkeys = sorted({k[1:] for k in self.small if k[0] == "reduce"})
        if rkeys:
            out.append("  fixed cost alpha of a reduction among 2 hosts x 2 ranks (8 rows):")
            for link_name, progress, map_by, topo in rkeys:
                out.append("    %-7s %-8s by %-4s %-9s %7.3f ms" % (link_name, progress, map_by, topo,
                                                                 1e3 * self.overhead("reduce", link_name, progress,
                                                                                     map_by=map_by, topology=topo)))
        return "\n".join(out)


# ----------------------------------------------------------------------------- the model
def ring_time(P, compute, T, overlap):
    """Simulates a ring of P steps. compute: [P ranks, P steps] seconds; T: one
    block's transfer seconds on the edge r -> r+1 (a scalar, or [P] by the
    sending rank: ranks placed host by host, only the edge that leaves a host
    crosses its link, the others are shared memory). Returns (total time = the
    last rank's end, wait per rank)."""
    compute = np.asarray(compute, float)
    T = np.broadcast_to(np.asarray(T, float), (P,))
    start = np.zeros(P)
    busy = np.zeros(P)
    ranks = np.arange(P)
    prev, nxt = (ranks - 1) % P, (ranks + 1) % P
    for s in range(P):
        c = compute[:, s]
        end_c = start + c
        if s + 1 < P and P > 1:
            if overlap:
                recv_start = np.maximum(start, start[prev])
                send_start = np.maximum(start, start[nxt])
            else:
                recv_start = np.maximum(end_c, end_c[prev])
                send_start = np.maximum(end_c, end_c[nxt])
            end = np.maximum.reduce([end_c, recv_start + T[prev], send_start + T])
        else:
            end = end_c
        busy += c
        start = end
    return float(start.max()), start - busy


def causal_fracs(P, layout):
    """Visible fraction of each (rank, step) block pair, causal."""
    f = np.zeros((P, P))
    for r in range(P):
        for s in range(P):
            o = (r - s) % P
            if layout == "zigzag":
                f[r, s] = 0.5
            else:
                f[r, s] = 1.0 if o < r else 0.5 if o == r else 0.0
    return f


def edge_times(cal, P, per_host, link, nbytes, overlap=True):
    """Transfer time of each ring edge r -> r+1, ranks placed host by host.
    With overlap the time of an exchange (both ends send at once, the
    transport's progress thread competing with compute); without, the one-way
    time: then both ranks sit in MPI waits and the link is full duplex (in
    this machine's runs the no-overlap ring moved its blocks at the one-way
    rate each way, while MPI_Sendrecv's exchange took about twice as long)."""
    def f(l):
        ring = l.t_ring(nbytes)  # measured with the ring's calls: the same for both modes
        if ring is not None:
            return ring
        return l.t_ex(nbytes) if overlap else l.t(nbytes)
    if per_host <= 1:
        return f(link)
    r = np.arange(P)
    crossing = ((r + 1) % per_host == 0) | (r == P - 1)
    return np.where(crossing, f(link), f(cal.shm))


def predict_prefill(cal, N, P, link, overlap, layout="zigzag", heads=None, kv_heads=None, head_dim=None,
                    rank_compute=None, per_host=1, overhead=0.0):
    """rank_compute: optional [P] measured compute seconds of each rank in the
    run (the check's second column): spread over the steps by the layout's
    work, instead of the calibrated kernel. overhead: the fixed cost α of a
    ring step (Calibration.overhead), added once per step."""
    heads = heads or cal.heads_p
    kv_heads = kv_heads or heads
    head_dim = head_dim or cal.hd_p
    n = N / P
    scale = heads * head_dim / (cal.heads_p * cal.hd_p)
    fr = causal_fracs(P, layout)
    comp = np.where(fr > 0, cal.c0 + cal.a * scale * n * n * fr / 0.5, 0.0)
    if rank_compute is not None:
        comp = comp / comp.sum(axis=1, keepdims=True) * np.asarray(rank_compute, float)[:, None]
    block = 2 * n * kv_heads * head_dim * 4
    T = edge_times(cal, P, per_host, link, block, overlap)
    total, wait = ring_time(P, comp, T, overlap)
    handshake = 2 * math.ceil(math.log2(P)) * 2 * link.alpha if P > 1 else 0.0  # two allgathers
    return total + handshake + P * overhead, float(wait.max()) + handshake, float(comp.max(axis=0).mean())


def threshold(cal, link, heads=None, kv_heads=None, head_dim=None):
    """N/P above which one causal step's compute outlasts the block's transfer."""
    heads = heads or cal.heads_p
    kv_heads = kv_heads or heads
    head_dim = head_dim or cal.hd_p
    # 4 n^2 H D / 2 / R = 2 n Hkv D 4 / bw  ->  n* = Hkv 4 R / (H bw)
    return kv_heads * 4 * cal.R / (heads * link.bw)


def reduce_time(cal, P, per_host, rows, head_dim, link, mode, shm=None):
    """One binomial reduction (round k: rank r + 2^k sends to r) of rows (D+1) 4
    bytes over P ranks, per_host per host.
      two-level, or flat with ranks placed host by host ("flat-by-slot": the
        binomial rounds then fall the same way): log2(per_host) rounds on shared
        memory in every host at once, then log2(hosts) rounds of one message per
        link;
      flat-spread (ranks dealt over the hosts, "by node", or any placement the
        library does not see): log2(hosts) rounds first, in each of which the
        sending hosts send per_host messages over their one link, then
        log2(per_host) rounds on shared memory."""
    shm = shm or cal.shm
    if P <= 1:
        return 0.0
    m = rows * (head_dim + 1) * 4
    g = max(1, min(per_host, P))
    hosts = max(1, math.ceil(P / g))
    intra = math.ceil(math.log2(g)) if g > 1 else 0
    inter = math.ceil(math.log2(hosts)) if hosts > 1 else 0
    if mode == "flat-spread" and inter > 0:
        return inter * (link.alpha + g * m / link.bw) + intra * shm.t(m)
    return intra * shm.t(m) + inter * link.t(m)


def reduce_2x2(cal, r, link, mode, overhead=0.0):
    """2 hosts x 2 ranks on this machine: the measured cost of the same
    reduction among 4 ranks on shared memory (4 busy-polling ranks on 2 cores),
    plus what the link adds over shared memory on the rounds that cross it."""
    m = r["heads"] * r["batch"] * (r["head_dim"] + 1) * 4
    base = cal.reduce4.get((r["heads"], r["batch"]))
    if base is None:
        return reduce_time(cal, 4, 2, r["heads"] * r["batch"], r["head_dim"], link, mode)
    if mode == "flat-spread":  # round 1: 1->0 and 3->2 both cross, host2 -> host1, one link
        extra = link.alpha + 2 * m / link.bw - cal.shm.t(m)
    else:  # one round crosses: 2 -> 0
        extra = link.t(m) - cal.shm.t(m)
    return base + max(0.0, extra) + overhead


def predict_decode(cal, N, P, link, overlap, method, per_host=1, mode="two-level", heads=None, queries=1,
                   compute=None, kv_heads=None, overhead=0.0):
    """compute: optional measured local decode seconds per step (the check's
    second column). overhead: the fixed cost α (Calibration.overhead) of a
    reduction round (tree) or of a ring step (ring)."""
    heads = heads or cal.heads_d
    kv_heads = kv_heads or cal.kvh_d
    n = N / P
    c = cal.t_decode(n, kv_heads) if compute is None else compute
    if method == "tree":
        rounds = math.ceil(math.log2(P)) if P > 1 else 0
        return c + reduce_time(cal, P, per_host, queries * heads, cal.hd_d, link, mode) + rounds * overhead
    comp = np.full((P, P), c)
    block = 2 * n * kv_heads * cal.hd_d * 4
    total, _ = ring_time(P, comp, edge_times(cal, P, per_host, link, block, overlap), overlap)
    return total + (2 * link.alpha if P > 1 else 0.0) + P * overhead


# ----------------------------------------------------------------------------- check
def check(cal):
    """Every measured cluster point against the model: (1) fully predicted from
    the calibration; (2) the same model with each rank's compute time taken
    from the run itself, which isolates the link/overlap part of the model from
    the load other work puts on this shared machine's cores."""
    rows = cal.rows
    lines = []
    errs, errs2 = [], []
    cals = {}

    def cal_for(rate, progress):  # the calibration measured just before those points
        if (rate, progress) not in cals:
            cals[(rate, progress)] = Calibration(rows, rate, progress)
        return cals[(rate, progress)]

    groups = defaultdict(list)

    def add(what, measured, predicted, predicted2, group):
        e = predicted / measured - 1 if measured > 0 else float("inf")
        e2 = predicted2 / measured - 1 if measured > 0 else float("inf")
        errs.append((abs(e), what))
        errs2.append((abs(e2), what))
        groups[group].append((abs(e), abs(e2)))
        lines.append("  %-54s %10.3f ms | %10.3f ms %+5.0f%%%s | %10.3f ms %+5.0f%%%s" % (
            what, 1e3 * measured, 1e3 * predicted, 100 * e, " !" if abs(e) > 0.2 else "  ",
            1e3 * predicted2, 100 * e2, " !" if abs(e2) > 0.2 else "  "))

    lines.append("%-56s %13s | %22s | %22s" % ("point", "measured", "model (calibrated)", "model (run's compute)"))
    lines.append("prefill, causal, 2 hosts x 1 rank: wall time of the call [max wait measured / model]")
    for r in rows:
        if r["bench"] != "prefill" or r.get("label") not in ("prefill", "prefill_contiguous"):
            continue
        cl = cal_for(r["link"], r["progress"])
        P = r["machine"]["ranks"]
        link = cl.link(r["link"], r["progress"])
        overlap = r["progress"] in OVERLAP_MODES
        args = (cl, r["tokens"], P, link, overlap, r.get("layout", "zigzag"), r["heads"], r["kv_heads"], r["head_dim"])
        alpha = cl.overhead("prefill", r["link"], r["progress"])
        tot, wait, _ = predict_prefill(*args, overhead=alpha)
        rc = [x["compute_s"] + x["merge_s"] for x in sorted(r["per_rank"], key=lambda x: x["rank"])]
        tot2, wait2, _ = predict_prefill(*args, rank_compute=rc, overhead=alpha)
        mw = max(x["wait_s"] for x in r["per_rank"])
        add("%-6s %-7s %-6s N/P=%5d [%.1f/%.1f ms]" % (r["link"], r["progress"], r.get("layout")[:6],
                                                    r["tokens"] // P, 1e3 * mw, 1e3 * wait2), r["seconds"], tot, tot2,
            "prefill, N/P >= 2048" if r["tokens"] // P >= 2048 else "prefill, N/P <= 1024")
    lines.append("decode, 2 hosts x 1 rank: median per step as seen by rank 0")
    for r in rows:
        if r["bench"] != "decode" or r.get("label") != "decode":
            continue
        cl = cal_for(r["link"], r["progress"])
        P = r["machine"]["ranks"]
        link = cl.link(r["link"], r["progress"])
        overlap = r["progress"] in OVERLAP_MODES
        for method in ("tree", "ring"):
            alpha = cl.overhead("decode", r["link"], r["progress"], method)
            p = predict_decode(cl, r["tokens"], P, link, overlap, method, 1, "two-level", r["heads"], r["queries"],
                               overhead=alpha)
            c = r["%s_compute_ms_per_step_max_rank" % method] / 1e3 / (1 if method == "tree" else P)
            p2 = predict_decode(cl, r["tokens"], P, link, overlap, method, 1, "two-level", r["heads"], r["queries"],
                                compute=c, overhead=alpha)
            add("%-6s %-7s %s N=%7d" % (r["link"], r["progress"], method, r["tokens"]),
                r["%s_ms_median" % method] / 1e3, p, p2,
                "decode %s, N %s 65536" % (method, ">=" if r["tokens"] >= 65536 else "<"))
    lines.append("tree reduction alone, 2 hosts x 2 ranks (4 ranks on %s cores; model = the same reduction among 4 "
                 "ranks on shared memory, measured, + the link's extra on the rounds that cross it, the link as "
                 "measured with 4 ranks running)"
                 % cal.machine.get("cores"))
    # Flat: Open MPI's own reduction is not topology-aware here. With 1 MB
    # records at 1 Gb/s it took ~2x two-level in both placements: two messages
    # crossed the link (the "flat-spread" rounds), not one.
    for r in rows:
        if r["bench"] != "decode_batch" or r.get("label") != "tree_2x2":
            continue
        cl = cal_for(r["link"], r["progress"])
        link = cl.links4.get((r["link"], r["progress"]), cl.link(r["link"], r["progress"]))
        mode = "two-level" if r["topology"] == "two-level" else "flat-spread"
        p = reduce_2x2(cl, r, link, mode, cl.overhead("reduce", r["link"], r["progress"], map_by=r["map_by"],
                                                      topology=r["topology"]))
        add("%-6s %-7s by %-4s %-9s rows %4d" % (r["link"], r["progress"], r["map_by"], r["topology"],
                                                r["heads"] * r["batch"]), r["reduce_only_ms_median"] / 1e3, p, p,
            "2x2 reduction, %s rows, %s" % (r["heads"] * r["batch"], r["link"]))
    lines.append("within 20%, by group (calibrated / with the run's compute):")
    for gname in sorted(groups):
        g = groups[gname]
        lines.append("  %-34s %2d / %2d of %2d   median |error| %3.0f%% / %3.0f%%" % (
            gname, sum(1 for e, _ in g if e <= 0.2), sum(1 for _, e in g if e <= 0.2), len(g),
            100 * float(np.median([e for e, _ in g])), 100 * float(np.median([e for _, e in g]))))
    for name, es in (("calibrated", errs), ("with the run's compute", errs2)):
        if not es:
            continue
        n_ok = sum(1 for e, _ in es if e <= 0.2)
        worst = max(es)
        lines.append("model (%s) within 20%% of %d of %d measured points; median |error| %.0f%%, worst %.0f%% (%s)" % (
            name, n_ok, len(es), 100 * float(np.median([e for e, _ in es])), 100 * worst[0], " ".join(worst[1].split())))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- projections
def fmt_t(s):
    if s >= 3600:
        return "%.1f h" % (s / 3600)
    if s >= 60:
        return "%.1f min" % (s / 60)
    if s >= 1:
        return "%.2f s" % s
    return "%.1f ms" % (1e3 * s)


def projections(cal, args, out_dir):
    lines = []
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    # The fixed costs α per step as measured with 2 ranks on 2 cores and no
    # link: on a host of its own a rank has a core, so the time-sharing part
    # of the cluster's α (other ranks, pollers and the emulated network
    # stack on the same 2 cores) does not apply.
    alpha_prefill = cal.overhead("prefill", "shm", "default")
    alpha_tree = cal.overhead("decode", "shm", "default", "tree")
    alpha_ring = cal.overhead("decode", "shm", "default", "ring")

    def prefill(*a, **k):
        return predict_prefill(*a, overhead=alpha_prefill, **k)

    def decode(*a, **k):  # a[5]: the method
        return predict_decode(*a, overhead=alpha_tree if a[5] == "tree" else alpha_ring, **k)

    thr_scale = args.threads_per_rank
    g = args.ranks_per_host
    cal.shm = cal.shm_clean  # past this machine: no other work's time slices
    lines.append("Projections past this machine: a rank = %d thread(s) at the measured kernel rate "
                 "(prefill %.1f GFLOP/s, decode %.2f GB/s per thread, scaled linearly), %d ranks per host, "
                 "H=%d, Hkv=%d, D=%d, float32 KV; links at their nominal rate less 6%% TCP/IP headers, "
                 "latency the minimum measured here (progress thread; shared memory %.1f us), two-level tree unless said; "
                 "fixed costs alpha as measured with 2 ranks on 2 cores: %.3f ms per prefill ring step, %.3f ms per "
                 "tree round, %.3f ms per ring-decode step; links full duplex (k = 1); no time-sharing."
                 % (thr_scale, cal.R / 1e9, cal.Bdec / 1e9, args.ranks_per_host, H, Hkv, D, 1e6 * cal.shm_clean.alpha,
                    1e3 * alpha_prefill, 1e3 * alpha_tree, 1e3 * alpha_ring))
    # Scale the rank's rates.
    cal.a /= thr_scale
    cal.Bdec *= thr_scale
    cal.R *= thr_scale
    Ns = [131072, 1 << 20, 10 * (1 << 20), 100_000_000]
    Ps = [8, 64, 256, 1024]
    rates = ["10gbit", "25gbit", "100gbit"]
    lines.append("\nN/P* (causal ring prefill hides the transfer above it):")
    for rate in rates:
        lines.append("  %-8s N/P* = %7.0f tokens" % (rate, threshold(cal, cal.link(rate, "thread", nominal=True), H, Hkv, D)))
    for rate in ["10gbit", "100gbit"]:
        link = cal.link(rate, "thread", nominal=True)
        lines.append("\nprefill, causal, %s links: zigzag / contiguous (overlapping transport); "
                     "* = N/P below N/P* (transfer-bound)" % rate)
        lines.append("  %-10s" % "N \\ P" + "".join("%26s" % P for P in Ps))
        for N in Ns:
            cells = []
            for P in Ps:
                z, _, _ = prefill(cal, N, P, link, True, "zigzag", H, Hkv, D, per_host=g)
                c, _, _ = prefill(cal, N, P, link, True, "contiguous", H, Hkv, D, per_host=g)
                star = "*" if N / P < threshold(cal, link, H, Hkv, D) else " "
                cells.append("%11s / %10s%s" % (fmt_t(z), fmt_t(c), star))
            lines.append("  %-10d" % N + "".join("%26s" % c for c in cells))
    link10 = cal.link("10gbit", "thread", nominal=True)
    lines.append("\nprefill, causal zigzag, 10gbit: overlapping transport vs none (Open MPI TCP without a progress thread)")
    lines.append("  %-10s" % "N \\ P" + "".join("%26s" % P for P in Ps))
    for N in Ns:
        cells = []
        for P in Ps:
            a_, _, _ = prefill(cal, N, P, link10, True, "zigzag", H, Hkv, D, per_host=g)
            b_, _, _ = prefill(cal, N, P, link10, False, "zigzag", H, Hkv, D, per_host=g)
            cells.append("%11s / %10s" % (fmt_t(a_), fmt_t(b_)))
        lines.append("  %-10d" % N + "".join("%26s" % c for c in cells))
    for rate in ["10gbit", "100gbit"]:
        link = cal.link(rate, "thread", nominal=True)
        lines.append("\ndecode latency per token, 1 query, %s: tree two-level / tree flat (spread) / ring" % rate)
        lines.append("  %-10s" % "N \\ P" + "".join("%34s" % P for P in Ps))
        for N in Ns:
            cells = []
            for P in Ps:
                t2 = decode(cal, N, P, link, True, "tree", args.ranks_per_host, "two-level", H, kv_heads=Hkv)
                tf = decode(cal, N, P, link, True, "tree", args.ranks_per_host, "flat-spread", H, kv_heads=Hkv)
                rg = decode(cal, N, P, link, True, "ring", args.ranks_per_host, heads=H, kv_heads=Hkv) if P <= 1024 else float("nan")
                cells.append("%9s / %9s / %9s" % (fmt_t(t2), fmt_t(tf), fmt_t(rg)))
            lines.append("  %-10d" % N + "".join("%34s" % c for c in cells))
    # Where the reduction matters: a batch of 64 sessions x H rows.
    lines.append("\ntree reduction alone, 64 sessions x %d heads per step (%.0f KB per rank), 10gbit / 100gbit:"
                 % (H, 64 * H * (D + 1) * 4 / 1e3))
    for P in Ps:
        cells = []
        for rate in ["10gbit", "100gbit"]:
            link = cal.link(rate, "thread", nominal=True)
            t2 = reduce_time(cal, P, args.ranks_per_host, 64 * H, D, link, "two-level")
            tf = reduce_time(cal, P, args.ranks_per_host, 64 * H, D, link, "flat-spread")
            cells.append("%s two-level %s, flat spread %s" % (rate, fmt_t(t2), fmt_t(tf)))
        lines.append("  P=%-5d %s" % (P, "   ".join(cells)))
    # Where each choice wins, over N = 128k..100M and P = 8..1024.
    lines.append("\nwhere each choice wins (N = 128Ki..100M, P = 8..1024):")
    grid = [(N, P) for N in Ns for P in Ps]
    for rate in ["10gbit", "100gbit"]:
        link = cal.link(rate, "thread", nominal=True)
        cz = [(prefill(cal, N, P, link, True, "contiguous", H, Hkv, D, per_host=g)[0] /
               prefill(cal, N, P, link, True, "zigzag", H, Hkv, D, per_host=g)[0], N, P) for N, P in grid]
        no = [(prefill(cal, N, P, link, False, "zigzag", H, Hkv, D, per_host=g)[0] /
               prefill(cal, N, P, link, True, "zigzag", H, Hkv, D, per_host=g)[0], N, P) for N, P in grid]
        rt = [(decode(cal, N, P, link, True, "ring", g, heads=H, kv_heads=Hkv) /
               decode(cal, N, P, link, True, "tree", g, "two-level", H, kv_heads=Hkv), N, P) for N, P in grid]
        ft = [(decode(cal, N, P, link, True, "tree", g, "flat-spread", H, kv_heads=Hkv) /
               decode(cal, N, P, link, True, "tree", g, "two-level", H, kv_heads=Hkv), N, P) for N, P in grid]
        lines.append("  %s: causal prefill, contiguous / zigzag time: %.2f-%.2fx (zigzag wins everywhere; "
                     "(2P-1)/P when compute-bound)" % (rate, min(cz)[0], max(cz)[0]))
        big = [x for x in no if x[0] > 1.1]
        lines.append("  %s: prefill without overlap / with: %.3f-%.2fx; > 1.1x at %s" % (
            rate, min(no)[0], max(no)[0], ", ".join("N=%s P=%d" % (fmt_n(N), P) for _, N, P in big) or "no point"))
        lines.append("  %s: decode, ring / tree (two-level): %.0f-%.0fx (tree wins everywhere)" % (
            rate, min(rt)[0], max(rt)[0]))
        lines.append("  %s: decode of one query, flat (ranks spread) / two-level: %.2f-%.2fx" % (
            rate, min(ft)[0], max(ft)[0]))
    text = "\n".join(lines)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return text
    Pg = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    for N, c in zip([1 << 20, 10 * (1 << 20), 100_000_000], ["tab:blue", "tab:orange", "tab:green"]):
        z = [prefill(cal, N, P, link10, True, "zigzag", H, Hkv, D, per_host=g)[0] for P in Pg]
        cg = [prefill(cal, N, P, link10, True, "contiguous", H, Hkv, D, per_host=g)[0] for P in Pg]
        nz = [prefill(cal, N, P, link10, False, "zigzag", H, Hkv, D, per_host=g)[0] for P in Pg]
        ax.plot(Pg, z, "-o", color=c, label="N=%s zigzag" % fmt_n(N))
        ax.plot(Pg, cg, "--", color=c, label="N=%s contiguous" % fmt_n(N))
        ax.plot(Pg, nz, ":", color=c, label="N=%s zigzag, no overlap" % fmt_n(N))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("P (ranks)")
    ax.set_ylabel("causal prefill time (s)")
    ax.set_title("model: prefill, 10 Gb/s links, H=%d Hkv=%d D=%d" % (H, Hkv, D))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    ax = axes[1]
    for N, c in zip([1 << 20, 100_000_000], ["tab:blue", "tab:green"]):
        for rate, ls in [("10gbit", "-"), ("100gbit", "--")]:
            link = cal.link(rate, "thread", nominal=True)
            ax.plot(Pg, [decode(cal, N, P, link, True, "tree", args.ranks_per_host, "two-level", H, kv_heads=Hkv) for P in Pg],
                    ls, color=c, marker="o", label="tree, N=%s, %s" % (fmt_n(N), rate))
            ax.plot(Pg, [decode(cal, N, P, link, True, "ring", args.ranks_per_host, heads=H, kv_heads=Hkv) for P in Pg],
                    ls, color=c, marker="x", alpha=0.6, label="ring, N=%s, %s" % (fmt_n(N), rate))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("P (ranks)")
    ax.set_ylabel("decode latency per token (s)")
    ax.set_title("model: decode, tree vs ring")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "scaling_model.png"), dpi=110)
    plt.close(fig)
    return text


def fmt_n(N):
    if N >= 1e6 and N % (1 << 20) == 0:
        return "%dMi" % (N >> 20)
    if N >= 1e6:
        return "%dM" % (N // 1_000_000)
    return "%dk" % (N // 1024)


def check_plot(cal, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    meas, pred, kind = [], [], []
    cals = {}
    for r in cal.rows:
        key = (r.get("link"), r.get("progress"))
        if key[0] and key[0] != "shm" and key not in cals:
            cals[key] = Calibration(cal.rows, *key)
        cl = cals.get(key, cal)
        if r["bench"] == "prefill" and r.get("label") in ("prefill", "prefill_contiguous"):
            P = r["machine"]["ranks"]
            p = predict_prefill(cl, r["tokens"], P, cl.link(r["link"], r["progress"]), r["progress"] in OVERLAP_MODES,
                                r.get("layout", "zigzag"), r["heads"], r["kv_heads"], r["head_dim"],
                                overhead=cl.overhead("prefill", *key))[0]
            meas.append(r["seconds"]); pred.append(p); kind.append("prefill " + r["progress"])
        elif r["bench"] == "decode" and r.get("label") == "decode":
            for m in ("tree", "ring"):
                p = predict_decode(cl, r["tokens"], 2, cl.link(r["link"], r["progress"]), r["progress"] in OVERLAP_MODES,
                                   m, 1, "two-level", r["heads"], r["queries"], overhead=cl.overhead("decode", *key, m))
                meas.append(r["%s_ms_median" % m] / 1e3); pred.append(p); kind.append("decode %s" % m)
        elif r["bench"] == "decode_batch" and r.get("label") == "tree_2x2":
            mode = "two-level" if r["topology"] == "two-level" else "flat-spread"
            p = reduce_2x2(cl, r, cl.links4.get(key, cl.link(*key)), mode,
                           cl.overhead("reduce", *key, map_by=r["map_by"], topology=r["topology"]))
            meas.append(r["reduce_only_ms_median"] / 1e3); pred.append(p); kind.append("reduce 2x2")
    if not meas:
        return
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for k in sorted(set(kind)):
        ax.scatter([m for m, kk in zip(meas, kind) if kk == k], [p for p, kk in zip(pred, kind) if kk == k], label=k, s=18)
    lo, hi = min(meas + pred) * 0.5, max(meas + pred) * 2
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.plot([lo, hi], [1.2 * lo, 1.2 * hi], "k:", lw=0.6)
    ax.plot([lo, hi], [0.8 * lo, 0.8 * hi], "k:", lw=0.6)
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("measured (s)"); ax.set_ylabel("model (s)")
    ax.set_title("scaling model vs the emulated cluster (dotted: ±20%)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "scaling_check.png"), dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibrate", required=True, help="cluster.jsonl of bench/cluster/run.sh")
    ap.add_argument("--check", action="store_true", help="compare with every measured cluster point")
    ap.add_argument("--out-dir", default=None, help="where the plots go (default: next to the results)")
    ap.add_argument("--ranks-per-host", type=int, default=32)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    rows = [json.loads(l) for l in open(args.calibrate) if l.strip()]
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.calibrate))
    cal = Calibration(rows)
    print(cal.summary())
    if args.check:
        print()
        print(check(cal))
        check_plot(cal, out_dir)
    print()
    print(projections(cal, args, out_dir))


if __name__ == "__main__":
    main()
