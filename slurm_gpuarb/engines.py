"""Engine knobs: what a serving engine, or an MPS client, is told so that it stays inside its lease.

Pure functions over sizes in MiB, stdlib only and cheap to import: the daemon puts them in a
job's grant (:func:`slurm_gpuarb.daemon.jobs.make_grant`), ``gpuarb lease request --engine``
prints them for the host plane. Every value is *rounded down*: a knob never lets an engine take
more than was granted.

**vLLM.** ``--gpu-memory-utilization`` is a share of the GPU's *total* memory, the whole budget of
the instance (weights, activations, CUDA graphs and the KV cache; vllm/config/cache.py,
``CacheConfig.gpu_memory_utilization``), so it is grant ÷ total. vLLM refuses to start when
less than that share of the GPU is free ("Free memory on device … on startup is less than
desired GPU memory utilization", vllm/v1/worker/gpu_worker.py ``init_device``; vllm-project/vllm
issues #20305 and #23192): the Prolog's live-telemetry check (the arbiter grants only memory
telemetry shows free) is what makes the number safe to start with. ``--kv-cache-memory-bytes``
sizes the KV cache alone ("when not-None ignores gpu_memory_utilization", same file); the
weights and activations come on top, so it is an *option* a user chooses (``gpuarb lease
request --kv-cache``) and must fit inside the grant. Exported as
``GPUARB_VLLM_GPU_MEMORY_UTILIZATION`` and, ready to append to ``vllm serve``,
``GPUARB_VLLM_ARGS``.

**Ollama** plans each model load against ``free − OLLAMA_GPU_OVERHEAD − a minimum`` of every GPU
(server/sched.go; ``OLLAMA_GPU_OVERHEAD``: "Reserve a portion of VRAM per GPU (bytes)",
envconfig/config.go), and offloads the layers that do not fit to the CPU. The overhead is
therefore the memory Ollama could see free that is not its own: (total − driver reserve) −
grant. On a GPU the job has alone Ollama then plans exactly within its grant; beside neighbours,
their usage is subtracted too, so it plans *below* the grant, never above it.
``OLLAMA_MAX_LOADED_MODELS`` defaults to 1 here (Ollama's own default is 3 per GPU): a lease is
sized for one model, and a second one loaded beside it would either evict the first or, worse,
run partly on the CPU (the silent slowdown this project exists to prevent).

**TensorFlow** has no environment variable for its memory fraction: TF Serving takes
``--per_process_gpu_memory_fraction`` (tensorflow_serving/model_servers/main.cc; 0 means "TF
picks", i.e. all of it, so a fraction that rounds to zero is never printed), a Python program
``tf.config.experimental.set_virtual_device_configuration`` or ``per_process_gpu_memory_fraction``
in its session config. ``GPUARB_TF_MEMORY_FRACTION`` is for a wrapper; ``GPUARB_TF_SERVING_ARGS``
is the flag. PyTorch's ``torch.cuda.set_per_process_memory_fraction`` reads
``GPUARB_TORCH_MEMORY_FRACTION`` the same way.

**MPS.** With ``share=mps`` a batch-class lease carries ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``
from its class policy (compute priority for the LLM beside it); a class without
``mps_thread_percent`` (llm) gets none. When an MPS server runs for the lease,
``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` caps the client's device memory in the form
``<device ordinal>=<limit>`` (NVIDIA MPS docs, "Appendix: Environment Variables"); the client's
own CUDA context counts against it, so the limit is grant + :data:`CUDA_CONTEXT_MIB`.

Fractions have four decimals: two would lose up to 1 % of the GPU (0.8 GiB of an H100) and turn
a lease under 1 % into 0, which vLLM rejects and TF Serving reads as "take everything".
"""

from __future__ import annotations

TYPE_CHECKING = False  # only for the type checker: typing costs an import this module does not need
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Final

    from .model import ClassPolicy, GpuInfo, Lease

