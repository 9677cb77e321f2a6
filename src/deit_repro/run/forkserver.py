"""A process with torch, torchvision and timm already imported that forks the ``deit-repro`` calls.

Every DAG stage is a fresh ``deit-repro`` process. On a 2-core machine importing torch,
torchvision (which imports ``torch._dynamo`` through ``torchvision.ops``) and timm takes about 4 s,
most of a smoke stage and about a minute of the default DAG. The first ``deit-repro`` call starts,
in the background, a server that imports those libraries once; every later call becomes a thin
client: it hands its argv, working directory, environment and standard streams to the server,
which forks a child to run the command, and exits with the child's status.

What keeps a served call the same as an unserved one:

- deit_repro's own modules are imported afresh in every child, so an edit takes effect at once
  (and DVC's code dependencies keep meaning what they say). Only third-party libraries are shared.
- A server serves only callers with the same interpreter, library files and import-time
  environment (``_KEY_ENV_PREFIXES``): those make the socket's name.
- The child gets the caller's cwd, umask, environment, argv, sys.path and file descriptors 0-2, runs
  in its own process group, receives the signals the client receives (SIGINT, SIGTERM, SIGHUP),
  and kills its whole group the moment the client is gone (``kill -9`` of the caller kills the
  stage).
- The server starts no thread of its own (forking while another thread holds a lock is unsafe)
  and never runs a torch op, so a child starts torch's thread pools from scratch, with the thread
  count the stage sets: the same fork the seed processes of a stage have always used.

Off with ``DEIT_REPRO_FORKSERVER=0``, and always inside a SLURM allocation (a job's processes must
stay in the job's cgroup). ``DEIT_REPRO_FORKSERVER=require`` waits for the server and fails when
it cannot serve (the tests use it). The server exits after ``DEIT_REPRO_FORKSERVER_IDLE_S``
seconds (default 300) without a call. Its log, ``<socket>.log`` (removed on a clean exit), has a
line per call as it starts (``call <child pid>: <argv>``) and as it ends (``call <pid>: X<exit
status>`` or ``K<signal>``). ``python -m deit_repro.run.forkserver stop`` stops this user's servers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Callable

from deit_repro.errors import DeitReproError

SWITCH = "DEIT_REPRO_FORKSERVER"
IDLE = "DEIT_REPRO_FORKSERVER_IDLE_S"
TAG = "DEIT_REPRO_FORKSERVER_TAG"

#: imported once by the server; the stages' heavy third-party imports (prepare: sklearn for digits;
#: tables: pandas and matplotlib). A library that is missing is skipped.
PRELOAD = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "yaml",
    "pandas",
    "matplotlib",
    "sklearn.datasets",
)

#: environment variables read when those libraries load (thread runtimes, torch's and CUDA's
#: flags, the loader, the interpreter, locale) and this module's own settings: callers that differ
#: in one get another server (``DEIT_REPRO_FORKSERVER_TAG=<anything>`` asks for a server of one's
#: own: the benchmarks' cold start, the tests)
_KEY_ENV_PREFIXES = (
    "DEIT_REPRO_FORKSERVER_",
    "OMP_",
    "MKL_",
    "ATEN_",  # ATEN_CPU_CAPABILITY: the kernels torch dispatches to (another float path)
    "ONEDNN_",
    "DNNL_",
    "KMP_",
    "GOMP_",
    "OPENBLAS_",
    "TORCH",
    "PYTORCH",
    "CUDA",
    "NVIDIA",
    "CUBLAS",
    "LD_",
    "PYTHON",
    "MPL",
    "LANG",
    "LC_",
    "TIMM",
    "SCIPY",
    "SKLEARN",
    "NUMPY",
)

#: the signals a client relays to its child's process group
_RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_HEADER = struct.Struct("!I")


# ----------------------------------------------------------------------------------- the client


def call(argv: list[str], target: str, sys_path: list[str] | None = None) -> int | None:
    """Run ``target(argv[1:])`` in a child of the server and return its exit status, or ``None``
    when the call is to run in this process (switched off, in a SLURM job, no server yet: one is
    then started for the next calls).

    Args:
        argv: the command line (``sys.argv``).
        target: ``"module:function"``, the command's main function, imported in the child from
            the code on disk now; it takes ``argv[1:]`` and returns the exit status.
        sys_path: the child's ``sys.path`` (default: this process's).

    Raises:
        DeitReproError: ``require`` mode and no server answered, or the server ended mid-call.
    """
    mode = os.environ.get(SWITCH, "1").strip().lower()
    if mode in ("0", "off", "false", "no") or "SLURM_JOB_ID" in os.environ:
        return None
    try:
        for fd in (0, 1, 2):  # handed over as they are: a closed one cannot be
            os.fstat(fd)
        path = socket_path()
        cwd = os.getcwd()
        sock = _connect(path)
        if sock is None:
            _start_server(path)
            if mode != "require":
                return None
            sock = _wait_for_server(path)
    except OSError:
        return None
    return _run_remote(sock, argv, cwd, target, sys.path if sys_path is None else sys_path)


def socket_path() -> Path:
    """The server's socket for this interpreter, these libraries and this import-time
    environment, in a directory only this user can enter."""
    import tempfile

    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    folder = base / f"deit-repro-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{folder} is not private to this user")
    return folder / f"fs-{_key()}.sock"


def _key() -> str:
    from importlib.util import find_spec

    stamps = []
    for name in PRELOAD + ("deit_repro",):
        try:
            spec = find_spec(name.split(".")[0])
        except (ImportError, ValueError):
            spec = None
        origin = spec.origin if spec is not None else None
        st = os.stat(origin) if origin and os.path.exists(origin) else None
        stamps.append([name, origin, st and st.st_mtime_ns, st and st.st_size])
    own = os.stat(__file__)
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_KEY_ENV_PREFIXES))
    blob = json.dumps(
        [
            sys.executable,
            sys.version,
            repr(sys.flags),
            sorted(sys._xoptions.items()),
            stamps,
            [own.st_mtime_ns, own.st_size],
            env,
        ],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _start_server(path: Path) -> None:
    """Start a server in its own session, unless one already holds the lock (it is starting)."""
    import fcntl
    import subprocess

    with open(path.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
    with open(path.with_suffix(".log"), "w") as log:
        subprocess.Popen(
            [sys.executable, "-m", "deit_repro.run.forkserver", str(path)],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )


def _wait_for_server(path: Path, timeout: float = 120.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = _connect(path)
        if sock is not None:
            return sock
        time.sleep(0.1)
    raise DeitReproError(
        f"{SWITCH}=require but no fork server answered at {path} within "
        f"{timeout:.0f} s; see {path.with_suffix('.log')}",
        f"unset {SWITCH}",
    )


def _run_remote(
    sock: socket.socket, argv: list[str], cwd: str, target: str, path: list[str]
) -> int | None:
    umask = os.umask(0)
    os.umask(umask)
    stream = sys.stdout
    request = json.dumps(
        {
            "argv": argv,
            "target": target,
            "cwd": cwd,
            "env": dict(os.environ),
            "umask": umask,
            "path": path,
            "encoding": getattr(stream, "encoding", None) or "utf-8",
        }
    ).encode()
    try:
        socket.send_fds(sock, [_HEADER.pack(len(request))], [0, 1, 2])
        sock.sendall(request)
    except OSError:  # nothing was started: run in this process after all
        sock.close()
        return None

    def relay(signum, _frame):
        try:
            sock.sendall(b"S%d\n" % signum)
        except OSError:
            pass

    for sig in _RELAYED:
        signal.signal(sig, relay)
    reply = b""
    while not reply.endswith(b"\n"):
        try:
            chunk = sock.recv(64)
        except InterruptedError:
            continue
        if not chunk:
            raise DeitReproError(
                "the fork server ended before the command did",
                f"re-run, or set {SWITCH}=0 to run in this process",
            )
        reply += chunk
    kind, value = reply[:1], int(reply[1:])
    if kind == b"K":  # the child was killed by a signal: end the same way
        for sig in _RELAYED:
            signal.signal(sig, signal.SIG_DFL)
        if value not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(value, signal.SIG_DFL)
        os.kill(os.getpid(), value)
        return 128 + value
    return value


# ----------------------------------------------------------------------------------- the server


def serve(path: Path) -> int:
    """Import the libraries, then fork a child per call until idle for the idle timeout."""
    import fcntl
    import importlib
    import selectors

    lock = open(path.with_suffix(".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another server for the same key is starting or running
    if _connect(path) is not None:
        return 0
    t0 = time.perf_counter()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - a child imports it again and reports the error
            print(f"fork server: not preloaded: {name}: {err!r}", flush=True)
    idle = float(os.environ.get(IDLE, "300"))
    print(
        f"fork server {os.getpid()}: tag {os.environ.get(TAG, '')!r}; preloaded in "
        f"{time.perf_counter() - t0:.1f} s; exits after {idle:.0f} s idle",
        flush=True,
    )

    # Bound under a temporary name and renamed: a client never meets a socket nobody listens on.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    listener.bind(str(tmp))
    listener.listen(64)
    os.rename(tmp, path)
    inode = path.stat().st_ino

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}

    def release() -> None:
        """In a child: let go of everything of the server's (its lock, socket and callers)."""
        signal.set_wakeup_fd(-1)
        sel.close()
        listener.close()
        os.close(wake_r)
        os.close(wake_w)
        lock.close()
        for conn in children.values():
            conn.close()

    last = time.monotonic()
    while True:
        for key, _ in sel.select(timeout=5.0):
            if key.fileobj is listener:
                _accept(listener, children, release)
            else:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
        _reap(children)
        if _STOP and listener.fileno() >= 0:
            # Stopped: take no new call, but report the running ones to their callers.
            sel.unregister(listener)
            listener.close()
            if _still_ours(path, inode):
                path.unlink(missing_ok=True)
        now = time.monotonic()
        if children:
            last = now
        elif _STOP or now - last >= idle or not _still_ours(path, inode):
            break
    if _still_ours(path, inode):
        path.unlink(missing_ok=True)
    # A clean exit leaves nothing behind (a crash leaves its log); the lock goes while still held.
    path.with_suffix(".log").unlink(missing_ok=True)
    path.with_suffix(".lock").unlink(missing_ok=True)
    lock.close()
    return 0


