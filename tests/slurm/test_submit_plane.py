"""The submit plane in real daemons: the rendered job_submit.lua (slurmctld) and cli_filter.lua
(sbatch) act on submissions and on ``scontrol update``; ``gpuarb render --check`` finds a shard
count that an edited inventory made too high, and re-rendering with a restart fixes it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from slurm_gpuarb import lua, skus, spec
from slurm_gpuarb.config import load
from slurm_gpuarb.errors import LeaseSpecError

from .conftest import REPO, Cluster, ClusterError, native_up

pytestmark = pytest.mark.slurm

INVENTORY = REPO / "docker-slurm" / "inventory.toml"
QUANTUM = 512  # the inventory's [policy] quantum
DENIED = "Access/permission denied"


def _tables() -> lua.SubmitTables:
    return lua.submit_tables(load(INVENTORY, env={}))


def _sbatch(cluster: Cluster, *args: str, conf: Path | None = None) -> tuple[int, str]:
    """sbatch's exit status and stderr (a refused job has no id to clean up)."""
    env = cluster.env({"SLURM_CONF": str(conf)} if conf else None)
    p = cluster.run("sbatch", "--parsable", "-o", f"{cluster.out}/slurm-%j.out", "-t", "5", *args, "--wrap", "true",
                    check=False, env=env)
    if p.returncode == 0:
        cluster.submitted.append(p.stdout.strip().split(";")[0])
    return p.returncode, p.stderr


def _without_cli_filter(cluster: Cluster, tmp_path: Path) -> Path:
    """A copy of slurm.conf without CliFilterPlugins: sbatch then checks nothing itself, and what
    refuses a job is job_submit.lua in slurmctld (cli_filter is only the early, bypassable check)."""
    text = (cluster.dir / "etc" / "slurm.conf").read_text()
    assert "CliFilterPlugins=" in text
    conf = tmp_path / "slurm.conf"
    conf.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("CliFilterPlugins=")) + "\n")
    return conf


def _refused_in_log(cluster: Cluster, what: str, job: str | None = None) -> list[str]:
    return [ln for ln in cluster.slurmctld_log().splitlines()
            if f"gpuarb: {what}:" in ln and "refused" in ln and (job is None or f"job={job} " in ln)]


def test_shard_spec_without_gres_gets_its_shards_and_canonical_comment(cluster: Cluster) -> None:
    job = cluster.gated("--comment", "gpuarb: vram=6GiB prio=batch", "-p", "shard")
    shards = skus.shards_needed(6 * 1024, QUANTUM)
    info = cluster.slurm_job(job)
    assert info.tres_per_node == f"gres:shard:{shards}"
    assert info.comment == f"gpuarb/1: vram=6144MiB prio=batch shards={shards}"
    assert info.comment == lua.decide_submit(_tables(), lua.JobRequest("gpuarb: vram=6GiB prio=batch",
                                                                       partition="shard")).comment

    cluster.wait([job], {"RUNNING"}, timeout=60)
    lease = cluster.wait_lease(job)
    cluster.go(job)
    assert cluster.wait([job]) == {job: "COMPLETED"}, cluster.output(job)
    env = cluster.job_env(job)
    assert env["SLURM_SHARDS_ON_NODE"] == str(shards)
    assert env["GPUARB_VRAM_MB"] == str(shards * QUANTUM) == str(lease["vram_mib"])


def test_mig_any_gets_the_smallest_fitting_mig_type(cluster: Cluster) -> None:
    job = cluster.gated("--comment", "gpuarb: vram=9GiB mig=any", "-p", "mig")
    want = lua.map_lease(_tables(), spec.parse("gpuarb: vram=9GiB mig=any") or spec.LeaseSpec(),
                         partition="mig").gres
    assert want == "gres:gpu:1g.10gb:1"
    info = cluster.slurm_job(job)
    assert info.tres_per_node == want
    assert info.comment == "gpuarb/1: vram=9216MiB mig=any"
    lease = cluster.wait_lease(job)
    cluster.go(job)
    assert cluster.wait([job]) == {job: "COMPLETED"}, cluster.output(job)
    env = cluster.job_env(job)
    assert lease["mig_uuid"] == env["CUDA_VISIBLE_DEVICES"]
    # The job holds the whole slice (hardware-isolated): at least what it asked for.
    assert int(env["GPUARB_VRAM_MB"]) == lease["vram_mib"] >= 9216


