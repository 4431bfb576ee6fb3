"""PrologSlurmctld / EpilogSlurmctld: one escaped log line per job start and end; always exit 0."""

from __future__ import annotations

from slurm_gpuarb.hooks import prolog_slurmctld

from .conftest import Cluster


def _env(cluster: Cluster, **extra: str) -> dict[str, str]:
    env = {"GPUARB_CONFIG": str(cluster.config), "SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_JOB_PARTITION": "batch", "SLURM_JOB_USER": "alice", "SLURM_JOB_UID": "1000",
           "SLURM_JOB_COMMENT": "gpuarb: vram=6GiB prio=batch"}
    env.update(extra)
    return env


def test_prolog_logs_the_job(cluster: Cluster) -> None:
    assert prolog_slurmctld.main(_env(cluster), []) == 0
    assert ('prolog_slurmctld: job starting job=12 restart=0 nodes=n[1-2] partition=batch user=alice uid=1000 '
            'comment="gpuarb: vram=6GiB prio=batch"') in cluster.log()


def test_epilog_logs_the_end(cluster: Cluster) -> None:
    assert prolog_slurmctld.main(_env(cluster, SLURM_JOB_EXIT_CODE="0"), ["epilog"]) == 0
    assert "epilog_slurmctld: job ended job=12" in cluster.log() and "exit_code=0" in cluster.log()


def test_hostile_comment_stays_one_escaped_field(cluster: Cluster) -> None:
    comment = "x\ngpuarb[1]: prolog: job=99 granted" + "z" * 1000
    assert prolog_slurmctld.main(_env(cluster, SLURM_JOB_COMMENT=comment), []) == 0
    lines = cluster.log().splitlines()
    assert len(lines) == 1
    assert 'comment="x\\ngpuarb[1]: prolog: job=99 granted' in lines[0]
    assert len(lines[0]) < 600  # cut to MAX_LOGGED_COMMENT


def test_empty_environment_still_exits_zero(cluster: Cluster) -> None:
    assert prolog_slurmctld.main({"GPUARB_CONFIG": str(cluster.config)}, []) == 0
    assert 'job="?"' in cluster.log()
