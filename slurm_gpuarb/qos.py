"""Slurm QoS for the priority classes: what ``gpuarb render`` writes into ``gpuarb-qos.sh``.

One QoS per class (``[classes.NAME] qos``, default the class name) with the class's priority.
A class preempts every *preemptible* class of lower priority (``Preempt=batch`` on ``llm``),
and preempted jobs are requeued or cancelled, never suspended (a suspended job keeps its GPU
memory). ``GraceTime`` gives a preempted batch job time to checkpoint; the config has no key
for it, so it is a render option (default 60 s).

The script is idempotent: each QoS is ``sacctmgr add``-ed when ``sacctmgr -n -P show qos
format=name`` does not list it and ``modify``-ed (every setting, ``Preempt`` included) when it
does, so re-running it after a config change converges. QoS are created in ascending priority:
a QoS can only name in ``Preempt=`` QoS that already exist (batch before llm).

Who may use which QoS: by default every user (``QOS+=`` on the ``root`` account, which pushes
down the association tree, with the default class's QoS as ``DefaultQOS``). ``privileged_accounts``
restricts the QoS of classes that preempt others (``llm`` in the default pair) to those accounts.
The script also takes user names as arguments and gives each the open QoS and the default
(``gpuarb-qos.sh root alice``), so it can replace the test cluster's inline snippet in
``docker-slurm/native-up`` (which creates the cluster, account and users first).

Sites without slurmdbd have no QoS: ``render --no-accounting`` writes
``PreemptType=preempt/partition_prio`` instead, and the partitions' ``PriorityTier`` (llm above
batch) with ``PreemptMode=REQUEUE`` on batch partitions does the preempting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .errors import RenderError
from .model import Policy

__all__ = ["PREEMPT_MODES", "QosPlan", "QosSpec", "plan_qos"]

PREEMPT_MODES: Final = ("REQUEUE", "CANCEL")
_ACCOUNT_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)


@dataclass(frozen=True)
class QosSpec:
    """One QoS as ``sacctmgr`` sets it."""

    name: str
    priority: int
    preempt: tuple[str, ...]  # QoS it may preempt (created before it)
    preempt_mode: str  # requeue | cancel (sacctmgr spelling)
    grace_time_s: int  # for jobs of this QoS when they are preempted
    classes: tuple[str, ...]  # the gpuarb classes mapped to it


@dataclass(frozen=True)
class QosPlan:
    """The QoS in creation order, and who may use them."""

    qos: tuple[QosSpec, ...]
    open_qos: tuple[str, ...]  # every user
    privileged_qos: tuple[str, ...]  # only privileged_accounts (empty when everyone may use all)
    privileged_accounts: tuple[str, ...]
    default_qos: str


def plan_qos(policy: Policy, *, preempt_mode: str = "REQUEUE", grace_time_s: int = 60,
             privileged_accounts: Sequence[str] | None = None) -> QosPlan:
    """The QoS for ``policy``'s classes (see the module docstring).

    ``preempt_mode`` is REQUEUE or CANCEL; SUSPEND is refused because a suspended job keeps its
    GPU memory. ``privileged_accounts`` None lets every user use every QoS. Raises
    :class:`RenderError` naming what to change.
    """
    mode = preempt_mode.upper()
    if mode == "SUSPEND":
        raise RenderError("PreemptMode SUSPEND is refused: a suspended job keeps its GPU memory, so the job that "
                          "preempted it finds none free; use REQUEUE or CANCEL")
    if mode not in PREEMPT_MODES:
        raise RenderError(f"PreemptMode {preempt_mode[:20]!r} is not one of {', '.join(PREEMPT_MODES)}")
    if grace_time_s < 0:
        raise RenderError(f"GraceTime must be at least 0 seconds, got {grace_time_s}")
    by_qos: dict[str, list[str]] = {}
    for c in policy.classes.values():
        by_qos.setdefault(c.qos or c.name, []).append(c.name)
    specs: list[QosSpec] = []
    for qos, names in by_qos.items():
        members = [policy.classes[n] for n in names]
        first = members[0]
        for other in members[1:]:
            if (other.priority, other.preemptible) != (first.priority, first.preemptible):
                raise RenderError(f"classes {first.name} and {other.name} share QoS {qos} but differ in priority or "
                                  "preemptible; give them QoS of their own ([classes.NAME] qos)")
        victims = tuple(dict.fromkeys(
            v.qos or v.name for v in policy.classes.values()
            if v.preemptible and v.priority < first.priority and (v.qos or v.name) != qos))
        specs.append(QosSpec(qos, first.priority, victims, mode.lower(),
                             grace_time_s if first.preemptible else 0, tuple(names)))
    specs.sort(key=lambda q: (q.priority, q.name))  # a QoS may only preempt QoS that exist already
    default = policy.classes[policy.default_class]
    default_qos = default.qos or default.name
    accounts: tuple[str, ...] = ()
    privileged: tuple[str, ...] = ()
    if privileged_accounts is not None:
        accounts = tuple(dict.fromkeys(privileged_accounts))
        if not accounts:
            raise RenderError("an empty list of accounts would leave the preempting QoS to nobody; "
                              "name at least one account, or none to let every user use it")
        for a in accounts:
            if not _ACCOUNT_RE.fullmatch(a):
                raise RenderError(f"account {a[:40]!r} cannot go into the QoS script (use letters, digits, '.', "
                                  "'-', '_')")
        privileged = tuple(q.name for q in specs if q.preempt)
        if default_qos in privileged:
            raise RenderError(f"the default class's QoS {default_qos} preempts others, so restricting it to "
                              "accounts would leave other users without a default QoS; pick another default_class")
    open_qos = tuple(q.name for q in specs if q.name not in privileged)
    return QosPlan(tuple(specs), open_qos, privileged, accounts, default_qos)