__all__ = [
    "CUDA_CONTEXT_MIB",
    "ENGINES",
    "OLLAMA_MAX_LOADED_MODELS",
    "Knobs",
    "engine_knobs",
    "fraction",
    "knobs_for_lease",
    "mps_exports",
    "ollama_overhead_bytes",
    "pinned_mem_limit",
]

MIB: Final = 1024 * 1024
ENGINES: Final = ("vllm", "ollama", "tf", "torch")  # == model.Engine's values (a test keeps them equal)
FRACTION_PLACES: Final = 4
# The device memory one CUDA context takes besides what the program allocates: about 0.5 GiB on an
# H100 with CUDA 12 (DESIGN.md, "Run plane and hooks"; it grows with the SM count and the driver's
# lazy-loading settings). Under MPS it counts against CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, so the
# limit is the grant plus this; the lease itself is what Slurm gave, the context included.
CUDA_CONTEXT_MIB: Final = 512
OLLAMA_MAX_LOADED_MODELS: Final = 1


def fraction(part_mib: int, total_mib: int, places: int = FRACTION_PLACES) -> str:
    """``part ÷ total`` rounded *down* to ``places`` decimals, as text (``"0.0753"``): never more than granted."""
    scale = 10**places
    units = 0 if total_mib <= 0 or part_mib <= 0 else min(part_mib, total_mib) * scale // total_mib
    whole, rest = divmod(units, scale)
    return f"{whole}.{rest:0{places}d}" if places else str(whole)


def _is_zero(text: str) -> bool:
    return float(text) == 0.0


def ollama_overhead_bytes(granted_mib: int, total_mib: int, reserved_mib: int = 0) -> int:
    """``OLLAMA_GPU_OVERHEAD`` for a grant: the memory Ollama could see free that is not the lease's."""
    return max(0, total_mib - reserved_mib - granted_mib) * MIB


def pinned_mem_limit(granted_mib: int, *, devices: int = 1, total_mib: int | None = None,
                     context_mib: int = CUDA_CONTEXT_MIB) -> str:
    """``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` for a grant per GPU: ``"0=6656M"`` (``"0=…,1=…"`` for more GPUs).

    The ordinals are the client's (after ``CUDA_VISIBLE_DEVICES``); the limit is the grant plus the
    client's CUDA context, at most the GPU's total."""
    limit = granted_mib + context_mib
    if total_mib is not None:
        limit = min(limit, total_mib)
    return ",".join(f"{i}={limit}M" for i in range(max(1, devices)))