_STOP: list[int] = []


def _stop(signum, _frame):
    _STOP.append(signum)


def _still_ours(path: Path, inode: int) -> bool:
    try:
        return path.stat().st_ino == inode
    except OSError:
        return False


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        if os.WIFSIGNALED(status):
            reply = b"K%d\n" % os.WTERMSIG(status)
        else:
            reply = b"X%d\n" % os.waitstatus_to_exitcode(status)
        print(f"call {pid}: {reply[:1].decode()}{int(reply[1:])}", flush=True)
        try:
            conn.sendall(reply)
        except OSError:
            pass  # the client is gone
        conn.close()


def _accept(
    listener: socket.socket, children: dict[int, socket.socket], release: Callable[[], None]
) -> None:
    """Read one call and fork its child (which runs the command and exits, never returning)."""
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            raise ValueError("a call from another user")
        conn.settimeout(10.0)  # a stuck caller must not stall the other calls
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        if len(fds) != 3 or len(data) < _HEADER.size:
            raise ValueError("a call without its standard streams")
        size = _HEADER.unpack_from(data)[0]
        body = bytearray(data[_HEADER.size :])
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("a truncated call")
            body += chunk
        request = json.loads(body)
        conn.settimeout(None)
    except (OSError, ValueError) as err:
        print(f"fork server: dropped {err}", flush=True)
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            release()
            _child(conn, request, fds)
        except SystemExit as stop:  # argparse's errors and --help, as in an unserved call
            code = _exit_code(stop)
        except BaseException:  # noqa: BLE001 - the child must never return into the server loop
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    print(f"call {pid}: {' '.join(request['argv'][1:])} (in {request['cwd']})", flush=True)