def test_a_gres_that_agrees_with_the_spec_is_asking_once(cluster: Cluster) -> None:
    job = cluster.gated("--comment", "gpuarb: vram=6GiB prio=batch", "--gres=gpu:1", "-p", "batch", "-w", "n1")
    assert cluster.slurm_job(job).tres_per_node == "gres:gpu:1"
    cluster.go(job)
    assert cluster.wait([job]) == {job: "COMPLETED"}, cluster.output(job)


@pytest.mark.parametrize("via", ["cli_filter", "job_submit"])
def test_malformed_spec_is_refused_at_sbatch_with_the_parsers_message(cluster: Cluster, tmp_path: Path,
                                                                      via: str) -> None:
    comment = "gpuarb: vram=6GiB prio=urgent"
    with pytest.raises(LeaseSpecError) as parsed:
        spec.check_classes(spec.parse(comment) or spec.LeaseSpec(), load(INVENTORY, env={}).policy.classes)
    conf = _without_cli_filter(cluster, tmp_path) if via == "job_submit" else None
    rc, err = _sbatch(cluster, "--comment", comment, "-p", "batch", conf=conf)
    assert rc != 0
    assert f"gpuarb: invalid lease spec in --comment: {parsed.value}" in err, err
    if via == "job_submit":
        assert _refused_in_log(cluster, "job_submit"), "job_submit.lua did not log the refusal"


@pytest.mark.parametrize(("args", "why"), [
    (("--gpus=1", "-p", "shard"), "(--gpus 'gres:gpu:1') and through its lease spec; drop --gpus"),
    (("-p", "shard"), "is more than one GPU of partition shard can hold (10752MiB usable)"),
    (("--gres=shard:4", "-p", "shard"), "which takes gres:shard:12 in partition shard"),
])
def test_conflicting_requests_are_refused_with_a_reason(cluster: Cluster, tmp_path: Path, args: tuple[str, ...],
                                                        why: str) -> None:
    comment = "gpuarb: vram=11GiB" if "can hold" in why else "gpuarb: vram=6GiB"
    want = lua.decide_submit(_tables(), lua.JobRequest(comment, partition="shard", tres_per_job=(
        "gres:gpu:1" if "--gpus=1" in args else None), gres="gres:shard:4" if "--gres=shard:4" in args else None))
    assert not want.accepted and why in want.message
    # Through slurmctld's job_submit.lua: cli_filter would refuse first (and is bypassable).
    rc, err = _sbatch(cluster, "--comment", comment, *args, conf=_without_cli_filter(cluster, tmp_path))
    assert rc != 0
    assert why in err, err


def test_pending_jobs_comment_cannot_become_malformed(cluster: Cluster, test_user: str) -> None:
    job = cluster.sbatch("--comment", "gpuarb: vram=2GiB prio=batch", "-p", "shard", wrap="true", held=True,
                         user=test_user)
    before = cluster.slurm_job(job).comment
    for who in ("root", test_user):
        cmd = ["scontrol", "update", f"JobId={job}", "Comment=gpuarb: vram=2GiB prio=urgent"]
        p = cluster.run(*(["runuser", "-u", who, "--", *cmd] if who != "root" else cmd), check=False)
        assert p.returncode != 0 and DENIED in p.stderr, (who, p.stderr)
    assert cluster.slurm_job(job).comment == before
    logged = _refused_in_log(cluster, "job_modify", job)
    assert len(logged) >= 2 and all("unknown priority class 'urgent'" in ln for ln in logged), logged


def test_owner_cannot_change_the_shards_of_a_pending_job(cluster: Cluster, test_user: str) -> None:
    job = cluster.sbatch("--comment", "gpuarb: vram=6GiB prio=batch", "-p", "shard", wrap="true", held=True,
                         user=test_user)
    assert cluster.slurm_job(job).tres_per_node == "gres:shard:12"
    for value in ("TresPerNode=gres:shard:20", "Gres=shard:21", "Gres=shard:8", "Gres=gpu:1"):
        p = cluster.run("runuser", "-u", test_user, "--", "scontrol", "update", f"JobId={job}", value, check=False)
        assert p.returncode != 0 and DENIED in p.stderr, (value, p.stdout, p.stderr)
        assert cluster.slurm_job(job).tres_per_node == "gres:shard:12", value
    reasons = " ".join(_refused_in_log(cluster, "job_modify", job))
    assert "asks for 20 shards, more than the 12" in reasons, reasons
    assert "asks for 8 shards, fewer than the 12" in reasons, reasons
    assert "cannot be set on a job with a lease spec" in reasons, reasons
    # Root (and the controller agent) may: it is how a pending job is shrunk to its min=.
    cluster.run("scontrol", "update", f"JobId={job}", "TresPerNode=gres:shard:8")
    assert cluster.slurm_job(job).tres_per_node == "gres:shard:8"


