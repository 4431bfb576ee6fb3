"""The one seam through which slurm-gpuarb runs external commands.

Every call to ``nvidia-smi``, ``scontrol``, ``sacctmgr`` … goes through :func:`run`, so
that unit tests can :func:`replay` recorded outputs instead (the pattern of submitit's
``MockedSubprocess``) and so that the rules below hold everywhere:

* never a shell: ``argv`` is a sequence, and user-controlled text (a job comment) can only
  ever be one argument, never a command line;
* always a timeout: a hung ``nvidia-smi`` (a GPU falling off the bus) or a slurmctld that
  does not answer must not hang a hook;
* a missing binary, a timeout and a non-zero exit each raise a :class:`SubprocessError`
  subclass whose message names the command and what went wrong; callers re-raise it as
  their own domain error (``raise TelemetryError("nvidia-smi failed") from e``).

Output is decoded as UTF-8 with replacement characters, never raising on odd bytes.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GpuArbError

__all__ = [
    "CommandFailed",
    "CommandNotFound",
    "CommandTimeout",
    "Completed",
    "Replay",
    "Reply",
    "ReplyLike",
    "SubprocessError",
    "UnexpectedCommand",
    "replay",
    "run",
]

_STDERR_TAIL = 500  # characters of stderr quoted in an error message


@dataclass(frozen=True)
class Completed:
    """A command that ran to completion (``returncode`` may be non-zero when ``check=False``)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class SubprocessError(GpuArbError):
    """An external command could not be run, timed out, or failed."""

    def __init__(self, message: str, argv: Sequence[str]) -> None:
        super().__init__(message)
        self.argv = tuple(argv)


class CommandNotFound(SubprocessError):
    """The program is not installed, not on ``PATH``, or not executable."""


class CommandTimeout(SubprocessError):
    """The program ran longer than its timeout and was killed."""


