"""Compute contention on one GPU: a decode-like LLM step beside big-matmul batch workers, through gpuarb's leases.

    .venv/bin/python bench/contention.py [--seconds 10] [--gpu 0] [--out bench/results]
    .venv/bin/python bench/contention.py --short --out /tmp/x      # the gpu test tier's quick run

Reproduces DESIGN.md's measurement ("Run plane and hooks": on an H100 a decode-like step took 0.42 ms
alone, 5.2 ms beside two big-matmul batch workers under time-slicing, 15.3 ms under uncapped MPS and
0.68 ms with the batch clients at ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=30``; batch kept ~70 % of its
throughput) through the project's own lease path:

1. a host-plane ledger and NVML telemetry in a temp dir, policy ``classes.batch.mps_thread_percent``
   (``--thread-percent``, default 30) and ``classes.llm`` without one;
2. leases from :class:`slurm_gpuarb.service.Arbitration`: one ``prio=llm share=mps engine=torch``,
   two ``prio=batch share=mps engine=torch``; each worker's environment is its lease's knobs
   (:func:`slurm_gpuarb.engines.knobs_for_lease`): the PyTorch memory fraction always, the MPS
   thread cap (batch only) and pinned memory limit under MPS;
3. the MPS control daemon started as the Prolog starts it (:func:`slurm_gpuarb.mps.ensure`);
4. five runs, each worker its own process: the LLM step alone; two batch workers alone (their
   baseline throughput); LLM + batch time-sliced (no MPS); under MPS uncapped; under MPS with the
   batch workers' thread cap from their grant.

The LLM step is ``--layers`` MLP blocks (``tokens × hidden`` @ ``hidden × ffn`` @ ``ffn × hidden``,
fp16) followed by a synchronize: memory-bound small GEMMs, as in decoding. A batch worker runs
``--matrix``² fp16 matmuls back to back. Reports p50/p99 step latency and batch matmuls/s (and
TFLOP/s) per run, and writes ``contention.json`` + ``contention.md`` under ``--out`` with the GPU
(``nvidia-smi`` name, driver, compute mode). Without PyTorch or a CUDA GPU it says so and exits 2,
writing nothing; without ``nvidia-cuda-mps-control`` the MPS runs are recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EXIT_UNAVAILABLE = 2
DESIGN = {"alone_ms": 0.42, "time_sliced_ms": 5.2, "mps_uncapped_ms": 15.3, "mps_capped_ms": 0.68,
          "batch_kept": 0.70, "gpu": "H100"}
RUNS = ("alone", "batch_alone", "time_sliced", "mps_uncapped", "mps_capped")
RUN_TITLES = {"alone": "LLM step alone", "batch_alone": "2 batch workers alone (no LLM)",
              "time_sliced": "LLM + 2 batch, time-sliced (no MPS)", "mps_uncapped": "LLM + 2 batch, MPS uncapped",
              "mps_capped": "LLM + 2 batch, MPS, batch capped by their grant"}
WAIT_S = 180.0  # a worker that is not ready after this long (cuBLAS init, a busy GPU) fails the run


# --------------------------------------------------------------------------- pure helpers (unit-tested)


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of an ascending list, nearest-rank (no interpolation between samples)."""
    if not sorted_ms:
        raise ValueError("no samples")
    rank = max(1, min(len(sorted_ms), -(-int(q * 1000) * len(sorted_ms) // 1000)))
    return sorted_ms[rank - 1]


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float | int]:
    s = sorted(samples_ms)
    return {"p50_ms": round(percentile(s, 0.50), 4), "p99_ms": round(percentile(s, 0.99), 4),
            "mean_ms": round(statistics.fmean(s), 4), "min_ms": round(s[0], 4), "max_ms": round(s[-1], 4),
            "steps": len(s)}


def batch_summary(results: Sequence[Mapping[str, Any]], matrix: int) -> dict[str, float | int]:
    """Total matmuls/s and TFLOP/s of the batch workers of one run (each reported its count and seconds)."""
    per_s = sum(r["iters"] / r["seconds"] for r in results if r["seconds"] > 0)
    return {"workers": len(results), "matmuls_per_s": round(per_s, 2),
            "tflops": round(per_s * 2 * matrix**3 / 1e12, 2)}


def summarize(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """LLM slowdowns against the LLM alone; batch throughput against batch alone and against uncapped MPS."""
    out: dict[str, Any] = {}
    alone = runs.get("alone", {}).get("llm")
    for name in ("time_sliced", "mps_uncapped", "mps_capped"):
        llm = runs.get(name, {}).get("llm")
        if alone and llm:
            out[f"{name}_p50_over_alone"] = round(llm["p50_ms"] / alone["p50_ms"], 2)
    base = runs.get("batch_alone", {}).get("batch")
    uncapped = runs.get("mps_uncapped", {}).get("batch")
    capped = runs.get("mps_capped", {}).get("batch")
    if capped and uncapped and uncapped["matmuls_per_s"]:
        out["capped_batch_over_uncapped"] = round(capped["matmuls_per_s"] / uncapped["matmuls_per_s"], 3)
    if capped and base and base["matmuls_per_s"]:
        out["capped_batch_over_batch_alone"] = round(capped["matmuls_per_s"] / base["matmuls_per_s"], 3)
    return out


def markdown(r: Mapping[str, Any]) -> str:
    m, st = r["machine"], r["settings"]
    lines = [
        "# Compute contention on one GPU (bench/contention.py)",
        "",
        *([f"**DRY RUN** ({r['dry_run']}).", ""] if r.get("dry_run") else []),
        f"GPU: {m['gpu']} ({m['memory_total_mib']} MiB, compute mode {m['compute_mode']}), driver {m['driver']}, "
        f"CUDA {m['cuda']}, PyTorch {m['torch']}; host {m['cpu']}, Python {m['python']}.",
        "",
        f"LLM step: {st['layers']} MLP blocks of {st['tokens']} tokens × {st['hidden']}→{st['ffn']}→{st['hidden']} "
        f"(fp16), synchronized each step; batch worker: {st['matrix']}² fp16 matmuls. "
        f"{st['seconds']} s per run{' (short mode)' if st['short'] else ''}. Leases through gpuarb: "
        f"llm {r['leases']['llm']['vram_mib']} MiB, batch {', '.join(str(b['vram_mib']) for b in r['leases']['batch'])}"
        f" MiB; the batch grants carry CUDA_MPS_ACTIVE_THREAD_PERCENTAGE="
        f"{r['leases']['batch'][0]['exports'].get('CUDA_MPS_ACTIVE_THREAD_PERCENTAGE', '(none)')}.",
        "",
        "| run | LLM p50 ms | LLM p99 ms | LLM steps | batch matmuls/s | batch TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in RUNS:
        run = r["runs"].get(name)
        if run is None:
            continue
        if "skipped" in run:
            lines.append(f"| {RUN_TITLES[name]} | skipped: {run['skipped']} | | | | |")
            continue
        llm, batch = run.get("llm"), run.get("batch")
        lines.append(f"| {RUN_TITLES[name]} | {llm['p50_ms'] if llm else ''} | {llm['p99_ms'] if llm else ''} | "
                     f"{llm['steps'] if llm else ''} | {batch['matmuls_per_s'] if batch else ''} | "
                     f"{batch['tflops'] if batch else ''} |")
    s = r["summary"]
    lines += ["", "Summary: " + (", ".join(f"{k} = {v}" for k, v in s.items()) or "n/a") + ".", "",
              f"DESIGN.md's reference (one user, {DESIGN['gpu']}): {DESIGN['alone_ms']} ms alone, "
              f"{DESIGN['time_sliced_ms']} ms time-sliced, {DESIGN['mps_uncapped_ms']} ms under uncapped MPS, "
              f"{DESIGN['mps_capped_ms']} ms with the batch clients at 30 %; batch kept ~{DESIGN['batch_kept']:.0%} "
              "of its throughput.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- workers (each its own process)


def _wait_file(path: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.001)


def _torch() -> Any:
    import importlib

    return importlib.import_module("torch")  # optional: only this benchmark needs it


def worker(args: argparse.Namespace) -> int:
    torch = _torch()
    run = Path(args.run_dir)
    fraction = os.environ.get("GPUARB_TORCH_MEMORY_FRACTION")
    if fraction:
        torch.cuda.set_per_process_memory_fraction(float(fraction))  # stay inside the lease
    dev = torch.device("cuda:0")  # the lease's GPU: CUDA_VISIBLE_DEVICES names only it
    if args.worker == "batch":
        a = torch.randn(args.matrix, args.matrix, device=dev, dtype=torch.float16)
        b = torch.randn(args.matrix, args.matrix, device=dev, dtype=torch.float16)
        c = torch.empty_like(a)
        for _ in range(3):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        (run / f"ready-{args.name}").touch()
        _wait_file(run / "go", WAIT_S)
        iters, t0 = 0, time.perf_counter()
        while not (run / "stop").exists():
            for _ in range(4):
                torch.matmul(a, b, out=c)
            torch.cuda.synchronize()
            iters += 4
        seconds = time.perf_counter() - t0
        (run / f"result-{args.name}.json").write_text(json.dumps({"iters": iters, "seconds": seconds,
                                                                  "env": _seen_env()}))
        return 0
    ws = [(torch.randn(args.hidden, args.ffn, device=dev, dtype=torch.float16) * 0.01,
           torch.randn(args.ffn, args.hidden, device=dev, dtype=torch.float16) * 0.01) for _ in range(args.layers)]
    x = torch.randn(args.tokens, args.hidden, device=dev, dtype=torch.float16)

    def step() -> None:
        h = x
        for w1, w2 in ws:
            h = torch.relu(h @ w1) @ w2
        torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    samples: list[float] = []
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end and len(samples) < args.max_steps:
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1000)
    (run / f"result-{args.name}.json").write_text(json.dumps({"samples_ms": samples, "env": _seen_env()}))
    return 0


def _seen_env() -> dict[str, str]:
    """The knobs this worker ran with (recorded: the grant's knobs must reach the clients)."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("CUDA_MPS_") or k in ("CUDA_VISIBLE_DEVICES", "GPUARB_TORCH_MEMORY_FRACTION")}


# --------------------------------------------------------------------------- the orchestrator


def _machine(gpu: int) -> dict[str, Any]:
    from slurm_gpuarb import subproc

    info: dict[str, Any] = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = subproc.run(["nvidia-smi", f"--id={gpu}", "--query-gpu=name,driver_version,memory.total,compute_mode",
                       "--format=csv,noheader,nounits"], timeout=30).stdout
    name, driver, total, mode = (p.strip() for p in out.strip().splitlines()[0].split(","))
    info.update(gpu=name, driver=driver, memory_total_mib=int(float(total)), compute_mode=mode)
    return info


class Bench:
    """One temp dir: config, ledger, MPS state, and a directory per run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="gpuarb-contention-"))
        self.no_mps = self.root / "no-mps"  # an empty pipe dir: CUDA finds no daemon and runs without MPS
        self.no_mps.mkdir()

    def config(self) -> Any:
        from slurm_gpuarb.config import load

        path = self.root / "gpuarb.toml"
        path.write_text(
            "version = 1\n[host]\nnode = \"bench\"\n"
            f"[ledger]\nurl = \"sqlite:///{self.root}/ledger.db\"\n[telemetry]\nbackend = \"{self.args.telemetry}\"\n"
            f"[daemon]\nstate_dir = \"{self.root}/state\"\n[policy]\nmargin = \"1GiB\"\n"
            "[classes.llm]\npriority = 1000\npreemptible = false\nmay_degrade = false\n"
            f"[classes.batch]\npriority = 10\npreemptible = true\nmay_degrade = false\n"
            f"mps_thread_percent = {self.args.thread_percent}\n")
        path.chmod(0o644)
        return load(str(path), env={})

    def spawn(self, run: Path, role: str, name: str, env: Mapping[str, str]) -> subprocess.Popen[str]:
        a = self.args
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--name", name, "--run-dir", str(run),
               "--seconds", str(a.seconds), "--layers", str(a.layers), "--hidden", str(a.hidden), "--ffn", str(a.ffn),
               "--tokens", str(a.tokens), "--matrix", str(a.matrix), "--warmup", str(a.warmup),
               "--max-steps", str(a.max_steps)]
        full = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_MPS_", "GPUARB_"))}
        full.update(env)
        return subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, name: str, llm_env: Mapping[str, str] | None,
            batch_envs: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        run = self.root / name
        run.mkdir()
        procs = {f"batch{i}": self.spawn(run, "batch", f"batch{i}", e) for i, e in enumerate(batch_envs)}
        try:
            end = time.monotonic() + WAIT_S
            while not all((run / f"ready-{n}").exists() for n in procs):
                dead = [n for n, p in procs.items() if p.poll() is not None]
                if dead or time.monotonic() > end:
                    raise RuntimeError(f"{name}: batch worker {dead or 'start'} failed: "
                                       f"{self._output(procs[dead[0]]) if dead else 'not ready in time'}")
                time.sleep(0.01)
            (run / "go").touch()
            if llm_env is not None:
                llm = self.spawn(run, "llm", "llm", llm_env)
                if llm.wait(timeout=self.args.seconds + WAIT_S) != 0:
                    raise RuntimeError(f"{name}: the LLM worker failed: {self._output(llm)}")
            else:
                time.sleep(self.args.seconds)
            (run / "stop").touch()
            for n, p in procs.items():
                if p.wait(timeout=WAIT_S) != 0:
                    raise RuntimeError(f"{name}: batch worker {n} failed: {self._output(p)}")
        finally:
            (run / "stop").touch()
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        out: dict[str, Any] = {}
        if llm_env is not None:
            llm_result = json.loads((run / "result-llm.json").read_text())
            out["llm"] = latency_summary(llm_result["samples_ms"])
            out["llm_env"] = llm_result["env"]
        if batch_envs:
            batch_results = [json.loads((run / f"result-{n}.json").read_text()) for n in procs]
            out["batch"] = batch_summary(batch_results, self.args.matrix)
            out["batch_env"] = batch_results[0]["env"]
        print(f"{name}: {out}", flush=True)
        return out

    @staticmethod
    def _output(p: subprocess.Popen[str]) -> str:
        text = p.stdout.read() if p.stdout is not None and p.poll() is not None else ""
        return " ".join(text.split())[-800:] or f"exit status {p.returncode}"

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _check_torch() -> str | None:
    """Why this machine cannot run the benchmark, or ``None``."""
    try:
        torch = _torch()
    except ImportError as e:
        return f"PyTorch is not installed ({e}); install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)"
    return None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch()
    from slurm_gpuarb import engines, mps
    from slurm_gpuarb.service import Arbitration

    b = Bench(args)
    try:
        cfg = b.config()
        results: dict[str, Any] = {"machine": _machine(args.gpu), "runs": {}}
        results["machine"].update(torch=torch.__version__, cuda=torch.version.cuda)
        results["settings"] = {k: getattr(args, k) for k in ("seconds", "layers", "hidden", "ffn", "tokens", "matrix",
                                                             "thread_percent", "gpu", "short")}
        with Arbitration(cfg) as svc:
            specs = {"llm": f"gpuarb: vram={args.llm_vram} prio=llm share=mps engine=torch",
                     "batch": f"gpuarb: vram={args.batch_vram} prio=batch share=mps engine=torch"}
            leases = {}
            for role, spec in (("llm", specs["llm"]), ("batch0", specs["batch"]), ("batch1", specs["batch"])):
                decision, lease = svc.request(spec, gpu=args.gpu, owner_uid=os.getuid(), plane="host")
                if lease is None:
                    raise SystemExit(f"gpuarb refused the {role} lease on GPU {args.gpu}: {decision.reason}")
                leases[role] = lease
            try:
                gpus = svc.telemetry.gpus()
                uuid = next(g.uuid for g in gpus if g.index == args.gpu)
                knobs = {r: engines.knobs_for_lease(le, gpus, cfg.policy.classes, engine="torch", share_mps=True)
                         for r, le in leases.items()}
                results["leases"] = {"llm": _lease_json(leases["llm"], knobs["llm"]),
                                     "batch": [_lease_json(leases[r], knobs[r]) for r in ("batch0", "batch1")]}
                results["runs"] = _runs(b, args, knobs, uuid, mps)
            finally:
                for le in leases.values():
                    svc.release(le.id, reason="bench/contention.py done", plane="host")
        results["summary"] = summarize(results["runs"])
        if not args.telemetry.startswith(("nvml", "auto", "smi")):
            results["dry_run"] = f"telemetry {args.telemetry}: not a measurement"
        results["design_reference"] = DESIGN
        return results
    finally:
        b.close()


def _lease_json(lease: Any, knobs: Any) -> dict[str, Any]:
    return {"id": lease.id, "vram_mib": lease.vram_mib, "prio": lease.prio, "gpus": list(lease.gpus),
            "exports": dict(knobs.exports)}


def _runs(b: Bench, args: argparse.Namespace, knobs: Mapping[str, Any], uuid: str, mps: Any) -> dict[str, Any]:
    def env(role: str, *, pipe: str | None, cap: bool) -> dict[str, str]:
        e = {"CUDA_VISIBLE_DEVICES": uuid, "GPUARB_TORCH_MEMORY_FRACTION":
             knobs[role].exports["GPUARB_TORCH_MEMORY_FRACTION"], "CUDA_MPS_PIPE_DIRECTORY": pipe or str(b.no_mps)}
        if pipe is not None:
            e["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = knobs[role].exports["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
        if cap and "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" in knobs[role].exports:
            e["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = knobs[role].exports["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]
        return e

    plain = [env(r, pipe=None, cap=False) for r in ("batch0", "batch1")]
    runs: dict[str, Any] = {
        "alone": b.run("alone", env("llm", pipe=None, cap=False), []),
        "batch_alone": b.run("batch_alone", None, plain),
        "time_sliced": b.run("time_sliced", env("llm", pipe=None, cap=False), plain),
    }
    binary = mps.find_control()
    if binary is None:
        why = f"no {mps.CONTROL} in {', '.join(mps.SEARCH_DIRS)}"
        return {**runs, "mps_uncapped": {"skipped": why}, "mps_capped": {"skipped": why}}
    state = str(b.root / "state")
    outcome = mps.ensure(state, args.gpu, uuid, uid=os.getuid(), gid=os.getgid(), job_id="1", node="bench",
                         binary=binary, is_live=lambda j: True, timeout=10.0)
    if not outcome.serving:
        why = f"the MPS control daemon did not start: {outcome.reason}"
        return {**runs, "mps_uncapped": {"skipped": why}, "mps_capped": {"skipped": why}}
    try:
        pipe = outcome.pipe_dir
        runs["mps_uncapped"] = b.run("mps_uncapped", env("llm", pipe=pipe, cap=False),
                                     [env(r, pipe=pipe, cap=False) for r in ("batch0", "batch1")])
        runs["mps_capped"] = b.run("mps_capped", env("llm", pipe=pipe, cap=True),
                                   [env(r, pipe=pipe, cap=True) for r in ("batch0", "batch1")])
    finally:
        mps.stop(state, args.gpu, binary=binary, timeout=10.0)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run (default 10)")
    ap.add_argument("--short", action="store_true", help="a quick run (2 s each, fewer warm-up steps)")
    ap.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU (default 0)")
    ap.add_argument("--thread-percent", type=int, default=30, help="classes.batch.mps_thread_percent (default 30)")
    ap.add_argument("--llm-vram", default="4GiB")
    ap.add_argument("--batch-vram", default="2GiB")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--tokens", type=int, default=8, help="sequences decoded per step (default 8)")
    ap.add_argument("--matrix", type=int, default=8192, help="batch matmul size (default 8192)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--max-steps", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--telemetry", default="nvml",
                    help="gpuarb's telemetry backend (default nvml); fake:PRESET only checks the orchestration in "
                         "tests, and its output says DRY RUN")
    ap.add_argument("--worker", choices=("llm", "batch"), help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    why = _check_torch()
    if why is not None:
        print(f"bench/contention.py needs PyTorch and an NVIDIA GPU: {why}. Nothing was measured or written.",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.short:
        args.seconds, args.warmup = min(args.seconds, 2.0), min(args.warmup, 10)
    results = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "contention.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "contention.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
