"""30 malformed lease specs set with ``scontrol update JobId=X Comment=…`` on pending jobs, with the
submit plane switched off (it refuses them all): no node drains, and each job either runs unleased
with a logged reason or fails with a printed one."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from slurm_gpuarb import spec
from slurm_gpuarb.config import load
from slurm_gpuarb.errors import LeaseSpecError

from .conftest import REPO, Cluster

pytestmark = pytest.mark.slurm

CANARY = Path("/tmp/gpuarb-pwned")  # a comment that reached a shell would create it
_rnd = random.Random(3)
GARBAGE = "".join(_rnd.choice(string.ascii_letters + string.digits + "=:,;!@#$%^&*(){}[]<>?/\\|~`'\" ")
                  for _ in range(1000))

COMMENTS = [
    # shell metacharacters
    f"gpuarb: vram=$(touch {CANARY})GiB",
    f"gpuarb: vram=6GiB; touch {CANARY}",
    f"gpuarb: vram=`touch {CANARY}`",
    f"gpuarb: vram=6GiB | touch {CANARY}",
    f"gpuarb: vram=6GiB && touch {CANARY}",
    "gpuarb: vram='6GiB' prio=\"batch\"",
    # template and format-string syntax
    "gpuarb: vram={{ 7*7 }}GiB",
    "gpuarb: {% for x in range(9) %}vram=1GiB{% endfor %}",
    "gpuarb: vram=${HOME}",
    "gpuarb: vram=%s%n%x%p",
    # unicode digits (int() would take them; the grammar must not)
    "gpuarb: vram=\u0666GiB",
    "gpuarb: vram=\uff16GiB",
    "gpuarb: vram=\U0001d7d4GiB",
    "gpuarb: gpus=\u00b2 vram=1GiB",
    # 1 kB of garbage
    "gpuarb: " + GARBAGE,
    # bad values, keys and combinations
    "gpuarb: vram=-6GiB",
    "gpuarb: vram=99999TiB",
    "gpuarb: vram=1e309GiB",
    "gpuarb: vram=NaNGiB",
    "gpuarb: prio=urgent",
    "gpuarb: vrm=6GiB",
    "gpuarb: vram=6GiB vram=7GiB",
    "gpuarb: vram=6GiB\nprio=llm\u202e",
    "gpuarb: vram=6GiB\tprio=batch\x1b[31m",
    "gpuarb: =6GiB",
    "gpuarb: vram=",
    "gpuarb: ttl=-5s vram=1GiB",
    "gpuarb: vram=6GiB engine=../../etc/passwd",
    "gpuarb: vram=6GiB min=8GiB",
    "gpuarb: vram=150% \U0001f525",
]


def test_the_corpus_is_malformed() -> None:
    """Each comment really is a bad spec (else the cluster test below proves less than it says)."""
    classes = load(REPO / "docker-slurm" / "inventory.toml", env={}).policy.classes
    assert len(COMMENTS) == 30
    for comment in COMMENTS:
        with pytest.raises(LeaseSpecError):
            parsed = spec.parse(comment)
            assert parsed is not None
            spec.check_classes(parsed, classes)


def test_malformed_comments_never_drain_a_node(cluster: Cluster) -> None:
    CANARY.unlink(missing_ok=True)
    wrap = "echo the script ran; echo GPUARB_LEASE_ID=$GPUARB_LEASE_ID"
    jobs: dict[str, str] = {}
    # job_submit.lua refuses every one of these (tests/slurm/test_submit_plane.py): switched off here,
    # the comments reach the Prolog as at a site without the submit plane.
    with cluster.without_submit_plane():
        for i, comment in enumerate(COMMENTS):
            where = ("-p", "shard", "--gres=shard:1") if i % 3 == 2 else ("-p", "batch", "--gres=gpu:1")
            job = cluster.sbatch(*where, wrap=wrap, held=True)
            cluster.run("scontrol", "update", f"JobId={job}", f"Comment={comment}")
            jobs[job] = comment
    cluster.run("scontrol", "release", ",".join(jobs))
    states = cluster.wait(list(jobs), timeout=300)

    cluster.assert_nodes_healthy()
    assert not CANARY.exists(), "a comment reached a shell"
    for job, comment in jobs.items():
        out = cluster.output(job)
        leases = cluster.leases(job)
        assert [r for r in leases if r["state"] == "granted"] == [], (comment, leases)
        if states[job] == "FAILED":
            assert "the script ran" not in out
            assert "gpuarb" in out, f"job {job} ({comment!r}) failed without a printed reason: {out!r}"
        else:
            assert states[job] == "COMPLETED", (job, comment, states[job])
            assert leases == [], f"job {job} ran with a lease from a malformed spec {comment!r}: {leases}"
            assert "GPUARB_LEASE_ID=\n" in out
            assert cluster.log_lines(job), f"job {job} ({comment!r}) ran unleased without a logged reason"
