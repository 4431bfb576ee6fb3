"""logsink: key=value lines that a user-controlled value cannot break or forge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slurm_gpuarb import logsink


@pytest.fixture(autouse=True)
def _reset() -> object:
    yield
    logsink.configure()


def test_line_shape() -> None:
    line = logsink.format_line("prolog", "granted 6144MiB", {"job": "12", "node": "n1", "lease": "L7f", "gpu": 0})
    assert line == "prolog: granted 6144MiB job=12 node=n1 lease=L7f gpu=0"


def test_none_fields_are_left_out() -> None:
    assert logsink.format_line("epilog", "", {"job": "12", "leases": None}) == "epilog: job=12"


@pytest.mark.parametrize(("value", "shown"), [
    ("gpuarb: vram=6GiB", '"gpuarb: vram=6GiB"'),
    ("a\nnode=n9 granted", '"a\\nnode=n9 granted"'),
    ('say "hi"\\', '"say \\"hi\\"\\\\"'),
    ("bell\x07esc\x1b[31m", '"bell\\x07esc\\x1b[31m"'),
    ("", '""'),
    ("tab\there\r", '"tab\\there\\r"'),
    ("line\u2028sep", '"line\\u2028sep"'),
])
def test_values_are_quoted_and_escaped(value: str, shown: str) -> None:
    assert logsink.quote(value) == shown


def test_a_comment_cannot_forge_a_field_or_a_line() -> None:
    comment = 'x" node=n9 lease=EVIL\ngpuarb[1]: prolog: job=99 granted'
    line = logsink.format_line("prolog", "starting", {"job": "12", "comment": comment})
    assert "\n" not in line
    # Split the way a reader would: every token outside quotes is a real field.
    fields = [tok for tok in _tokens(line) if "=" in tok]
    assert [f.split("=", 1)[0] for f in fields] == ["job", "comment"]


def _tokens(line: str) -> list[str]:
    out, cur, quoted, escaped = [], "", False, False
    for c in line:
        if escaped:
            cur, escaped = cur + c, False
        elif c == "\\":
            cur, escaped = cur + c, True
        elif c == '"':
            cur, quoted = cur + c, not quoted
        elif c == " " and not quoted:
            out.append(cur)
            cur = ""
        else:
            cur += c
    return [*out, cur]


def test_long_values_and_lines_are_cut() -> None:
    assert logsink.quote("x" * 10_000) == '"' + "x" * logsink.MAX_VALUE_CHARS + '…"'
    line = logsink.format_line("prolog", "", {f"k{i}": "v" * 400 for i in range(50)})
    assert len(line) == logsink.MAX_LINE_CHARS


def test_message_control_characters_are_escaped() -> None:
    assert logsink.format_line("x", "two\nlines") == "x: two\\nlines"


def test_bad_keys_cannot_split_a_line() -> None:
    assert logsink.format_fields({"a b=c": 1}) == "a_b_c=1"


def test_writes_to_the_file_without_syslog(tmp_path: Path) -> None:
    log = tmp_path / "sub" / "gpuarb.log"
    logsink.configure(log_file=log, syslog=False)
    logsink.log("prolog", "granted 6144MiB", job="12")
    logsink.warning("epilog", "release not recorded", job="12")
    logsink.log("daemon", "not serving", level="error", error="bind")
    lines = log.read_text().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(f"gpuarb[{os.getpid()}]: prolog: granted 6144MiB job=12")
    assert lines[1].endswith("warning: epilog: release not recorded job=12")
    assert lines[2].endswith("error: daemon: not serving error=bind")
    assert (log.stat().st_mode & 0o777) == 0o640


def test_uses_syslog_when_dev_log_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, str]] = []
    import syslog

    monkeypatch.setattr(syslog, "syslog", lambda prio, line: sent.append((prio, line)))
    monkeypatch.setattr(syslog, "openlog", lambda *a: None)
    monkeypatch.setattr(logsink, "DEV_LOG", str(tmp_path))  # exists
    logsink.configure(log_file=tmp_path / "unused.log")
    logsink.error("health", "node drained", node="n1")
    assert sent == [(syslog.LOG_ERR, "health: node drained node=n1")]
    assert not (tmp_path / "unused.log").exists()


def test_never_raises_when_the_log_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    logsink.configure(log_file=tmp_path / "dir", syslog=False)  # a directory: open() fails
    logsink.log("prolog", "still fine", job="1")
