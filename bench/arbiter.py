"""Benchmark of the core: the pure arbiter, the SQLite ledger under load, and the spec parser.

    .venv/bin/python bench/arbiter.py [--pairs 2000] [--live 10000] [--out bench/results]

Reports, and saves as JSON + Markdown under ``bench/results/`` with the machine it ran on:

* decisions/s of the pure arbiter (``arbiter.decide``) on an RTX 3090 Ti workstation (one GPU,
  a reservation, two leases) and on a DGX H100 node (8 GPUs, 40 leases);
* acquire+release pairs/s on a SQLite ledger (WAL, ``synchronous=NORMAL``) that holds
  ``--live`` live leases spread over 1,000 nodes, each acquire running the real capacity model and
  arbiter for a DGX H100 node inside the ledger's write lock (target ≥ 2,000 pairs/s);
* spec parse time for a typical spec, a 100 kB comment without a marker, and a 100 kB spec body.

Timings are medians of repeated runs; nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from slurm_gpuarb import arbiter, capacity, spec  # noqa: E402
from slurm_gpuarb.config import load  # noqa: E402
from slurm_gpuarb.errors import LeaseSpecError  # noqa: E402
from slurm_gpuarb.ledger import Ledger  # noqa: E402
from slurm_gpuarb.model import Decision, Lease, LeaseState, Request  # noqa: E402
from slurm_gpuarb.telemetry.fake import FakeTelemetry  # noqa: E402


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "platform": platform.platform(), "load_avg": os.getloadavg()}


def per_second(fn: Callable[[], object], n: int, repeats: int = 5) -> float:
    """Median rate of ``fn`` over ``repeats`` batches of ``n`` calls."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def median_time(fn: Callable[[], object], repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def leases_for(node: str, n: int, gpus: int, now: float, start: int = 0) -> list[Lease]:
    return [Lease(id=f"L{node}{i:06d}", node=node, gpus=(i % gpus,), vram_mib=1024, prio="batch", priority=10,
                  preemptible=True, state=LeaseState.GRANTED, created_at=now, spec="gpuarb/1: vram=1024MiB",
                  job_id=str(start + i)) for i in range(n)]


def bench_arbiter(cfg_ws: object, cfg_dgx: object) -> dict[str, float]:
    from slurm_gpuarb.config import Config

    assert isinstance(cfg_ws, Config) and isinstance(cfg_dgx, Config)
    now = time.time()
    out = {}
    for label, cfg, preset, node, n_leases in (("workstation", cfg_ws, "rtx3090ti-24g", "ws1", 2),
                                                ("dgx-h100", cfg_dgx, "dgx-h100", "dgx01", 40)):
        tel = FakeTelemetry(preset, node=node)
        gpus, procs = tel.gpus(), tel.processes()
        live = leases_for(node, n_leases, len(gpus), now)
        states = capacity.build_gpu_states(node, gpus, procs, list(cfg.reservations), live, cfg.policy.margin_mib,
                                           proc_reader=capacity.no_proc_reader)
        req = Request(spec=spec.parse("gpuarb: vram=4GiB prio=batch") or spec.LeaseSpec(), node=node, now=now)
        policy = cfg.policy
        out[f"decide_per_s_{label}"] = per_second(
            lambda req=req, states=states, policy=policy: arbiter.decide(req, states, policy), 2000)
    return out


def bench_ledger(cfg: object, pairs: int, live_total: int) -> dict[str, float]:
    from slurm_gpuarb.config import Config

    assert isinstance(cfg, Config)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger.open(f"sqlite:///{tmp}/ledger.db")
        now = time.time()
        nodes = 1000
        per_node = live_total // nodes
        # Fill through the ledger's own write path, one node at a time.
        for k in range(nodes):
            node = f"n{k:04d}"
            for i in range(per_node):
                req = Request(spec=spec.LeaseSpec(), node=node, now=now, job_id=str(k * per_node + i))
                ledger.acquire(req, _fixed_grant(node, i % 8), spec_text="gpuarb/1: vram=1024MiB", plane="bench")
        filled = len(ledger.live())
        tel = FakeTelemetry("dgx-h100", node="n0000")
        gpus, procs = tel.gpus(), tel.processes()
        parsed = spec.parse("gpuarb: vram=4GiB prio=batch")
        assert parsed is not None

        def decide_for(req: Request) -> Callable[[Sequence[Lease]], Decision]:
            def decide(live: Sequence[Lease]) -> Decision:
                states = capacity.build_gpu_states(req.node, gpus, procs, [], live, cfg.policy.margin_mib,
                                                   proc_reader=capacity.no_proc_reader)
                return arbiter.decide(req, states, cfg.policy)
            return decide

        counter = [0]

        def pair(full: bool) -> None:
            counter[0] += 1
            req = Request(spec=parsed, node="n0000", now=time.time(), job_id=f"b{counter[0]}")
            decide = decide_for(req) if full else _fixed_grant("n0000", 0)
            decision, lease = ledger.acquire(req, decide, spec_text="gpuarb/1: vram=4096MiB prio=batch",
                                             plane="bench")
            assert lease is not None, decision.reason
            ledger.release(lease.id, plane="bench")

        # Ledger alone (a fixed decision), then the whole path: capacity model + arbiter for a DGX H100
        # node (8 GPUs, its live leases as tenants) inside the ledger's write lock.
        ledger_only = per_second(lambda: pair(False), pairs // 5, repeats=5)
        full_path = per_second(lambda: pair(True), pairs // 5, repeats=5)
        ledger.close()
    return {"live_leases": filled, "acquire_release_pairs_per_s_ledger": ledger_only,
            "acquire_release_pairs_per_s_with_arbiter": full_path}


def _fixed_grant(node: str, gpu: int) -> Callable[[Sequence[Lease]], Decision]:
    from slurm_gpuarb.model import Outcome

    def decide(live: Sequence[Lease]) -> Decision:
        return Decision(outcome=Outcome.GRANT, node=node, reason="bench fill", prio="batch", requested_mib=1024,
                        granted_mib=1024, gpus=(gpu,), inputs={"class": {"name": "batch", "priority": 10,
                                                                        "preemptible": True}})
    return decide


def bench_spec() -> dict[str, float]:
    small = "gpuarb: vram=6GiB prio=batch min=4GiB ttl=2h"
    no_marker = "x" * 100_000
    big_body = "gpuarb: " + "vram=6GiB " * 10_000

    def parse_big() -> None:
        with contextlib.suppress(LeaseSpecError):
            spec.parse(big_body)

    return {"parse_small_us": median_time(lambda: spec.parse(small), 2000) * 1e6,
            "parse_100kB_no_marker_us": median_time(lambda: spec.parse(no_marker), 200) * 1e6,
            "parse_100kB_spec_us": median_time(parse_big, 200) * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--live", type=int, default=10_000)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    cfg_ws = load(REPO / "templates" / "examples" / "workstation-3090ti.toml", env={})
    cfg_dgx = load(REPO / "templates" / "examples" / "dgx-h100.toml", env={})
    results: dict[str, object] = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    results.update(bench_spec())
    results.update(bench_arbiter(cfg_ws, cfg_dgx))
    results.update(bench_ledger(cfg_ws, args.pairs, args.live))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "arbiter.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# bench/arbiter.py", "", f"Run {results['when']} on: `{json.dumps(results['machine'])}`", "",
             "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:,.1f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in results.items() if k not in ("machine", "when")]
    (out / "arbiter.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