class CommandFailed(SubprocessError):
    """The program exited non-zero (only raised when ``check=True``)."""

    def __init__(self, message: str, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(message, argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class UnexpectedCommand(AssertionError):
    """Raised under :func:`replay` for an ``argv`` the test did not record.

    An ``AssertionError`` on purpose: code under test catches :class:`SubprocessError`,
    and must not swallow a test's wiring mistake as if the command had failed.
    """


def _show(argv: Sequence[str]) -> str:
    return " ".join(argv)


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _STDERR_TAIL else "…" + text[-_STDERR_TAIL:]


def _execute(argv: tuple[str, ...], timeout: float, input: str | None) -> tuple[int, str, str]:
    """Run for real. Raises FileNotFoundError/PermissionError/subprocess.TimeoutExpired."""
    proc = subprocess.run(
        argv,
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        shell=False,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def run(argv: Sequence[str], *, timeout: float = 10.0, input: str | None = None, check: bool = True) -> Completed:
    """Run ``argv`` (no shell) and return its exit status and decoded output.

    ``timeout`` is in seconds; on expiry the child is killed and :class:`CommandTimeout`
    raised. ``input`` is written to the child's stdin (otherwise stdin is ``/dev/null``, so a
    command that prompts cannot hang). With ``check`` a non-zero exit raises
    :class:`CommandFailed` carrying the output; without it the caller inspects
    :attr:`Completed.returncode`. A missing or non-executable program raises
    :class:`CommandNotFound` either way.

    Example::

        out = run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"]).stdout
    """
    if isinstance(argv, str):
        raise TypeError("run() takes an argv sequence, not a command string (no shell is ever used)")
    args = tuple(argv)
    if not args:
        raise ValueError("run() needs a non-empty argv")
    hook = _active
    try:
        if hook is not None:
            returncode, stdout, stderr = hook.answer(args, input)
        else:
            returncode, stdout, stderr = _execute(args, timeout, input)
    except FileNotFoundError as e:
        raise CommandNotFound(f"'{args[0]}' was not found (is it installed and on PATH?)", args) from e
    except PermissionError as e:
        raise CommandNotFound(f"'{args[0]}' is not executable by this user", args) from e
    except subprocess.TimeoutExpired as e:
        raise CommandTimeout(f"'{_show(args)}' did not finish within {timeout:g}s and was killed", args) from e
    except OSError as e:
        raise SubprocessError(f"could not run '{_show(args)}'", args) from e
    if check and returncode != 0:
        detail = _tail(stderr) or _tail(stdout) or "no output"
        raise CommandFailed(
            f"'{_show(args)}' exited with status {returncode}: {detail}", args, returncode, stdout, stderr
        )
    return Completed(args, returncode, stdout, stderr)


# --------------------------------------------------------------------------- replay (tests)


@dataclass(frozen=True)
class Reply:
    """A recorded answer to one argv, for :func:`replay`.

    ``stdout``/``stderr`` are text, or a :class:`~pathlib.Path` to a file holding it (the
    fixtures under ``tests/data/``). ``raises`` simulates what the OS would do instead of
    running the command: ``FileNotFoundError()`` (not installed) or
    ``subprocess.TimeoutExpired(argv, t)`` (hung).
    """

    stdout: str | Path = ""
    stderr: str | Path = ""
    returncode: int = 0
    raises: BaseException | None = None

    def resolve(self) -> tuple[int, str, str]:
        if self.raises is not None:
            raise self.raises
        return self.returncode, _read(self.stdout), _read(self.stderr)


def _read(value: str | Path) -> str:
    return value.read_text(encoding="utf-8") if isinstance(value, Path) else value


ReplyLike = Reply | str | Path | Sequence[Reply]


@dataclass
class Replay:
    """The recorded answers in force, and every call made while they were (``calls``, in order).

    A value in the mapping is a :class:`Reply`, a ``str`` or ``Path`` (stdout of a
    successful run), or a ``list`` of replies consumed one per call (for a command whose
    output changes between calls); an exhausted list is an error, like an unknown argv.
    """

    mapping: Mapping[tuple[str, ...], ReplyLike]
    calls: list[tuple[str, ...]] = field(default_factory=list)
    inputs: list[str | None] = field(default_factory=list)
    _used: dict[tuple[str, ...], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, argv: tuple[str, ...], input: str | None) -> tuple[int, str, str]:
        with self._lock:
            self.calls.append(argv)
            self.inputs.append(input)
            if argv not in self.mapping:
                known = "\n  ".join(_show(k) for k in self.mapping) or "(none)"
                raise UnexpectedCommand(f"unexpected command under replay: {_show(argv)}\nrecorded:\n  {known}")
            value = self.mapping[argv]
            if isinstance(value, Reply):
                reply = value
            elif isinstance(value, str | Path):
                reply = Reply(stdout=value)
            else:
                n = self._used.get(argv, 0)
                if n >= len(value):
                    raise UnexpectedCommand(f"command called {n + 1} times under replay, recorded {len(value)}: "
                                            f"{_show(argv)}")
                self._used[argv] = n + 1
                reply = value[n]
        return reply.resolve()

    def count(self, argv: Sequence[str]) -> int:
        """How many times ``argv`` was run under this replay."""
        key = tuple(argv)
        return sum(1 for c in self.calls if c == key)


_active: Replay | None = None


@contextmanager
def replay(mapping: Mapping[tuple[str, ...], ReplyLike]) -> Iterator[Replay]:
    """Make :func:`run` answer from ``mapping`` (argv tuple → recorded reply) instead of running anything.

    Any argv not in the mapping raises :class:`UnexpectedCommand`. Replays nest: the inner
    one wins until it exits. Affects every thread (hooks and the daemon spawn threads).

    Example::

        with replay({("nvidia-smi", "-L"): Path("tests/data/smi/h100-L.txt")}) as r:
            ...
        assert r.calls == [("nvidia-smi", "-L")]
    """
    global _active
    previous = _active
    current = Replay(dict(mapping))
    _active = current
    try:
        yield current
    finally:
        _active = previous