def _exit_code(stop: SystemExit) -> int:
    """The status an interpreter exits with for ``SystemExit(stop.code)``."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    import importlib
    import tempfile
    import threading

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    os.setsid()  # its own group: the client's signals and a lost client reach it and its seeds
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path[:] = request["path"]
    tempfile.tempdir = None  # TMPDIR is the caller's
    _reopen_standard_streams(request["encoding"], bool(os.environ.get("PYTHONUNBUFFERED")))
    # deit_repro is the caller's code as it is on disk now, not as it was when the server started.
    for name in [m for m in sys.modules if m == "deit_repro" or m.startswith("deit_repro.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    threading.Thread(target=_watch_client, args=(conn,), name="client-watch", daemon=True).start()

    module, _, func = request["target"].partition(":")
    main = getattr(importlib.import_module(module), func)
    finish(main(sys.argv[1:]))


def finish(code: int) -> None:
    """Exit without the interpreter's teardown.

    Freeing torch, timm and torch._dynamo at exit costs about 1 s a process on a 2-core machine,
    once per DAG stage. Every output is complete on disk by then (atomic writes, closed files);
    the log and the standard streams are flushed first.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _reopen_standard_streams(encoding: str, unbuffered: bool) -> None:
    import io

    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding=encoding)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.open(1, "wb", closefd=False),
        encoding=encoding,
        line_buffering=unbuffered or os.isatty(1),
        write_through=unbuffered,
    )
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.open(2, "wb", closefd=False),
        encoding=encoding,
        errors="backslashreplace",
        line_buffering=True,
        write_through=unbuffered,
    )


def _watch_client(conn: socket.socket) -> None:
    """Relay the client's signals to this child's group; kill the group when the client is gone,
    as a ``kill -9`` of an unserved stage would have."""
    buf = b""
    while True:
        try:
            chunk = conn.recv(64)
        except OSError:
            chunk = b""
        if not chunk:
            os.killpg(0, signal.SIGKILL)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line[:1] == b"S" and line[1:].isdigit():
                os.killpg(0, int(line[1:]))


def stop_all(tag: str = "") -> list[int]:
    """Stop this user's fork servers whose tag starts with ``tag`` (all of them by default). A
    stopped server takes no new call and exits once its running calls have ended.

    Returns:
        The pids of the servers stopped.
    """
    stopped = []
    for log in socket_path().parent.glob("fs-*.log"):
        try:
            m = re.match(r"fork server (\d+): tag '([^']*)'", log.read_text())
            pid = int(m[1]) if m and m[2].startswith(tag) else 0
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid else b""
        except OSError:
            continue
        if b"deit_repro.run.forkserver" in cmdline:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
    return stopped


if __name__ == "__main__":
    if sys.argv[1:] == ["stop"]:
        print(f"stopped fork servers: {stop_all() or 'none was running'}")
        sys.exit(0)
    sys.exit(serve(Path(sys.argv[1])))
