"""``gpuarbd``: the node daemon. Serves the lease protocol as JSON lines over a Unix socket.

    gpuarbd [--config PATH] [--socket PATH] [--nodes n1,n2,…] [--foreground]
            [--reconcile-every SECONDS] [--sample-every SECONDS] [--slurm auto|cli|pyslurm|none]
    gpuarbd --role controller [--config PATH] [--foreground] [--interval SECONDS] [--slurm auto|cli|pyslurm]

``--role controller`` runs the controller agent instead (:mod:`slurm_gpuarb.controller`), on the
slurmctld host as root or SlurmUser: no socket (nothing asks it anything), a tick every
``--interval`` seconds (default ``[controller] interval``, 15 s), its PID in
``<state_dir>/gpuarbd-controller.pid``; start-up, detaching and SIGTERM work as for the node role.

It keeps the ledger engine and telemetry open (the hooks' hot path is then one socket round trip),
reconciles the ledger with Slurm and samples per-lease usage in the background (:mod:`.reconcile`),
and serves every node named by ``--nodes`` (a host running several slurmd, like the test cluster:
each message names its node).

**Socket.** Mode 0666 in a 0755 directory: everyone may connect, and what a peer may do is decided
per request from its kernel-reported credentials (``SO_PEERCRED``, see :mod:`.handlers`). One
compact JSON object per line each way (:mod:`slurm_gpuarb.protocol`); a connection may carry
several requests. Each request line must arrive within :data:`CONN_TIMEOUT_S` (as a whole, not per
byte) and at most :data:`MAX_CONNECTIONS` connections are served at once (more wait in the listen
backlog, then are closed): a slow or hostile client cannot pin the daemon's threads. A request
whose client has already hung up is dropped unanswered: after a SIGSTOP/SIGCONT the listen backlog
holds hooks that timed out and did the work in-process, and replaying a stale ``job_start`` after
its job's Epilog would lease memory for a job that has ended.

**Start.** A stale socket is removed, but a daemon that still answers ``ping`` on it is not
replaced. The PID goes to ``<state_dir>/gpuarbd.pid``. The ledger is opened (a fresh database is
created; an existing one is never migrated). A ledger at another schema revision, or one that
cannot be opened, is logged and the daemon exits 1 without serving: it *fails open*, because the
hooks then fall back in-process, hit the same error and apply ``fail_mode`` (``open``: jobs run
unleased, nothing drains) until ``gpuarb db upgrade`` is run and the daemon restarted.

**Stop.** SIGTERM or SIGINT: stop accepting, give requests in flight a few seconds, close the
socket (removed), the ledger and telemetry, remove the PID file. SIGHUP reopens the log file.
Without ``--foreground`` the daemon detaches and the command returns once it serves (exit 0) or
has failed to start (exit 1, the reason on stderr); systemd runs it with ``--foreground``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, Protocol

from .. import logsink, protocol, wire
from ..config import Config, load
from ..errors import ConfigError, GpuArbError, ProtocolError
from .handlers import Handlers, Peer
from .reconcile import Upkeep, reconcile, sample_peaks

if TYPE_CHECKING:
    from ..slurm.base import SlurmAdapter

__all__ = ["CONN_TIMEOUT_S", "MAX_CONNECTIONS", "Daemon", "main", "peer_credentials", "peer_gone"]

CONN_TIMEOUT_S: Final = 10.0
MAX_CONNECTIONS: Final = 64
DRAIN_S: Final = 5.0  # how long SIGTERM waits for requests in flight
PID_FILE: Final = "gpuarbd.pid"
LOG_AS: Final = "gpuarbd"
_PEERCRED: Final = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's uid, gid and pid, as the kernel recorded them at ``connect()``."""
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return Peer(uid=uid, gid=gid, pid=pid)


