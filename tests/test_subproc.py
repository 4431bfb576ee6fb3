"""The one subprocess seam: real runs (no shell, timeouts, clear errors) and the replay used by tests."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from slurm_gpuarb.errors import GpuArbError
from slurm_gpuarb.subproc import (
    CommandFailed,
    CommandNotFound,
    CommandTimeout,
    Completed,
    Reply,
    ReplyLike,
    SubprocessError,
    UnexpectedCommand,
    replay,
    run,
)

# --------------------------------------------------------------------------- real commands


def test_run_returns_output_and_status() -> None:
    done = run(["echo", "hello"])
    assert done == Completed(("echo", "hello"), 0, "hello\n", "")


def test_no_shell_ever_interprets_an_argument() -> None:
    hostile = "$(touch /tmp/gpuarb-pwned); echo `id` | cat"
    assert run(["echo", hostile]).stdout == hostile + "\n"


def test_a_command_string_is_refused() -> None:
    with pytest.raises(TypeError, match="argv sequence"):
        run("echo hello")


def test_input_reaches_stdin_and_stdin_is_closed_otherwise() -> None:
    assert run(["cat"], input="lease\n").stdout == "lease\n"
    assert run(["cat"], timeout=5).stdout == ""  # /dev/null: cat does not wait for a terminal


def test_non_zero_exit_raises_with_stderr_and_status() -> None:
    with pytest.raises(CommandFailed) as info:
        run(["ls", "/nonexistent-gpuarb-dir"])
    err = info.value
    assert err.returncode != 0
    assert "exited with status" in str(err) and "nonexistent-gpuarb-dir" in str(err)
    assert err.argv == ("ls", "/nonexistent-gpuarb-dir")
    assert isinstance(err, SubprocessError) and isinstance(err, GpuArbError)


def test_non_zero_exit_without_check_is_returned() -> None:
    done = run(["false"], check=False)
    assert done.returncode == 1


def test_missing_program_says_so() -> None:
    with pytest.raises(CommandNotFound, match="'gpuarb-no-such-program' was not found"):
        run(["gpuarb-no-such-program", "--version"], check=False)


def test_non_executable_program(tmp_path: Path) -> None:
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(CommandNotFound, match="not executable"):
        run([str(script)])


def test_timeout_kills_and_says_so() -> None:
    with pytest.raises(CommandTimeout, match=r"did not finish within 0.2s"):
        run(["sleep", "5"], timeout=0.2)


def test_undecodable_output_is_replaced_not_raised() -> None:
    assert run(["printf", "\\377ok"]).stdout == "\ufffdok"


# --------------------------------------------------------------------------- replay


def test_replay_answers_from_text_files_and_replies(tmp_path: Path) -> None:
    recorded = tmp_path / "out.txt"
    recorded.write_text("from a file\n")
    mapping: dict[tuple[str, ...], ReplyLike] = {
        ("tool", "a"): "plain text\n",
        ("tool", "b"): recorded,
        ("tool", "c"): Reply(stdout="partial", stderr="bad things", returncode=3),
    }
    with replay(mapping) as r:
        assert run(["tool", "a"]).stdout == "plain text\n"
        assert run(["tool", "b"]).stdout == "from a file\n"
        assert run(["tool", "c"], check=False) == Completed(("tool", "c"), 3, "partial", "bad things")
        with pytest.raises(CommandFailed, match="status 3: bad things"):
            run(["tool", "c"])
    assert r.calls == [("tool", "a"), ("tool", "b"), ("tool", "c"), ("tool", "c")]
    assert r.count(["tool", "c"]) == 2


def test_replay_fails_loudly_on_an_unrecorded_command() -> None:
    with replay({("nvidia-smi", "-L"): "GPU 0\n"}), pytest.raises(UnexpectedCommand) as info:
        run(["nvidia-smi", "-q"])
    assert "nvidia-smi -q" in str(info.value) and "nvidia-smi -L" in str(info.value)
    # not a SubprocessError: code that handles command failures must not swallow it
    assert not isinstance(info.value, SubprocessError)


def test_replay_simulates_missing_and_hung_programs() -> None:
    mapping: dict[tuple[str, ...], ReplyLike] = {
        ("nvidia-smi",): Reply(raises=FileNotFoundError(2, "No such file")),
        ("scontrol", "ping"): Reply(raises=subprocess.TimeoutExpired(["scontrol", "ping"], 3)),
    }
    with replay(mapping):
        with pytest.raises(CommandNotFound):
            run(["nvidia-smi"])
        with pytest.raises(CommandTimeout):
            run(["scontrol", "ping"], timeout=3)


def test_replay_sequence_is_consumed_in_order() -> None:
    with replay({("squeue",): [Reply(stdout="1"), Reply(stdout="2")]}):
        assert [run(["squeue"]).stdout, run(["squeue"]).stdout] == ["1", "2"]
        with pytest.raises(UnexpectedCommand, match="called 3 times"):
            run(["squeue"])


def test_replay_records_input_nests_and_restores() -> None:
    with replay({("outer",): "o"}) as outer:
        with replay({("inner",): "i"}) as inner:
            assert run(["inner"], input="data").stdout == "i"
            with pytest.raises(UnexpectedCommand):
                run(["outer"])
        assert inner.inputs == ["data", None]  # the refused call is recorded too
        assert run(["outer"]).stdout == "o"
    assert outer.calls == [("outer",)]
    assert run(["echo", "real"]).stdout == "real\n"  # replay is gone


def test_replay_covers_other_threads() -> None:
    seen: list[str] = []
    with replay({("tool",): "threaded"}):
        t = threading.Thread(target=lambda: seen.append(run(["tool"]).stdout))
        t.start()
        t.join()
    assert seen == ["threaded"]
