"""What long jobs (`encodec-fast tokenize`, `encodec-fast train`) need on shared machines.

- `OutputLock`: one writer per output. An exclusive POSIX lock (`fcntl.lockf`) on a hidden lock file
  in the output directory, held while the job runs. The operating system drops it when the process
  ends, however it ends (SIGKILL included), so a killed job never leaves a stale lock; a second job on
  the same output is refused at once with the holder's host and pid. POSIX locks work across NFS
  clients and are not inherited by forked children (DataLoader workers), and a lock taken twice in one
  process is refused here too. Where `fcntl` is missing (Windows) there is no lock.
- `GracefulStop`: SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) ask the job to stop at its next
  safe point (`requested`); the job then writes what it has and raises `Interrupted`, whose exit status
  is 128 + the signal's number. A second signal interrupts at once (`Interrupted` raised where the job
  is), without the safe point.
- `written_then_renamed`: write a file under a temporary name, flush it to disk and rename it onto its
  final name; a failure (a full disk) removes the temporary file, so no partial file is left.
- `describe_os_error`: one line for an I/O failure (disk full, permission, a directory where a file
  should be), naming the path.
"""

import contextlib
import datetime
import errno
import os
import signal
import socket
import sys
import threading
import typing as tp
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]


class JobLockError(RuntimeError):
    """Another job (or this process) holds the output."""


_held: tp.Set[str] = set()  # lock files held by this process
_held_guard = threading.Lock()


class OutputLock:
    """An exclusive lock on `path` (a lock file), for the job that writes `what`."""

    def __init__(self, path: tp.Union[str, Path], what: str):
        self.path, self.what = Path(path), what
        self._fd: tp.Optional[int] = None
        self._key = ""

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self._key = str(self.path.resolve())
        with _held_guard:
            if key in _held:
                raise JobLockError(f"{self.what} is in use by another job in this process (pid {os.getpid()})")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            if fcntl is not None:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    holder = _read(fd)
                    os.close(fd)
                    if err.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    raise JobLockError(f"{self.what} is in use by another job ({holder or 'holder unknown'}); "
                                       "wait for it to end, or write elsewhere") from None
            os.ftruncate(fd, 0)
            started = datetime.datetime.now().isoformat(timespec="seconds")
            os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode())
            self._fd = fd
            _held.add(key)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with _held_guard:
            os.close(self._fd)  # drops the lock
            self._fd = None
            _held.discard(self._key)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: tp.Any) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 300).decode(errors="replace").strip()
    except OSError:
        return ""


class Interrupted(KeyboardInterrupt):
    """The job stopped on a signal; what it finished is written. `exit_status` is 128 + the signal."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_status = 128 + signum


class GracefulStop:
    """`with GracefulStop() as stop:` SIGTERM and SIGINT set `stop.requested` (the signal's number);
    the job checks it at its safe points and calls `stop.raise_if_requested()` once its output is
    written. A second signal raises `Interrupted` at once. Outside the main thread (where Python
    cannot handle signals) nothing is installed and `requested` stays None."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.requested: tp.Optional[int] = None
        self._previous: tp.Dict[int, tp.Any] = {}

    def _handle(self, signum: int, frame: tp.Any) -> None:
        if self.requested is not None:
            raise Interrupted(signum)
        self.requested = signum

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def raise_if_requested(self, message: str = "") -> None:
        if self.requested is not None:
            raise Interrupted(self.requested, message)


def ignore_stop_signals() -> None:
    """For worker processes (DataLoader workers): leave SIGTERM and SIGINT to the main process, which
    stops the job at a safe point and then shuts its workers down."""
    for name in GracefulStop.SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, signal.SIG_IGN)


def describe_os_error(err: OSError, path: tp.Optional[tp.Union[str, Path]] = None) -> str:
    """One line: the path(s) and the cause, e.g. 'out.ecdc: no space left on device'. `path` names the
    file when the error does not (a write that failed deep in a library)."""
    cause = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large (a file-size limit of this process, or of the file system)",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
             errno.EROFS: "read-only file system", errno.EISDIR: "is a directory",
             errno.ENOTDIR: "a part of the path is not a directory",
             errno.ENOENT: "no such file or directory"}.get(err.errno or -1, err.strerror or str(err))
    paths = [p for p in (err.filename, err.filename2) if p] or ([path] if path else [])
    where = " -> ".join(str(p) for p in paths)
    return f"{where}: {cause}" if where else str(cause)


def fsync_replace(tmp: Path, final: Path) -> None:
    """Flush `tmp` to disk, rename it onto `final`, flush the directory entry (where the system allows)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # directories cannot be opened for fsync on some systems
        pass


@contextlib.contextmanager
def written_then_renamed(final: tp.Union[str, Path], tmp: tp.Optional[tp.Union[str, Path]] = None
                         ) -> tp.Iterator[Path]:
    """`with written_then_renamed(path) as tmp: write(tmp)`: `path` appears whole or not at all. The block
    writes `tmp` (default: a hidden name with this process's pid beside `path`); when it ends, `tmp` is
    flushed and renamed onto `path`; when it raises (a full disk, a signal), `tmp` is removed (and an
    OSError that names no file is given `path`)."""
    final = Path(final)
    tmp = Path(tmp) if tmp is not None else final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fsync_replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not exc.filename:
            exc.filename = str(final)  # a library's write error often names no file
        raise


def report_failure(prog: str, err: BaseException, status: int, debug: bool = False,
                   path: tp.Optional[tp.Union[str, Path]] = None) -> int:
    """A command's error as one line on stderr (`PROG: error: ...`; an OSError names its file, or `path`);
    returns `status`. With `debug`, re-raises instead (the traceback)."""
    if debug:
        raise err
    message = describe_os_error(err, path) if isinstance(err, OSError) else str(err)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def report_interruption(prog: str, err: Interrupted) -> int:
    """`PROG: interrupted (SIGTERM): ...` on stderr; returns the exit status (128 + the signal)."""
    print(f"{prog}: interrupted ({signal.Signals(err.signum).name}): {err}", file=sys.stderr)
    return err.exit_status