def peer_gone(sock: socket.socket) -> bool:
    """Whether the peer has closed its end completely (``POLLHUP``). A peer that only shut down its
    writing side (``shutdown(SHUT_WR)``, as ``socat`` does at the end of its input) still reads the answer."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        srv = self.server
        try:
            peer = peer_credentials(sock)
        except OSError:
            return
        reader = wire.SocketLineReader(sock, what="a complete request line")
        while not srv.stopping.is_set():
            reader.deadline = time.monotonic() + srv.conn_timeout
            try:
                line = protocol.read_line(reader)
            except ProtocolError as e:  # over-long line: answer, then drop (the stream is mid-line)
                self._send(sock, protocol.error(e))
                return
            except OSError:  # timed out, reset: nothing to answer
                return
            if not line:
                return
            if peer_gone(sock):
                # The client gave up (a hook's deadline passed while this daemon was stopped or slow)
                # and has done the work in-process: doing it again could lease for a job that ended.
                logsink.log(LOG_AS, "dropped a request whose client had gone", pid=peer.pid, uid=peer.uid)
                return
            try:
                msg = protocol.parse_request(line)
            except ProtocolError as e:
                answer = protocol.error(e)
            else:
                answer = srv.handlers.handle(msg, peer)
            if not self._send(sock, answer):
                return

    @staticmethod
    def _send(sock: socket.socket, answer: dict[str, Any]) -> bool:
        try:
            data = protocol.encode(answer)
        except ProtocolError as e:  # an answer too big to send: say so instead
            data = protocol.encode(protocol.error(e))
        try:
            sock.settimeout(CONN_TIMEOUT_S)
            sock.sendall(data)
        except OSError:
            return False
        return True


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, path: str, handlers: Handlers, *, conn_timeout: float, max_connections: int) -> None:
        self.handlers = handlers
        self.conn_timeout = conn_timeout
        self.stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._active = 0
        self._idle = threading.Condition()
        super().__init__(path, _Connection)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Wait a little for a free slot, then turn the connection away (its client falls back).
        if not self._slots.acquire(timeout=1.0):
            self.shutdown_request(request)
            return
        with self._idle:
            self._active += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _done(self) -> None:
        self._slots.release()
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (at most ``timeout`` s); whether that happened."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)


# --------------------------------------------------------------------------- the daemon


class Daemon:
    """The socket server, its handlers and the upkeep thread. :meth:`start` then :meth:`stop`
    (both from one thread); :meth:`serve` does both around a wait for SIGTERM."""

    def __init__(self, cfg: Config, *, socket_path: str | os.PathLike[str] | None = None,
                 nodes: Sequence[str] | None = None, slurm: SlurmAdapter | None = None,
                 handlers: Handlers | None = None, reconcile_every: float = 30.0, sample_every: float = 5.0,
                 conn_timeout: float = CONN_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS) -> None:
        self.cfg = cfg
        self.socket_path = Path(socket_path if socket_path is not None else cfg.socket_path)
        self.nodes = tuple(nodes or (cfg.node,))
        self.slurm = slurm
        self.handlers = handlers or Handlers(cfg, slurm=slurm, nodes=self.nodes, log_as=LOG_AS)
        self.reconcile_every = reconcile_every
        self.sample_every = sample_every
        self.conn_timeout = conn_timeout
        self.max_connections = max_connections
        self.pid_file = Path(cfg.state_dir) / PID_FILE
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._upkeep: Upkeep | None = None
        self._socket_ino: int | None = None
        self._peaks: dict[str, int] = {}
        self.stop_requested = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the ledger, bind the socket, start serving and the upkeep. Raises GpuArbError (nothing is
        left behind) when another daemon serves the socket or the ledger cannot be used."""
        _ = self.handlers.ledger  # SchemaVersionError / LedgerError here, before anything is bound
        for node in self.nodes:
            try:
                self.handlers.warm(node)
            except GpuArbError as e:  # that node's requests will say so; the others are served
                logsink.log(LOG_AS, "node not ready", level="warning", node=node, error=str(e))
        self._claim_socket()
        path = str(self.socket_path)
        try:
            server = _Server(path, self.handlers, conn_timeout=self.conn_timeout,
                             max_connections=self.max_connections)
        except OSError as e:
            raise ConfigError(f"cannot listen on {path}: check the directory and that no other program uses it") from e
        try:
            os.chmod(path, 0o666)  # everyone may connect; SO_PEERCRED decides what they may do
            self._socket_ino = os.stat(path).st_ino
            self._write_pid_file()
        except OSError as e:
            server.server_close()
            self._remove_socket()
            raise ConfigError(f"cannot set up {path} or {self.pid_file}: check their directories") from e
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="gpuarbd-accept", daemon=True)
        self._thread.start()
        self._upkeep = Upkeep(reconcile=self.reconcile_once if self.slurm is not None else None,
                              sample=self.sample_once, reconcile_every=self.reconcile_every,
                              sample_every=self.sample_every, log_as=LOG_AS)
        self._upkeep.start()
        logsink.log(LOG_AS, "serving", socket=path, nodes=",".join(self.nodes), pid=os.getpid(),
                    slurm=self.slurm.name if self.slurm is not None else "none")

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (a few seconds), release everything. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stopping.set()
            server.shutdown()
            server.server_close()
            self._remove_socket()
            server.wait_idle(DRAIN_S)
        if self._thread is not None:
            self._thread.join(DRAIN_S)
            self._thread = None
        if self._upkeep is not None:
            self._upkeep.stop(DRAIN_S)
            self._upkeep = None
        self.handlers.close()
        self._remove_pid_file()
        if server is not None:
            logsink.log(LOG_AS, "stopped", socket=str(self.socket_path), pid=os.getpid())

    def serve(self, on_ready: Callable[[], object] | None = None) -> None:
        """:meth:`start`, call ``on_ready``, wait for SIGTERM/SIGINT (main thread only), then :meth:`stop`."""
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop_requested.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            logsink.configure(log_file=self.cfg.log_file)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
        try:
            self.start()
            if on_ready is not None:
                on_ready()
            # A short wait: a signal handler's Event.set() does not wake a waiting main thread early.
            while not self.stop_requested.wait(0.1):
                pass
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ upkeep rounds

    def reconcile_once(self) -> object:
        """One reconcile round over the served nodes (see :func:`.reconcile.reconcile`)."""
        assert self.slurm is not None
        return reconcile(self.handlers.ledger, self.slurm, self.nodes, log_as=LOG_AS)

    def sample_once(self) -> dict[str, int]:
        """One usage sample over the served nodes; the peaks that grew."""
        arbs = [self.handlers.arbitration(n) for n in self.nodes]
        return sample_peaks(arbs, self.handlers.ledger, self._peaks)

    # ------------------------------------------------------------------ files

    def _claim_socket(self) -> None:
        path = self.socket_path
        try:
            if not path.parent.is_dir():
                path.parent.mkdir(parents=True)
                path.parent.chmod(0o755)  # whatever the umask: every user must reach the socket
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigError(f"cannot prepare the socket directory {path.parent}") from e
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket; remove it or choose another --socket")
        if _answers(str(path)):
            raise ConfigError(f"another gpuarbd answers on {path}{_pid_hint(self.pid_file)}; stop it first "
                              "(or give this one its own --socket)")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale: its daemon died without cleaning up

    def _remove_socket(self) -> None:
        # Only the socket we bound: a successor may already have replaced it.
        try:
            if self._socket_ino is None or os.stat(self.socket_path).st_ino == self._socket_ino:
                self.socket_path.unlink()
        except OSError:
            pass

    def _write_pid_file(self) -> None:
        self.pid_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.pid_file.with_name(f".{PID_FILE}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n", encoding="ascii")
        os.replace(tmp, self.pid_file)

    def _remove_pid_file(self) -> None:
        try:
            if self.pid_file.read_text(encoding="ascii").strip() == str(os.getpid()):
                self.pid_file.unlink()
        except (OSError, ValueError):
            pass


