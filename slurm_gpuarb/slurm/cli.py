"""The default Slurm adapter: ``squeue --json`` and ``scontrol``, run through :mod:`slurm_gpuarb.subproc`.

Facts this module is built on (measured on Debian 12's Slurm 22.05.8, see tests/data/slurm/):

* ``squeue --json`` in 22.05 **ignores every filter** (``--jobs``, ``--states``, ``--nodelist``:
  the output is byte-identical) and always lists pending, running and recently finished jobs.
  Newer releases honour filters, and ``--jobs`` with an id slurmctld forgot makes them fail. So
  the adapter always asks for everything (``--all --states=all``, the 22.05 behaviour
  everywhere) and filters here.
* The JSON is versioned by its ``meta``: 22.05 prints ``meta.plugin.type = "openapi/v0.0.38"``
  with plain integers and ``job_state`` a string; 23.02+ name their ``meta.plugin.data_parser``
  (``v0.0.39``, ``data_parser/v0.0.40`` …), wrap many numbers as ``{set, infinite, number}``,
  and from 23.11 ``job_state`` is a list of base state and flags (``["RUNNING",
  "CONFIGURING"]``). A version this module has not been checked against is refused.
* ``scontrol show node -o N`` prints one ``Key=Value`` line whose ``Reason=`` (and ``OS=``)
  values contain spaces; ``State=`` is a single token (``MIXED+DRAIN``) that comes first.
* ``scontrol update NodeName=N State=DRAIN Reason=<text>`` takes the reason as one argument:
  spaces, quotes and ``$(…)`` reach slurmctld verbatim. ``State=RESUME`` on a node that is
  not drained fails with "Invalid node state specified".
* ``scontrol update JobId=X TresPerNode=gres:shard:6 Comment=…`` changes a pending job (one
  argument per field, the comment with its spaces); on a job that has started it fails with
  "Job is no longer pending execution" (SLURM-LAB.md). ``sbatch --parsable`` prints ``ID`` or
  ``ID;CLUSTER``; job_submit.lua's refusal reaches its stderr as ``sbatch: error: gpuarb: …``.
* Times (``submit_time``, ``start_time``) are plain integers in 22.05 and ``{set, infinite,
  number}`` later; 0 means "not set" in both. ``state_reason`` is ``"None"`` when there is none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from .. import subproc
from ..config import NAME_RE, expand_hostlist
from .base import DEFAULT_BIN_DIR, DEFAULT_TIMEOUT, UPDATE_KEYS, JobInfo, JobNotPending, SlurmAdapter, SlurmError

__all__ = [
    "SQUEUE_ARGS",
    "SUPPORTED_FORMATS",
    "CliSlurmAdapter",
    "expand_nodelist",
    "parse_node_state",
    "parse_squeue_json",
    "shard_count",
    "squeue_format",
]

#: arguments after ``squeue``: every job of every partition in every state, as JSON
SQUEUE_ARGS: Final = ("--all", "--states=all", "--json")

#: ``squeue --json`` formats this module reads → the Slurm release that prints them
SUPPORTED_FORMATS: Final = {
    "v0.0.38": "22.05",
    "v0.0.39": "23.02",
    "v0.0.40": "23.11",
    "v0.0.41": "24.05",
    "v0.0.42": "24.11",
}

# Slurm's job_state_string() (src/common/slurm_protocol_defs.c) names a job by its first set
# flag in this order, else by its base state; 23.11+ lists base state and flags instead, and
# folding that list the same way keeps JobInfo.state one vocabulary across versions.
_STATE_FLAGS: Final = ("COMPLETING", "STAGE_OUT", "CONFIGURING", "RESIZING", "REQUEUED", "REQUEUE_FED",
                       "REQUEUE_HOLD", "SPECIAL_EXIT", "STOPPED", "REVOKED", "RESV_DEL_HOLD", "SIGNALING")
_BASE_STATES: Final = ("PENDING", "RUNNING", "SUSPENDED", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT",
                       "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY")
_VERSION_RE: Final = re.compile(r"v[0-9]+\.[0-9]+\.[0-9]+$", re.ASCII)
_STATE_RE: Final = re.compile(r"(?:^|\s)State=(\S+)")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]+")
_JOB_ID_RE: Final = re.compile(r"[0-9]{1,10}(?:_[0-9]{1,10})?", re.ASCII)  # 42, or an array task 42_3
_PARSABLE_RE: Final = re.compile(r"([0-9]{1,10})(?:;\S*)?", re.ASCII)
# scancel's answers for a job that is already gone: what the caller wanted, so not an error
_GONE: Final = ("Invalid job id specified", "already completing or completed", "Job/step already completing")
_SNIPPET = 80  # characters of unreadable output quoted in an error


# --------------------------------------------------------------------------- parsing (pure)


def expand_nodelist(text: str) -> tuple[str, ...]:
    """A Slurm node list → node names: ``"n[1-3,5],gpu-a[01-02]"`` → n1 n2 n3 n5 gpu-a01 gpu-a02.

    Commas inside brackets are ranges, outside they separate hostlists; each hostlist is read
    by :func:`slurm_gpuarb.config.expand_hostlist`. An empty text is no nodes. Raises ValueError.
    """
    names: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            if i > start:
                names.extend(expand_hostlist(text[start:i]))
            start = i + 1
    if start < len(text):
        names.extend(expand_hostlist(text[start:]))
    return tuple(names)


def shard_count(tres: str) -> int | None:
    """Shards requested in a TRES string, ``None`` when it names none.

    Reads every form Slurm prints: ``gres:shard:12`` (22.05), ``gres/shard:12`` (23.02+), with a
    type (``gres:shard:a100:12``) or without a count (``gres:shard`` is one); several shard
    entries add up. Other GRES in the string (``gres:gpu:1``) are ignored.
    """
    total: int | None = None
    for item in tres.split(","):
        item = item.strip()
        if item.startswith(("gres:", "gres/")):
            item = item[5:]
        parts = item.split(":")
        if parts[0] != "shard":
            continue
        count = int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
        total = (total or 0) + count
    return total


def squeue_format(doc: Mapping[str, object]) -> tuple[str | None, str | None]:
    """``(format, release)`` of a parsed ``squeue --json`` document: ``("v0.0.38", "22.05.8")``.

    The format comes from ``meta.plugin.data_parser`` (23.02+) or ``meta.plugin.type``
    (``openapi/v0.0.38``); the release from ``meta.Slurm`` (≤ 23.02) or ``meta.slurm`` (23.11+).
    Either is ``None`` when the document does not say.
    """
    meta = doc.get("meta")
    if not isinstance(meta, Mapping):
        return None, None
    fmt: str | None = None
    plugin = meta.get("plugin")
    if isinstance(plugin, Mapping):
        for key in ("data_parser", "type"):
            value = plugin.get(key)
            m = _VERSION_RE.search(value) if isinstance(value, str) else None
            if m is not None:
                fmt = m.group(0)
                break
    release: str | None = None
    slurm = meta.get("slurm", meta.get("Slurm"))
    if isinstance(slurm, Mapping) and isinstance(slurm.get("release"), str):
        release = str(slurm["release"])
    return fmt, release


def parse_squeue_json(text: str) -> list[JobInfo]:
    """Every job in the output of ``squeue --json``, in its order. Raises :class:`SlurmError`.

    The document must declare a format of :data:`SUPPORTED_FORMATS`, carry no ``errors`` and
    hold a ``jobs`` list whose entries have at least ``job_id`` and ``job_state``.
    """
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SlurmError(f"squeue --json printed something that is not JSON ({_snippet(text)}); "
                         f"is this Slurm's squeue?") from e
    if not isinstance(doc, dict):
        raise SlurmError(f"squeue --json printed {type(doc).__name__}, not a JSON object ({_snippet(text)})")
    fmt, release = squeue_format(doc)
    if fmt not in SUPPORTED_FORMATS:
        known = ", ".join(f"{f} (Slurm {r})" for f, r in SUPPORTED_FORMATS.items())
        raise SlurmError(
            f"squeue --json printed format {fmt or '(none declared)'} from Slurm {release or '(unknown release)'}, "
            f"which slurm-gpuarb cannot read; it reads {known}: upgrade slurm-gpuarb, or select the pyslurm "
            f"adapter if its release matches this Slurm"
        )
    errors = doc.get("errors")
    if errors:
        raise SlurmError(f"squeue --json reported errors: {_errors(errors)}")
    jobs = doc.get("jobs")
    if not isinstance(jobs, list):
        raise SlurmError(f"squeue --json (format {fmt}) has no 'jobs' list")
    return [_job(raw, fmt) for raw in jobs]


def parse_node_state(text: str, node: str) -> str:
    """The ``State=`` of ``scontrol show node -o <node>`` output (``MIXED+DRAIN``). Raises :class:`SlurmError`."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    if not line.startswith(f"NodeName={node} "):
        raise SlurmError(f"scontrol show node -o {node} printed no line for node {node} ({_snippet(text)})")
    m = _STATE_RE.search(line)
    if m is None:
        raise SlurmError(f"scontrol show node -o {node} printed no State= ({_snippet(line)})")
    return m.group(1)