def mps_exports(granted_mib: int, *, thread_percent: int | None, devices: int = 1, total_mib: int | None = None,
                server: bool = True) -> dict[str, str]:
    """The MPS client knobs of a ``share=mps`` lease: the class's thread cap (when it has one) and, when an
    MPS server runs for the lease (``server``), the pinned device memory limit."""
    out: dict[str, str] = {}
    if thread_percent is not None:
        out["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(thread_percent)
    if server:
        out["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = pinned_mem_limit(granted_mib, devices=devices, total_mib=total_mib)
    return out


class Knobs:
    """An engine's knobs for one grant: ``exports`` (environment), ``flags`` (its command line, ready to
    append) and ``notes`` (what was left out, and why)."""

    __slots__ = ("engine", "exports", "flags", "notes")

    def __init__(self, engine: str | None, exports: Mapping[str, str] | None = None, flags: str = "",
                 notes: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self.exports: dict[str, str] = dict(exports or {})
        self.flags = flags
        self.notes = notes

    def __repr__(self) -> str:
        return f"Knobs({self.engine!r}, {self.exports!r}, flags={self.flags!r}, notes={self.notes!r})"

    def to_json(self) -> dict[str, object]:
        return {"engine": self.engine, "exports": dict(self.exports), "flags": self.flags, "notes": list(self.notes)}


def engine_knobs(engine: str | None, granted_mib: int, total_mib: int, *, reserved_mib: int = 0,
                 kv_cache_mib: int | None = None, max_loaded_models: int = OLLAMA_MAX_LOADED_MODELS) -> Knobs:
    """The knobs for ``engine`` (``vllm`` | ``ollama`` | ``tf`` | ``torch``; ``None``: none) on a grant of
    ``granted_mib`` per GPU of ``total_mib`` (see the module docstring for each).

    ``kv_cache_mib`` (vLLM only) adds ``--kv-cache-memory-bytes``; one larger than the grant is left
    out with a note, as is every fraction that would round down to zero."""
    if engine is None:
        return Knobs(None)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    notes: list[str] = []
    share = fraction(granted_mib, total_mib)
    if _is_zero(share):
        notes.append(f"{granted_mib}MiB is under 1/{10**FRACTION_PLACES} of the GPU's {total_mib}MiB: no memory "
                     "fraction can express it")
    exports: dict[str, str] = {}
    flags: list[str] = []
    if engine == "vllm":
        if not _is_zero(share):
            exports["GPUARB_VLLM_GPU_MEMORY_UTILIZATION"] = share
            flags.append(f"--gpu-memory-utilization {share}")
        if kv_cache_mib is not None:
            if 0 < kv_cache_mib <= granted_mib:
                exports["GPUARB_VLLM_KV_CACHE_MEMORY_BYTES"] = str(kv_cache_mib * MIB)
                flags.append(f"--kv-cache-memory-bytes {kv_cache_mib * MIB}")
            else:
                notes.append(f"a {kv_cache_mib}MiB KV cache does not fit the {granted_mib}MiB grant (the weights "
                             "come on top of it): --kv-cache-memory-bytes left out")
        if flags:
            exports["GPUARB_VLLM_ARGS"] = " ".join(flags)
    elif engine == "ollama":
        exports["OLLAMA_GPU_OVERHEAD"] = str(ollama_overhead_bytes(granted_mib, total_mib, reserved_mib))
        exports["OLLAMA_MAX_LOADED_MODELS"] = str(max_loaded_models)
        exports["GPUARB_OLLAMA_MAX_VRAM_BYTES"] = str(granted_mib * MIB)
    elif engine == "tf":
        if not _is_zero(share):
            exports["GPUARB_TF_MEMORY_FRACTION"] = share
            flags.append(f"--per_process_gpu_memory_fraction={share}")
            exports["GPUARB_TF_SERVING_ARGS"] = flags[0]
    elif not _is_zero(share):  # torch
        exports["GPUARB_TORCH_MEMORY_FRACTION"] = share
    return Knobs(engine, exports, " ".join(flags), tuple(notes))


def knobs_for_lease(lease: Lease, gpus: Sequence[GpuInfo], classes: Mapping[str, ClassPolicy], *,
                    engine: str | None, share_mps: bool = False, kv_cache_mib: int | None = None) -> Knobs:
    """The knobs of a host-plane lease (``gpuarb lease request``, ``bench/contention.py``), against the GPUs
    telemetry reads (a MIG instance's own memory). ``share_mps`` adds the lease class's MPS knobs; the
    pinned limit counts only under an MPS server, which on the host plane the user runs."""
    on = [g for g in gpus if g.index in lease.gpus]
    instance = next((m for g in on for m in g.mig_instances if m.uuid == lease.mig_uuid), None)
    if instance is not None:
        total, reserved = instance.memory_mib, 0
    elif on:
        total, reserved = min(g.total_mib for g in on), max(g.reserved_mib for g in on)
    else:
        total, reserved = lease.vram_mib, 0
    knobs = engine_knobs(engine, lease.vram_mib, total, reserved_mib=reserved, kv_cache_mib=kv_cache_mib)
    if share_mps and lease.mig_uuid is None:
        cls = classes.get(lease.prio)
        knobs.exports.update(mps_exports(lease.vram_mib, thread_percent=None if cls is None else cls.mps_thread_percent,
                                         devices=len(lease.gpus), total_mib=total))
        knobs.notes += ("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT counts only under an MPS server (its ordinals are the "
                        "client's CUDA devices)",)
    return knobs
