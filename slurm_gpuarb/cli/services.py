"""``gpuarb services`` and ``gpuarb route``: probe the inference services, say where a request goes.

Registered on the ``gpuarb`` group of :mod:`.commands` (``cli/__init__.py`` imports this module).
Each callback probes through :mod:`slurm_gpuarb.services`, prints, and exits with the house codes:
0 fine, 1 an error (a bad config: ``Error: …``), 2 bad usage, 3 *not now* (a service is not up;
no backend can take the request: 503), 4 *never* (no service serves that model: 404).
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from ..model import Reservation
from ..services import (
    RouteAdvice,
    ServiceStatus,
    advice_to_json,
    probe_all,
    reservation_size_mib,
    route,
    status_to_json,
)
from ..units import human_size
from . import EXIT_DENIED, EXIT_WAIT
from .commands import Ctx, _emit_json, cli, json_option, pass_ctx

EXIT_NOT_UP = EXIT_WAIT  # gpuarb services: some service is degraded, busy or down

timeout_option = click.option("--timeout", type=click.FloatRange(0.05, 60), default=None, metavar="SECONDS",
                              help="Each probe's deadline in seconds (default: the probe's timeout, 2s).")


def status_line(s: ServiceStatus, res: Reservation | None, width: int = 0) -> str:
    """``ollama  up        10.8GiB of 12GiB reserved on gpu0 (2 models) http://127.0.0.1:11434  — 2 models …``"""
    parts = []
    if res is not None:
        where = f"gpu{res.gpu}" + (f" of {res.node}" if res.node else "")
        observed, declared = s.observed_vram_mib, human_size(res.size_mib)
        if observed and reservation_size_mib(res, s) > res.size_mib:
            parts.append(f"{human_size(observed)} on {where}, over its {declared} reservation")
        elif observed:
            parts.append(f"{human_size(observed)} of {declared} reserved on {where}")
        else:
            parts.append(f"{declared} reserved on {where}")
    elif s.observed_vram_mib:
        parts.append(f"{human_size(s.observed_vram_mib)} in VRAM")
    if s.models:
        parts.append(f"({len(s.models)} model{'s' if len(s.models) != 1 else ''})")
    parts.append(s.url)
    return f"{s.name:<{width}}  {s.state:<8}  {' '.join(parts)}  — {s.reason}"


def advice_line(a: RouteAdvice) -> str:
    """``vllm-a http://…  — why``, ``503 Retry-After: 5 — why`` or ``404 — why``."""
    if a.ok:
        return f"{a.backend} {a.url}  — {a.reason}"
    if a.retry_after_s is not None:
        return f"{a.http_status} Retry-After: {a.retry_after_s} — {a.reason}"
    return f"{a.http_status} — {a.reason}"


def _lines(statuses: Sequence[ServiceStatus], reservations: Sequence[Reservation]) -> list[str]:
    by_name = {r.name: r for r in reservations}
    width = max(len(s.name) for s in statuses)
    return [status_line(s, by_name.get(s.reservation or ""), width) for s in statuses]


@cli.command("services")
@json_option
@timeout_option
@pass_ctx
def services_cmd(obj: Ctx, as_json: bool, timeout: float | None) -> None:
    """Probe the inference services over their own APIs: reservations with a probe, and [[services]].

    One line per service: its name, state (up; degraded: serves, but worse, e.g. a model partly on
    the CPU; busy: overloaded; down), the VRAM it holds or reserves, its URL and why. --json prints
    a list with the same keys for every service (null where unknown). Exit 0 when every service is
    up, 3 when one is not.

    \b
    Example:
      gpuarb services
      gpuarb services --json --timeout 0.5
    """
    cfg = obj.cfg
    statuses = probe_all(cfg, timeout=timeout)
    by_name = {r.name: r for r in cfg.reservations}
    if as_json:
        _emit_json([status_to_json(s, by_name.get(s.reservation or "")) for s in statuses])
    elif not statuses:
        click.echo("no services declared: give a [[reservations]] entry a probe, or add [[services]] "
                   "(templates/examples/README.md)")
    else:
        for line in _lines(statuses, cfg.reservations):
            click.echo(line)
    if any(s.state != "up" for s in statuses):
        raise click.exceptions.Exit(EXIT_NOT_UP)


@cli.command("route")
@click.argument("model")
@json_option
@timeout_option
@pass_ctx
def route_cmd(obj: Ctx, model: str, as_json: bool, timeout: float | None) -> None:
    """Name the backend that should take a request for MODEL, or answer 503 with Retry-After.

    Probes every service, then prefers a healthy backend (up before degraded; vLLM before Ollama
    before TF Serving) that serves MODEL; a busy or down one is skipped. Exit 0 with a backend,
    3 when none can take the request now (503), 4 when no service serves MODEL (404).

    \b
    Example:
      gpuarb route llama3:8b
      gpuarb route meta-llama/Llama-3.1-8B-Instruct --json
    """
    advice = route(model, probe_all(obj.cfg, timeout=timeout))
    if as_json:
        _emit_json(advice_to_json(advice))
    else:
        click.echo(advice_line(advice))
    if advice.http_status == 503:
        raise click.exceptions.Exit(EXIT_WAIT)
    if not advice.ok:
        raise click.exceptions.Exit(EXIT_DENIED)