def _job(raw: object, fmt: str) -> JobInfo:
    if not isinstance(raw, Mapping):
        raise SlurmError(f"squeue --json (format {fmt}): a job entry is {type(raw).__name__}, not an object")
    job_id = _number(raw, "job_id", fmt, "?")
    if job_id is None:
        raise SlurmError(f"squeue --json (format {fmt}): a job has no job_id ({_snippet(json.dumps(raw))})")
    jid = str(job_id)
    nodes_text = _text(raw, "nodes", fmt, jid)
    try:
        nodes = expand_nodelist(nodes_text)
    except ValueError as e:
        raise SlurmError(f"squeue --json job {jid}: cannot read its node list {nodes_text!r}") from e
    tres_per_node = _text(raw, "tres_per_node", fmt, jid)
    shards = shard_count(tres_per_node)
    if shards is None:
        shards = shard_count(_text(raw, "tres_per_job", fmt, jid))
    return JobInfo(
        job_id=jid,
        state=_state(raw.get("job_state"), fmt, jid),
        restart_count=_number(raw, "restart_cnt", fmt, jid) or 0,
        nodes=nodes,
        comment=_text(raw, "comment", fmt, jid),
        partition=_text(raw, "partition", fmt, jid),
        qos=_text(raw, "qos", fmt, jid),
        user=_text(raw, "user_name", fmt, jid),
        uid=_number(raw, "user_id", fmt, jid),
        tres_per_node=tres_per_node,
        gres_shards=shards,
        submit_time=_time(raw, "submit_time", fmt, jid),
        start_time=_time(raw, "start_time", fmt, jid),
        state_reason=_reason(_text(raw, "state_reason", fmt, jid)),
        name=_text(raw, "name", fmt, jid),
    )


