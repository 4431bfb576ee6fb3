"""``gpuarb demo``: the RTX 3090 Ti story, replayed on the fake telemetry backend.

A test framework started 3 workers × 8 GiB on a 24 GiB RTX 3090 Ti and pushed a resident Ollama
(10.8 GiB of model) onto the CPU; replies went from 3–10 s to 30–60 s. The fix was a fixed 12 GiB
reservation for Ollama, a 1 GiB safety margin and a floor per worker. This module replays both
halves with the real library: the same capacity model, arbiter, ledger and explanations that
serve real GPUs, on ``fake:rtx3090ti-24g`` and a fresh SQLite ledger.

The configuration is the one in ``templates/examples/workstation-3090ti.toml``; it is embedded
here so the demo also runs from an installed wheel (a test keeps the two equal).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .config import load
from .model import GpuProcess, Outcome
from .service import Arbitration
from .telemetry.fake import FakeTelemetry, add_process, remove_process
from .units import human_size, parse_size_mib

PRESET = "rtx3090ti-24g"
NODE = "ws1"
OLLAMA_PID = 4242

WORKSTATION_TOML = """\
version = 1

[host]
node = "ws1"

[telemetry]
backend = "auto"

[policy]
margin = "1GiB"
quantum = "512MiB"
default_class = "batch"
max_ttl = "1d"

[classes.llm]
priority = 1000
preemptible = false
may_degrade = false

[classes.batch]
priority = 10
preemptible = true
may_degrade = true
mps_thread_percent = 30

[[reservations]]
name = "ollama"
size = "12GiB"
gpu = 0
mode = "static"
match = { process = "ollama" }
probe = { kind = "ollama", url = "http://127.0.0.1:11434", model = "llama3:8b", timeout = "2s" }

[[nodes]]
name = "ws1"
gpus = [ { index = 0, sku = "rtx3090ti-24g", mode = "shard" } ]
"""

WORKER_SPEC = "gpuarb: vram=4.5GiB min=3GiB prio=batch"
NAIVE_WORKER_MIB = parse_size_mib("8GB")  # the story's "3 × 8 GB": decimal gigabytes, 7630MiB


def run_workstation_demo(echo: Callable[[str], None], *, ledger_dir: str | None = None) -> None:
    """Print the story. Uses a fresh temporary directory unless ``ledger_dir`` is given."""
    with tempfile.TemporaryDirectory(prefix="gpuarb-demo-") as tmp:
        base = Path(ledger_dir) if ledger_dir else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        state = base / "fake-state"
        state.mkdir(exist_ok=True)
        cfg_path = base / "workstation-3090ti.toml"
        cfg_path.write_text(WORKSTATION_TOML)
        os.chmod(cfg_path, 0o600)
        ledger_path = base / "ledger.db"
        cfg = load(cfg_path, env={}, overrides={"ledger_url": f"sqlite:///{ledger_path}", "node": NODE,
                                               "telemetry": f"fake:{PRESET}"})
        telemetry = FakeTelemetry(PRESET, node=NODE, state_dir=state)
        gpu = telemetry.gpus()[0]
        ollama = next(p for p in telemetry.processes() if p.pid == OLLAMA_PID)

        echo(f"== The RTX 3090 Ti story (telemetry fake:{PRESET}, ledger {ledger_path})")
        echo(f"GPU 0: {gpu.name}, {gpu.total_mib}MiB total, {gpu.reserved_mib}MiB kept by the driver. "
             f"Ollama (pid {ollama.pid}) holds {human_size(ollama.used_mib)} of model.")

        # -- without arbitration ------------------------------------------------------------
        echo("\n-- Without arbitration")
        remove_process(state, NODE, OLLAMA_PID)  # Ollama unloads an idle model
        for i in range(3):
            add_process(state, NODE, GpuProcess(pid=5001 + i, gpu_index=0, used_mib=NAIVE_WORKER_MIB,
                                                name="pytest-worker", uid=1000, user="alice"))
        used = telemetry.gpus()[0].used_mib
        free = max(0, gpu.total_mib - gpu.reserved_mib - used)
        echo(f"Ollama unloads its idle model; the test framework starts 3 workers of 8GB "
             f"({NAIVE_WORKER_MIB}MiB): {used}MiB in use, {free}MiB free.")
        echo(f"The next chat needs {ollama.used_mib}MiB for Ollama's model but {free}MiB is free: Ollama "
             "loads it on the CPU and replies go from 3-10 s to 30-60 s. Nobody was told.")
        for i in range(3):
            remove_process(state, NODE, 5001 + i)
        add_process(state, NODE, ollama)

        # -- with arbitration ---------------------------------------------------------------
        echo("\n-- With gpuarb (workstation-3090ti.toml: Ollama reserves 12GiB, matched by process name; "
             "1GiB safety margin)")
        with Arbitration(cfg, telemetry=telemetry) as svc:
            waiting: list[str] = []
            for i in range(3):
                echo(f"$ gpuarb lease request '{WORKER_SPEC}'   # worker {i + 1}")
                decision, lease = svc.request(WORKER_SPEC, pid=6001 + i, plane="demo")
                echo(f"  {decision.outcome.value}: {decision.reason}")
                if lease is not None:
                    add_process(state, NODE, GpuProcess(pid=6001 + i, gpu_index=0, used_mib=lease.vram_mib,
                                                        name="pytest-worker", uid=1000, user="alice"))
                elif decision.outcome is Outcome.WAIT:
                    waiting.append(f"D{decision.decision_id}")
            echo("\n$ gpuarb status")
            for st in svc.snapshot().states:
                echo(f"  gpu{st.gpu.index} {st.gpu.name}: usable {human_size(st.usable_mib)}, "
                     f"free {human_size(st.free_mib)}")
                for t in sorted(st.tenants, key=lambda t: -t.held_mib):
                    echo(f"    {t.kind.value:<11} {t.id:<14} holds {human_size(t.held_mib):>7} "
                         f"(declared {human_size(t.size_mib)}, observed {human_size(t.observed_mib)})")
            for target in waiting:
                echo(f"\n$ gpuarb explain {target}")
                echo("  " + svc.explain(target).replace("\n", "\n  "))
        echo("\nOllama keeps its 12GiB: its model stays on the GPU. Two workers of 4.5GiB run; the third waits "
             "(or asks with a lower min=) instead of pushing Ollama onto the CPU.")
