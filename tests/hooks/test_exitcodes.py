"""The exit-code table: only a node fault fails a Prolog/Epilog; the TaskProlog fails to enforce a refusal."""

from __future__ import annotations

import pytest

from slurm_gpuarb.hooks import exitcodes as ec


@pytest.mark.parametrize("hook", ["prolog", "epilog", "prolog_slurmctld", "epilog_slurmctld"])
def test_only_a_node_fault_fails_a_node_side_hook(hook: str) -> None:
    assert {o for o in ec.OUTCOMES if ec.exit_code(hook, o) != ec.OK} == {ec.NODE_FAULT}


def test_bad_spec_outage_and_deadline_never_drain() -> None:
    for outcome in (ec.REFUSED, ec.UNLEASED, ec.CLOSED, ec.DEADLINE, ec.BAD_ENV, ec.INTERNAL):
        assert ec.exit_code("prolog", outcome) == ec.OK
        assert ec.exit_code("epilog", outcome) == ec.OK


def test_task_prolog_fails_the_job_on_a_refusal_only() -> None:
    assert {o for o in ec.OUTCOMES if ec.exit_code("task_prolog", o)} == {ec.TASK_REFUSED}


def test_health_check_fails_on_a_confirmed_foreign_process() -> None:
    assert ec.exit_code("health", ec.FOREIGN) == ec.FAILED
    assert ec.exit_code("health", ec.UNLEASED) == ec.OK


def test_unknown_names_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown hook"):
        ec.exit_code("prologue", ec.GRANTED)
    with pytest.raises(ValueError, match="unknown outcome"):
        ec.exit_code("prolog", "fine")