def _time(raw: Mapping[str, object], key: str, fmt: str, jid: str) -> float | None:
    """A Unix time; 0 (Slurm's "not set") and unset/infinite → None."""
    value = _number(raw, key, fmt, jid)
    return float(value) if value else None


def _reason(text: str) -> str:
    return "" if text == "None" else text


def _number(raw: Mapping[str, object], key: str, fmt: str, jid: str) -> int | None:
    """An integer field: plain (22.05) or ``{set, infinite, number}`` (23.02+); unset/infinite → None."""
    value = raw.get(key)
    if isinstance(value, Mapping):
        if not value.get("set", False) or value.get("infinite", False):
            return None
        value = value.get("number")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SlurmError(f"squeue --json job {jid} (format {fmt}): {key} is {value!r}, expected an integer")
    return value


def _text(raw: Mapping[str, object], key: str, fmt: str, jid: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SlurmError(f"squeue --json job {jid} (format {fmt}): {key} is {value!r}, expected text")
    return value


def _state(value: object, fmt: str, jid: str) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        for flag in _STATE_FLAGS:
            if flag in value:
                return flag
        return next((v for v in value if v in _BASE_STATES), str(value[0]))
    raise SlurmError(f"squeue --json job {jid} (format {fmt}): job_state is {value!r}, "
                     f"expected a state name or a list of them")


def _errors(errors: object) -> str:
    items = errors if isinstance(errors, list) else [errors]
    texts = []
    for item in items:
        if isinstance(item, Mapping):
            texts.append(str(item.get("description") or item.get("error") or item))
        else:
            texts.append(str(item))
    return "; ".join(texts)


def _snippet(text: str) -> str:
    text = text.strip()
    if not text:
        return "no output"
    return repr(text if len(text) <= _SNIPPET else text[:_SNIPPET] + "…")


# --------------------------------------------------------------------------- the adapter


class CliSlurmAdapter(SlurmAdapter):
    """:class:`SlurmAdapter` over ``squeue`` and ``scontrol`` found in ``bin_dir`` (absolute)."""

    name = "cli"

    def __init__(self, *, bin_dir: str = DEFAULT_BIN_DIR, timeout: float = DEFAULT_TIMEOUT) -> None:
        base = bin_dir.rstrip("/")
        self.squeue = f"{base}/squeue"
        self.scontrol = f"{base}/scontrol"
        self.sbatch = f"{base}/sbatch"
        self.scancel = f"{base}/scancel"
        self.timeout = timeout

    @property
    def squeue_argv(self) -> tuple[str, ...]:
        """The one ``squeue`` command :meth:`jobs` runs."""
        return (self.squeue, *SQUEUE_ARGS)

    def jobs(self, job_ids: Iterable[str | int] | None = None) -> list[JobInfo]:
        jobs = parse_squeue_json(self._run(self.squeue_argv, "list Slurm's jobs").stdout)
        if job_ids is None:
            return jobs
        wanted = {str(j) for j in job_ids}
        return [j for j in jobs if j.job_id in wanted]

    def drain(self, node: str, reason: str) -> None:
        text = _CONTROL_RE.sub(" ", reason).strip()
        if not text:
            raise SlurmError(f"draining node {node} needs a reason (Slurm refuses a drain without one)")
        self._run(self._update(node, "State=DRAIN", f"Reason={text}"), f"drain node {node}")

    def resume(self, node: str) -> None:
        argv = self._update(node, "State=RESUME")
        try:
            subproc.run(argv, timeout=self.timeout)
        except subproc.CommandFailed as e:
            # scontrol refuses RESUME for a node that is neither drained nor down; that is the
            # state the caller wants, so it is not an error.
            if "Invalid node state" in e.stderr + e.stdout and not _drained(self.node_state(node)):
                return
            raise self._error(e, f"resume node {node}") from e
        except subproc.SubprocessError as e:
            raise self._error(e, f"resume node {node}") from e

    def node_state(self, node: str) -> str:
        out = self._run((self.scontrol, "show", "node", "-o", _checked(node)), f"read the state of node {node}")
        return parse_node_state(out.stdout, node)

    def update_job(self, job_id: str, **fields: str) -> None:
        jid = _checked_job(job_id)
        if not fields:
            raise ValueError("update_job() needs at least one field")
        settings = []
        for key, value in fields.items():
            if key not in UPDATE_KEYS:
                raise ValueError(f"update_job() cannot change {key!r}; allowed: {', '.join(sorted(UPDATE_KEYS))}")
            if _CONTROL_RE.search(value):
                raise SlurmError(f"job {jid}: the new {key} holds control characters; Slurm would store them verbatim")
            settings.append(f"{key}={value}")
        argv = (self.scontrol, "update", f"JobId={jid}", *settings)
        what = f"update job {jid} ({', '.join(fields)})"
        try:
            subproc.run(argv, timeout=self.timeout)
        except subproc.CommandFailed as e:
            said = e.stderr + e.stdout
            if "no longer pending" in said:
                raise JobNotPending(f"could not {what}: the job is no longer pending (it started or ended "
                                    f"meanwhile); Slurm changes GRES of pending jobs only") from e
            raise self._job_error(e, what, jid) from e
        except subproc.SubprocessError as e:
            raise self._error(e, what) from e

    def submit(self, args: Sequence[str], script: str) -> str:
        argv = (self.sbatch, "--parsable", *args)
        try:
            out = subproc.run(argv, timeout=self.timeout, input=script).stdout
        except subproc.CommandFailed as e:
            said = (e.stderr or e.stdout).strip()
            if "Unable to contact slurm controller" in said:
                raise self._error(e, "submit a job") from e
            # sbatch's own words name the problem (job_submit.lua's "gpuarb: …", a bad partition): keep them.
            raise SlurmError(f"Slurm refused the job: {_snippet(said)}") from e
        except subproc.SubprocessError as e:
            raise self._error(e, "submit a job") from e
        m = _PARSABLE_RE.fullmatch(out.strip())
        if m is None:
            raise SlurmError(f"sbatch --parsable printed {_snippet(out)}, not a job id")
        return m.group(1)

    def cancel(self, job_id: str) -> None:
        jid = _checked_job(job_id)
        try:
            subproc.run((self.scancel, jid), timeout=self.timeout)
        except subproc.CommandFailed as e:
            if any(g in e.stderr + e.stdout for g in _GONE):
                return
            raise self._job_error(e, f"cancel job {jid}", jid) from e
        except subproc.SubprocessError as e:
            raise self._error(e, f"cancel job {jid}") from e

    # ----------------------------------------------------------------- helpers

    def _job_error(self, e: subproc.CommandFailed, what: str, jid: str) -> SlurmError:
        said = e.stderr + e.stdout
        if "Invalid job id" in said:
            return SlurmError(f"could not {what}: Slurm does not know job {jid} (it ended long ago?)")
        if "permission denied" in said.lower() or "Access/permission" in said:
            return SlurmError(f"could not {what}: Slurm refused; only root or SlurmUser may change other users' jobs, "
                              f"and job_submit.lua's modify hook lets only its privileged uids change GRES")
        return self._error(e, what)

    def _update(self, node: str, *settings: str) -> tuple[str, ...]:
        return (self.scontrol, "update", f"NodeName={_checked(node)}", *settings)

    def _run(self, argv: Sequence[str], what: str) -> subproc.Completed:
        try:
            return subproc.run(argv, timeout=self.timeout)
        except subproc.SubprocessError as e:
            raise self._error(e, what) from e

    def _error(self, e: subproc.SubprocessError, what: str) -> SlurmError:
        prog = e.argv[0] if e.argv else "?"
        if isinstance(e, subproc.CommandNotFound):
            return SlurmError(f"could not {what}: {prog} is missing; install Slurm's client commands "
                              f"(Debian: slurm-client) or point the Slurm bin_dir at where they are")
        if isinstance(e, subproc.CommandTimeout):
            return SlurmError(f"could not {what}: no answer within {self.timeout:g}s; is slurmctld up and "
                              f"reachable? (scontrol ping)")
        if isinstance(e, subproc.CommandFailed):
            said = e.stderr + e.stdout
            if ("Node" in said and "not found" in said) or "Invalid node name" in said:
                return SlurmError(f"could not {what}: Slurm does not know that node (list nodes with sinfo -N)")
            if "permission denied" in said.lower() or "Access/permission" in said:
                return SlurmError(f"could not {what}: Slurm refused; only root or SlurmUser may change nodes")
            if "Unable to contact slurm controller" in said:
                return SlurmError(f"could not {what}: slurmctld does not answer; is it running? (scontrol ping)")
        return SlurmError(f"could not {what}")


def _checked(node: str) -> str:
    # A node name is one argv element either way; the pattern also keeps '-x' from being read
    # as an option and '=' or spaces from changing an update's meaning.
    if NAME_RE.fullmatch(node) is None:
        raise SlurmError(f"{node[:40]!r} is not a Slurm node name (expected {NAME_RE.pattern})")
    return node


def _checked_job(job_id: str) -> str:
    # One argv element either way; the pattern keeps "JobId=1 UserId=0" or "-x" out of scontrol's reach.
    jid = str(job_id)
    if _JOB_ID_RE.fullmatch(jid) is None:
        raise SlurmError(f"{jid[:40]!r} is not a Slurm job id (expected digits, or an array task such as 42_3)")
    return jid


def _drained(state: str) -> bool:
    # scontrol appends one-character markers to a state (DOWN* = not responding, IDLE~ = powered off)
    flags = {part.strip("*~#!%$@^-") for part in state.split("+")}
    return bool(flags & {"DRAIN", "DRAINED", "DRAINING", "DOWN", "FAIL", "FAILING"})
