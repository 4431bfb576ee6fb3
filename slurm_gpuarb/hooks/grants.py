"""The grant file (contract 6): how the Prolog hands a job's grant or refusal to its TaskProlog.

``<state_dir>/jobs/<node>/<job_id>.grant``, written by the Prolog and read by the TaskProlog only,
one ``key=value`` line each (a JSON reader would cost the TaskProlog, which runs for every task of
every step, an import for nothing)::

    # gpuarb grant: written by the Prolog, read by the TaskProlog
    version=1
    status=granted                  granted | refused | unleased
    job_id=12
    node=n1
    restart_count=0                 the run it belongs to: a requeue's Epilog leaves the next run's alone
    lease_id=L7f3…
    vram_mib=6144
    quantum_mib=512                 for the TaskProlog's SLURM_SHARDS_ON_NODE cross-check
    reason=…                        why, for a refusal or an unleased run
    export.CUDA_VISIBLE_DEVICES=0
    export.GPUARB_VRAM_MB=6144

Export names are ``[A-Za-z_][A-Za-z0-9_]*``; no value may hold a newline, carriage return or NUL
(each becomes one ``export K=V`` line, and the value runs to the end of it). Unknown keys are
ignored, so a newer Prolog can add some.

Written atomically (a temp file in the same directory, then ``rename``), owned by root, mode 0640
with the group of the job's user (``SLURM_JOB_GID``, else the user's primary group from the passwd
entry), so that the job's user reads it and cannot change it; without a group it is 0644. The
content is not secret (lease id, size, devices: ``gpuarb status`` shows as much); what matters is
that the job's user can neither forge nor drop a refusal, so the file and its directory are root's.
No ``fsync``: the state dir is a tmpfs (``/run``) and a grant does not outlive its job.
"""

from __future__ import annotations

import os

from slurm_gpuarb.errors import GpuArbError
from slurm_gpuarb.hooks.common import check_job_id, check_node

# Only for the type checker: importing typing at run time costs a CPU job's Prolog more than it runs.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["GRANTED", "REFUSED", "UNLEASED", "Grant", "GrantError", "grant_path", "is_env_name", "is_line_safe",
           "one_line", "read_grant", "remove_grant", "write_grant"]

GRANT_VERSION: Final = 1
GRANTED: Final = "granted"
REFUSED: Final = "refused"
UNLEASED: Final = "unleased"
MAX_GRANT_BYTES: Final = 65536
MAX_REASON_CHARS: Final = 1024  # what a TaskProlog prints into the job's output