def _check(cluster: Cluster, config: Path) -> tuple[int, str]:
    args = (cluster.dir / "etc" / "render.args").read_bytes().split(b"\0")
    p = cluster.run(cluster.gpuarb_bin, "--config", config, "render", *[a.decode() for a in args if a], "--check",
                    check=False)
    return p.returncode, p.stdout + p.stderr


def _node_shards(cluster: Cluster, node: str) -> int:
    text = cluster.run("scontrol", "show", "node", node).stdout
    m = re.search(r"Gres=\S*shard:(?:\w+:)?(\d+)", text)
    if m is None:
        raise ClusterError(f"no shard GRES on {node}: {text}")
    return int(m.group(1))


def test_render_check_finds_a_raised_reservation_and_a_rerender_fixes_it(cluster: Cluster, tmp_path: Path) -> None:
    installed = cluster.dir / "etc" / "gpuarb.toml"
    assert _check(cluster, installed)[0] == 0
    before = _node_shards(cluster, "n2")

    # The admin raises the Ollama reservation on n2 from 12 GiB to 14 GiB in the inventory.
    raised = INVENTORY.read_text().replace('size = "12GiB"', 'size = "14GiB"')
    assert raised != INVENTORY.read_text()
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(raised)
    config = tmp_path / "gpuarb.toml"
    config.write_text(installed.read_text().replace('size = "12GiB"', 'size = "14GiB"'))
    rc, report = _check(cluster, config)
    assert rc == 3, report
    assert re.search(r"node n2 gpu 0 \(\S+/nvidia0\): shard count too high: gres.conf offers 21 shards, the inventory"
                     r" now allows 17", report), report

    try:
        native_up(cluster.dir, GPUARB_CLUSTER_INVENTORY=str(inventory), RESTART="1")
        after = _node_shards(cluster, "n2")
        assert after == (24564 - 354 - 1024 - 14 * 1024) // QUANTUM < before
        assert _check(cluster, installed)[0] == 0, "the re-rendered files still differ from the inventory"
        job = cluster.gated("-p", "shard", f"--gres=shard:{after}")
        cluster.wait([job], {"RUNNING"}, timeout=60)
        cluster.go(job)
        assert cluster.wait([job]) == {job: "COMPLETED"}
    finally:
        native_up(cluster.dir, RESTART="1")
    assert _node_shards(cluster, "n2") == before
    cluster.assert_nodes_healthy()


def _gres_lines(text: str, pattern: str) -> list[dict[str, str]]:
    return [dict(re.findall(r"(\w+)=(\S+)", ln)) for ln in text.splitlines() if re.match(pattern, ln)]


@pytest.mark.parametrize("node", ["n1", "n2", "n3"])
def test_slurmd_reads_the_rendered_gres_conf(cluster: Cluster, node: str) -> None:
    """``slurmd -N X -G`` (slurmd parses gres.conf and prints what it found) lists each rendered line."""
    rendered = _gres_lines((cluster.dir / "etc" / "rendered" / "gres.conf").read_text(), rf"NodeName={node}\s")
    assert rendered
    p = cluster.run("slurmd", "-N", node, "-G")
    seen = {(g["Name"], g["Count"], g["File"], g["Type"]) for g in _gres_lines(p.stdout + p.stderr, r"slurmd: Gres ")}
    for line in rendered:
        files = line.get("File") or line["MultipleFiles"]
        # Shards and MPS take their GPU's type (slurm.conf's Gres=); a rendered type must be the one read.
        want = {(n, c, f, t) for n, c, f, t in seen if (n, c, f) == (line["Name"], line.get("Count", "1"), files)}
        assert want, f"slurmd -N {node} -G does not list {line}: {sorted(seen)}"
        if "Type" in line:
            assert {t for *_, t in want} == {line["Type"]}, (line, want)
    gpus = sum(int(c) for n, c, _, _ in seen if n == "gpu")
    assert gpus == sum(int(ln.get("Count", "1")) for ln in rendered if ln["Name"] == "gpu")
