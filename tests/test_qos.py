"""QoS for the priority classes: the plan, and the rendered sacctmgr script run against a fake sacctmgr."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from slurm_gpuarb import qos, render
from slurm_gpuarb.config import default_classes, load
from slurm_gpuarb.errors import RenderError
from slurm_gpuarb.model import ClassPolicy, Policy
from slurm_gpuarb.render import RenderOptions

REPO = Path(__file__).resolve().parent.parent


def policy(*classes: ClassPolicy, default: str = "batch") -> Policy:
    table = {c.name: c for c in classes} if classes else default_classes()
    return Policy(classes=table, margin_mib=1024, quantum_mib=512, default_class=default)


# --------------------------------------------------------------------------- the plan


def test_batch_before_llm_and_llm_preempts_batch() -> None:
    p = qos.plan_qos(policy())
    assert [(q.name, q.priority, q.preempt, q.preempt_mode, q.grace_time_s) for q in p.qos] == [
        ("batch", 10, (), "requeue", 60), ("llm", 1000, ("batch",), "requeue", 0)]
    assert (p.open_qos, p.privileged_qos, p.privileged_accounts, p.default_qos) == (("batch", "llm"), (), (), "batch")


def test_a_class_preempts_every_preemptible_class_below_it() -> None:
    p = qos.plan_qos(policy(
        ClassPolicy("llm", 1000, False, False), ClassPolicy("interactive", 100, False, False, qos="inter"),
        ClassPolicy("batch", 10, True, True), ClassPolicy("scavenger", 1, True, True)), preempt_mode="cancel",
        grace_time_s=300)
    assert [(q.name, q.preempt, q.preempt_mode, q.grace_time_s) for q in p.qos] == [
        ("scavenger", (), "cancel", 300), ("batch", ("scavenger",), "cancel", 300),
        ("inter", ("batch", "scavenger"), "cancel", 0), ("llm", ("batch", "scavenger"), "cancel", 0)]


def test_privileged_accounts_restrict_the_preempting_qos() -> None:
    p = qos.plan_qos(policy(), privileged_accounts=["inference", "research", "inference"])
    assert (p.open_qos, p.privileged_qos, p.privileged_accounts) == (("batch",), ("llm",), ("inference", "research"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"preempt_mode": "suspend"}, "SUSPEND is refused: a suspended job keeps its GPU memory"),
    ({"preempt_mode": "gang"}, "'gang' is not one of REQUEUE, CANCEL"),
    ({"grace_time_s": -1}, "GraceTime must be at least 0"),
    ({"privileged_accounts": []}, "an empty list of accounts would leave the preempting QoS to nobody"),
    ({"privileged_accounts": ["a;rm -rf /"]}, "account 'a;rm -rf /' cannot go into the QoS script"),
])
def test_refusals(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RenderError, match=message.replace("(", r"\(")):
        qos.plan_qos(policy(), **kwargs)  # type: ignore[arg-type]


def test_classes_sharing_a_qos_must_agree() -> None:
    with pytest.raises(RenderError, match="classes batch and bulk share QoS batch but differ in priority"):
        qos.plan_qos(policy(ClassPolicy("llm", 1000, False, False), ClassPolicy("batch", 10, True, True),
                            ClassPolicy("bulk", 5, True, True, qos="batch")))


def test_restricting_the_default_qos_is_refused() -> None:
    with pytest.raises(RenderError, match="the default class's QoS llm preempts others"):
        qos.plan_qos(policy(default="llm"), privileged_accounts=["inference"])


# --------------------------------------------------------------------------- the script, against a fake sacctmgr

FAKE_SACCTMGR = r"""#!/bin/sh
# Logs every call; `show` answers from $STATE/<entity>; `add qos` records the QoS; FAIL makes one verb fail.
echo "$*" >> "$STATE/calls"
case "$*" in
  "-n -P show qos format=name") cat "$STATE/qos" 2>/dev/null; exit 0 ;;
  "-n -P show account format=account") cat "$STATE/account" 2>/dev/null; exit 0 ;;
  "-n -P show user format=user") cat "$STATE/user" 2>/dev/null; exit 0 ;;
  "-n -P show qos where name="*" format=preempt") n=${6#name=}; cat "$STATE/preempt-$n" 2>/dev/null; exit 0 ;;
esac
if [ -n "${FAIL:-}" ] && [ "${2:-}" = "$FAIL" ]; then echo " Unknown option: $FAIL" >&2; exit 1; fi
if [ "$2" = add ] && [ "$3" = qos ]; then
  echo "$4" >> "$STATE/qos"
  for a in "$@"; do case $a in Preempt=*) echo "${a#Preempt=}" > "$STATE/preempt-$4" ;; esac; done
  echo " Adding QOS(s)"; exit 0