def _answers(path: str, timeout: float = 1.0) -> bool:
    """Whether a daemon answers ``ping`` on the socket ``path`` (a SIGSTOPped one does not)."""
    from ..client import call

    try:
        call(path, {"v": protocol.PROTOCOL_VERSION, "op": "ping"}, timeout=timeout)
    except GpuArbError:
        return False
    return True


def _pid_hint(pid_file: Path) -> str:
    try:
        return f" (pid {int(pid_file.read_text(encoding='ascii').strip())})"
    except (OSError, ValueError):
        return ""


# --------------------------------------------------------------------------- command line


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (off) or more seconds, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    ap = argparse.ArgumentParser(
        prog="gpuarbd", description="The slurm-gpuarb node daemon: the lease protocol over a Unix socket "
                                    "(--role controller: the controller agent on the slurmctld host).",
        epilog="Example: gpuarbd --foreground --nodes n1,n2 --reconcile-every 30; on the controller: gpuarbd --role "
               "controller --interval 15. Every option has an environment twin (GPUARB_CONFIG, GPUARB_SOCKET, "
               "GPUARB_DAEMON_NODES, GPUARB_RECONCILE_EVERY, GPUARB_SAMPLE_EVERY, GPUARB_SLURM, GPUARB_ROLE, "
               "GPUARB_CONTROLLER_INTERVAL).")
    ap.add_argument("--role", choices=("node", "controller"), default=env("GPUARB_ROLE") or "node",
                    help="node: serve the lease protocol to the hooks (default); controller: shrink pending jobs, "
                         "keep reservation holder jobs, reconcile the ledger cluster-wide")
    ap.add_argument("--interval", metavar="SECONDS", type=_positive, default=env("GPUARB_CONTROLLER_INTERVAL"),
                    help="controller role: seconds between ticks (default: [controller] interval, 15)")
    ap.add_argument("--config", metavar="PATH", help="config file (default /etc/slurm/gpuarb.toml)")
    ap.add_argument("--socket", metavar="PATH", help="Unix socket to serve (default: [daemon] socket)")
    ap.add_argument("--nodes", metavar="N1,N2", default=env("GPUARB_DAEMON_NODES"),
                    help="node names served from this host (default: this node)")
    ap.add_argument("--foreground", action="store_true", help="do not detach (for systemd and tests)")
    ap.add_argument("--reconcile-every", metavar="SECONDS", type=_positive,
                    default=env("GPUARB_RECONCILE_EVERY") or "30",  # a string default goes through type=
                    help="reconcile the ledger with Slurm this often, and once at start; 0: never (default 30)")
    ap.add_argument("--sample-every", metavar="SECONDS", type=_positive,
                    default=env("GPUARB_SAMPLE_EVERY") or "5",
                    help="sample per-lease GPU usage this often; 0: never (default 5)")
    ap.add_argument("--slurm", choices=("auto", "cli", "pyslurm", "none"), default=env("GPUARB_SLURM") or "auto",
                    help="Slurm adapter for reconcile and shard counts; auto: cli when the config has partitions")
    return ap


def _adapter(choice: str, cfg: Config) -> SlurmAdapter | None:
    if choice == "none" or (choice == "auto" and not cfg.partitions):
        return None
    from ..slurm import select_adapter

    return select_adapter("cli" if choice == "auto" else choice)


class _Serving(Protocol):
    """What :func:`_run` and :func:`_detach` run: the node :class:`Daemon` or the controller agent."""

    def serve(self, on_ready: Callable[[], object] | None = None) -> None: ...


def _controller(args: argparse.Namespace, cfg: Config) -> _Serving:
    if args.slurm == "none":
        raise ConfigError("the controller role acts on Slurm's jobs: --slurm none cannot work; use auto or cli")
    from ..controller import Controller
    from ..slurm import select_adapter

    return Controller(cfg, slurm=select_adapter("cli" if args.slurm == "auto" else args.slurm),
                      interval_s=args.interval if args.interval else None)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``gpuarbd`` console script."""
    args = _parser().parse_args(argv)
    daemon: _Serving
    try:
        cfg = load(args.config, overrides={"socket_path": args.socket})
        logsink.configure(log_file=cfg.log_file)
        if args.role == "controller":
            daemon = _controller(args, cfg)
        else:
            nodes = [n.strip() for n in (args.nodes or cfg.node).split(",") if n.strip()]
            daemon = Daemon(cfg, nodes=nodes, slurm=_adapter(args.slurm, cfg), reconcile_every=args.reconcile_every,
                            sample_every=args.sample_every)
    except GpuArbError as e:
        print(f"gpuarbd: error: {e}", file=sys.stderr)
        return 1
    if args.foreground:
        return _run(daemon, None)
    return _detach(daemon)


def _run(daemon: _Serving, ready_fd: int | None) -> int:
    ready = False

    def on_ready() -> None:
        nonlocal ready
        ready = True
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

    try:
        daemon.serve(on_ready)
    except GpuArbError as e:
        logsink.log(LOG_AS, "not serving", level="error", error=str(e),
                    fails="open: hooks fall back in-process and apply fail_mode")
        if ready_fd is not None and not ready:
            os.write(ready_fd, f"{e}\n".encode("utf-8", "backslashreplace"))
        else:
            print(f"gpuarbd: error: {e}", file=sys.stderr)
        return 1
    return 0


def _detach(daemon: _Serving) -> int:
    """Double-fork into the background; return once the daemon serves (0) or failed to start (1)."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(w)
        os.waitpid(first, 0)
        with os.fdopen(r, "rb") as pipe:
            answer = pipe.read().decode("utf-8", "replace").strip()
        if answer == "ok":
            return 0
        print(f"gpuarbd: error: {answer or 'the daemon exited before it served'}", file=sys.stderr)
        return 1
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os._exit(_run(daemon, w))


if __name__ == "__main__":
    sys.exit(main())