class GrantError(GpuArbError):
    """A grant file cannot be read, parsed or written."""


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` with every run of whitespace, control characters included, as one space; cut at ``limit``."""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(cleaned.split())[:limit]


def is_env_name(name: str) -> bool:
    return bool(name) and name.isascii() and (name[0].isalpha() or name[0] == "_") and \
        all(c.isalnum() or c == "_" for c in name)


def is_line_safe(value: str) -> bool:
    return "\n" not in value and "\r" not in value and "\x00" not in value


class Grant:
    """One job run's grant, as the Prolog writes it and the TaskProlog reads it."""

    __slots__ = ("exports", "job_id", "lease_id", "node", "quantum_mib", "reason", "restart_count", "status",
                 "vram_mib")

    def __init__(self, status: str, job_id: str, node: str, restart_count: int = 0, *, lease_id: str | None = None,
                 vram_mib: int | None = None, quantum_mib: int | None = None, reason: str | None = None,
                 exports: dict[str, str] | None = None) -> None:
        self.status, self.job_id, self.node, self.restart_count = status, job_id, node, restart_count
        self.lease_id, self.vram_mib, self.quantum_mib = lease_id, vram_mib, quantum_mib
        self.reason, self.exports = None if reason is None else one_line(reason), dict(exports or {})

    def to_text(self) -> str:
        """The file's content. Raises :class:`GrantError` on a value that would break the format."""
        fields: list[tuple[str, object]] = [
            ("version", GRANT_VERSION), ("status", self.status), ("job_id", self.job_id), ("node", self.node),
            ("restart_count", self.restart_count), ("lease_id", self.lease_id), ("vram_mib", self.vram_mib),
            ("quantum_mib", self.quantum_mib), ("reason", self.reason),
        ]
        lines = ["# gpuarb grant: written by the Prolog, read by the TaskProlog"]
        for key, value in [*fields, *((f"export.{k}", v) for k, v in self.exports.items())]:
            if value is None:
                continue
            text = str(value)
            if not is_line_safe(text):
                raise GrantError(f"grant field {key} holds a newline or NUL; refusing to write it")
            lines.append(f"{key}={text}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str) -> Grant:
        """Parse a grant file's content. Raises :class:`GrantError`."""
        values: dict[str, str] = {}
        exports: dict[str, str] = {}
        for line in text.split("\n"):
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or "\r" in value or "\x00" in value:
                raise GrantError(f"malformed grant line {line[:60]!r}")
            if key.startswith("export."):
                name = key[7:]
                if not is_env_name(name):
                    raise GrantError(f"malformed export name {name[:60]!r} in a grant")
                exports[name] = value
            else:
                values[key] = value
        if values.get("version") != str(GRANT_VERSION):
            raise GrantError(f"grant file version {values.get('version')!r}; this gpuarb reads {GRANT_VERSION}")
        status = values.get("status")
        if status not in (GRANTED, REFUSED, UNLEASED) or "job_id" not in values or "node" not in values:
            raise GrantError("a grant file needs status (granted|refused|unleased), job_id and node")
        try:
            return cls(status, values["job_id"], values["node"], int(values.get("restart_count", "0")),
                       lease_id=values.get("lease_id"), vram_mib=_opt_int(values.get("vram_mib")),
                       quantum_mib=_opt_int(values.get("quantum_mib")), reason=values.get("reason"),
                       exports=exports)
        except ValueError as e:
            raise GrantError("a grant file holds a malformed number") from e


def _opt_int(text: str | None) -> int | None:
    return None if text is None else int(text)


def grant_path(state_dir: str, node: str, job_id: str) -> str:
    return f"{state_dir}/jobs/{check_node(node, 'node')}/{check_job_id(job_id, 'job id')}.grant"


def write_grant(state_dir: str, grant: Grant, *, gid: int | None) -> str:
    """Write ``grant`` atomically; returns its path. Raises :class:`GrantError` (an OSError inside)."""
    path = grant_path(state_dir, grant.node, grant.job_id)
    text = grant.to_text().encode("utf-8")
    folder = path.rpartition("/")[0]
    tmp = f"{folder}/.{grant.job_id}.grant.{os.getpid()}"
    try:
        os.makedirs(folder, mode=0o755, exist_ok=True)
        try:  # noqa: SIM105 - no contextlib import on the Prolog's path
            os.unlink(tmp)  # left by a killed predecessor with our pid
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text)
            if os.geteuid() == 0:
                os.fchown(fd, 0, 0 if gid is None else gid)
            os.fchmod(fd, 0o644 if gid is None else 0o640)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        try:  # noqa: SIM105 - as above
            os.unlink(tmp)
        except OSError:
            pass
        raise GrantError(f"could not write the grant file {path}; check [daemon] state_dir") from e
    return path


def read_grant(state_dir: str, node: str, job_id: str) -> Grant | None:
    """The grant of ``job_id`` on ``node``, or ``None`` when there is none. Raises :class:`GrantError`."""
    path = grant_path(state_dir, node, job_id)
    try:
        with open(path, encoding="utf-8", errors="strict", newline="") as fh:  # a \r stays visible
            text = fh.read(MAX_GRANT_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise GrantError(f"could not read the grant file {path}") from e
    grant = Grant.from_text(text)
    if grant.job_id != job_id or grant.node != node:
        raise GrantError(f"the grant file {path} names job {grant.job_id} on {grant.node}")
    return grant


def remove_grant(state_dir: str, node: str, job_id: str, restart_count: int) -> bool:
    """Remove the grant of this run of the job; a grant of another run (a requeue) stays. Idempotent."""
    path = grant_path(state_dir, node, job_id)
    try:
        grant = read_grant(state_dir, node, job_id)
    except GrantError:
        grant = None  # unreadable: it helps nobody; remove it
    else:
        if grant is None:
            return False
        if grant.restart_count != restart_count:
            return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