fi
if [ -f "$STATE/unchanged" ]; then echo " Nothing modified"; exit 1; fi
echo " Modified"
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    fake = tmp_path / "sacctmgr"
    fake.write_text(FAKE_SACCTMGR)
    fake.chmod(0o755)
    cfg_path = tmp_path / "gpuarb.toml"
    cfg_path.write_text("version = 1\n")
    cfg = load(cfg_path, env={})
    out = tmp_path / "out"
    render.render_all(cfg, out, RenderOptions(accounting=True, privileged_accounts=("inference",), lua=False))
    return out / "gpuarb-qos.sh"


def run(script: Path, tmp_path: Path, *users: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "calls").write_text("")
    full = dict(os.environ, SACCTMGR=str(tmp_path / "sacctmgr"), STATE=str(state), **env)
    done = subprocess.run(["/bin/sh", str(script), *users], capture_output=True, text=True, env=full, timeout=20,
                          check=False)
    return done, [c for c in (state / "calls").read_text().splitlines() if not c.startswith("-n -P show")]


def test_script_adds_missing_qos_in_order_then_modifies(script: Path, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "account").write_text("root\ninference\n")
    done, calls = run(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert calls == [
        "-i add qos batch Priority=10 PreemptMode=requeue GraceTime=60",
        "-i add qos llm Priority=1000 PreemptMode=requeue GraceTime=0 Preempt=batch",
        "-i modify account where name=root set QOS+=batch",
        "-i modify account where name=root set DefaultQOS=batch",
        "-i modify account where name=inference set QOS+=llm",
    ]
    assert done.stdout == "gpuarb-qos: QoS batch, llm in place\n"
    # Again: both exist now, so both are modified; their Preempt lists are already right and are left
    # alone (an empty "Preempt=" would break slurmdbd 22.05's loop check for good).
    done, calls = run(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert calls[:2] == [
        "-i modify qos where name=batch set Priority=10 PreemptMode=requeue GraceTime=60",
        "-i modify qos where name=llm set Priority=1000 PreemptMode=requeue GraceTime=0"]
    assert not any(c.endswith("Preempt=") for c in calls)


def test_script_replaces_a_changed_preempt_list_name_by_name(script: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "qos").write_text("normal\nbatch\nllm\n")
    (state / "account").write_text("root\ninference\n")
    (state / "preempt-batch").write_text("normal\n")  # batch used to preempt normal; now it preempts nothing
    (state / "preempt-llm").write_text("normal\n")
    done, calls = run(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert calls[:5] == [
        "-i modify qos where name=batch set Priority=10 PreemptMode=requeue GraceTime=60",
        "-i modify qos where name=batch set Preempt-=normal",
        "-i modify qos where name=llm set Priority=1000 PreemptMode=requeue GraceTime=0",
        "-i modify qos where name=llm set Preempt-=normal",
        "-i modify qos where name=llm set Preempt=batch"]


def test_script_treats_nothing_modified_as_done(script: Path, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "qos").write_text("normal\nbatch\nllm\n")
    (tmp_path / "state" / "account").write_text("root\ninference\n")
    (tmp_path / "state" / "unchanged").write_text("")
    done, _ = run(script, tmp_path)
    assert done.returncode == 0, done.stderr


def test_script_gives_named_users_the_open_qos(script: Path, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "account").write_text("root\ninference\n")
    (tmp_path / "state" / "user").write_text("root\nalice\n")
    done, calls = run(script, tmp_path, "root", "alice")
    assert done.returncode == 0, done.stderr
    assert calls[-4:] == ["-i modify user where name=root set QOS+=batch", "-i modify user where name=root set "
                          "DefaultQOS=batch", "-i modify user where name=alice set QOS+=batch",
                          "-i modify user where name=alice set DefaultQOS=batch"]
    done, _ = run(script, tmp_path, "mallory")
    assert done.returncode == 1 and "user mallory has no association; add it first" in done.stderr


def test_script_stops_on_a_real_error_and_a_missing_account(script: Path, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    done, calls = run(script, tmp_path)
    assert done.returncode == 1 and "account inference does not exist" in done.stderr
    (tmp_path / "state" / "account").write_text("root\ninference\n")
    done, calls = run(script, tmp_path, FAIL="modify")
    assert done.returncode == 1
    assert "gpuarb-qos: sacctmgr modify qos where name=batch" in done.stderr and "Unknown option" in done.stderr
    assert len(calls) == 1  # set -e: nothing after the failure ran


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck(script: Path) -> None:
    done = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout
