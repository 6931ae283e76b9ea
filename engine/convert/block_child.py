"""Where validate's decoder-block check (engine.convert.block_check) runs, beside the rest of validate.

Importing torch and transformers takes seconds, longer than the rest of a validate on a small checkpoint, so
`start_first_block` runs the check in a child process (`python -m engine.convert.block_child`) beside the rest where
this process has not imported transformers yet, and `BlockRun.finish` writes its findings into the report. In a
local run the driver starts that child before validate (`start_warm`, `--warm`): it imports torch and the
reference layer while the stages before validate run, then reads and runs the source's and the output's layer 0 when
validate asks, on a Unix socket in the validate stage's directory. Whatever goes wrong on that path, validate runs
the check in a child of its own instead: the verdict is the same either way.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.checkpoint.reader import CheckpointReader
from engine.convert.block_check import SourceSide, check_first_block, output_side, run_source, source_side
from engine.core.gcpause import imports_without_gc
from engine.core.parent_watch import die_with_parent
from engine.core.procexit import end_process


class _Recorder:
    """The report calls of check_first_block, kept to be replayed into the parent's report."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def fail(self, check: str, msg: str, at: str | None = None) -> None:
        self.calls.append(["fail", check, msg, at])

    def row(self, check: str, detail: str) -> None:
        self.calls.append(["row", check, detail])

    def skip(self, check: str, why: str) -> None:
        self.calls.append(["skip", check, why])


_KINDS = ("fail", "row", "skip")  # the report calls a child may answer with


def _calls(obj: Any) -> list[list[Any]] | None:
    """A child's answer as report calls to replay; None when it is not one (then nothing is replayed)."""
    if not isinstance(obj, list) or not all(isinstance(c, list) and c and c[0] in _KINDS for c in obj):
        return None
    return obj


def _replay(calls: list[list[Any]], rep) -> None:
    """A child's report calls (a _Recorder's), made on `rep`."""
    for kind, *args in calls:
        getattr(rep, kind)(*args)


def _root_env() -> tuple[str, dict[str, str]]:
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return root, dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))


def _spawn(out_dir: Path, src_dir: Path, target: str, device: str) -> subprocess.Popen | None:
    """The check in a new child, where this process has not imported transformers yet; None: run it here."""
    if "transformers.modeling_utils" in sys.modules:
        return None
    root, env = _root_env()
    return subprocess.Popen([sys.executable, "-m", "engine.convert.block_child", str(out_dir), str(src_dir), target,
                             device], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=env, cwd=root)


def _read_line(conn: socket.socket, limit: int = 1 << 24) -> bytes:
    buf = b""
    while b"\n" not in buf:
        got = conn.recv(65536)
        if not got:
            raise ConnectionError("closed before a whole line came")
        buf += got
        if len(buf) > limit:
            raise ValueError(f"a line over {limit} bytes")
    return buf.split(b"\n", 1)[0]


class BlockRun:
    """The decoder-block check, started early: answered by the run's warm child (`conn`, see `start_warm`), in a
    child process started for it (`proc`), or here at `finish` (both None)."""

    def __init__(self, out_dir: Path, src_dir: Path, target: str, device: str, proc: subprocess.Popen | None,
                 conn: socket.socket | None = None, log: Callable[[str], None] | None = None):
        self.out_dir, self.src_dir, self.target, self.device, self.proc = out_dir, src_dir, target, device, proc
        self.conn, self.log = conn, log or (lambda msg: None)

    @property
    def beside(self) -> bool:
        """Whether the check runs in another process, beside validate's pass, rather than later in this one."""
        return self.proc is not None or self.conn is not None

    def finish(self, r: CheckpointReader, src: CheckpointReader, rep) -> None:
        if self.conn is not None:
            calls = self._warm_answer()
            if calls is not None:
                _replay(calls, rep)
                return
            self.proc = _spawn(self.out_dir, self.src_dir, self.target, self.device)
        if self.proc is None:
            check_first_block(r, src, rep, self.target, self.device)
            return
        out, err = self.proc.communicate()
        self.proc = None
        lines = out.strip().splitlines()
        try:
            calls = json.loads(lines[-1]) if lines else None
        except ValueError:
            calls = None
        if calls is None:  # a bug in the check: its traceback, as if it had run here
            raise RuntimeError(f"validate's decoder-block check of {self.out_dir} failed:\n{err.strip()[-4000:]}")
        _replay(calls, rep)

    def _warm_answer(self) -> list[list[Any]] | None:
        """The warm child's report calls; None (and a log line) when it gave none: the caller runs the check
        itself, so the verdict never depends on the warm child."""
        conn, self.conn = self.conn, None
        try:
            with conn:
                conn.settimeout(None)  # as long as the check takes, as a child of our own would
                answer = json.loads(_read_line(conn))
            calls = _calls(answer.get("calls")) if isinstance(answer, dict) else None
            if calls is not None:
                self.log(f"decoder-block check of {self.out_dir}: answered by the warm child (pid "
                         f"{answer.get('pid')})")
                return calls
            why = (str(answer.get("error") or "no report calls").strip().splitlines() or ["?"])[-1] \
                if isinstance(answer, dict) else "not a JSON object"
        except (OSError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
        self.log(f"decoder-block check of {self.out_dir}: the warm child gave no answer ({why}); running the "
                 "check in a new child")
        return None

    def cancel(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _ask_warm(path: Path, out_dir: Path, src_dir: Path, target: str, device: str,
              log: Callable[[str], None]) -> socket.socket | None:
    """The request sent to the warm child listening at `path`; None (logged) when it cannot be reached."""
    req = {"out": str(out_dir), "src": str(src_dir), "target": target, "device": device}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(CONNECT_S)
        with _address(path) as addr:
            conn.connect(addr)
        conn.sendall((json.dumps(req) + "\n").encode())
    except OSError as e:
        conn.close()
        log(f"decoder-block check of {out_dir}: no warm child at {path} ({type(e).__name__}: {e}); running the "
            "check in a new child")
        return None
    return conn


def start_first_block(out_dir: Path, src_dir: Path, target: str, device: str = "cpu", *,
                      block_socket: str | os.PathLike | None = None,
                      log: Callable[[str], None] | None = None) -> BlockRun:
    """Start the decoder-block check of `out_dir` against `src_dir`: by the warm child listening at
    `block_socket` where there is one (a run's validate stage, `start_warm`), else in a child process where
    transformers is not imported here yet (its import then overlaps the rest of validate), else later, in this
    process. `log` hears which, where a warm child was there to ask."""
    log = log or (lambda msg: None)
    out_dir, src_dir = Path(out_dir).absolute(), Path(src_dir).absolute()  # the children run from the repository
    if block_socket is not None and hasattr(socket, "AF_UNIX") and _is_socket(Path(block_socket)):
        conn = _ask_warm(Path(block_socket), out_dir, src_dir, target, device, log)
        if conn is not None:
            return BlockRun(out_dir, src_dir, target, device, None, conn=conn, log=log)
    return BlockRun(out_dir, src_dir, target, device, _spawn(out_dir, src_dir, target, device), log=log)


# -- the warm child: started by the run's driver before validate ------------------------------------------------------
WARM_SOCKET = "block.sock"  # in the validate stage's directory
SOCKET_PATH_MAX = 107  # bytes: sun_path holds 108 with the closing NUL (longer paths: _address)
WARM_IDLE_S = 900.0  # a warm child nobody asks ends after this
CONNECT_S = 5.0  # the driver bound and listens before the child starts: a connect is at once or never
REQUEST_S = 60.0  # a connected validate sends its request at once


@contextmanager
def _address(path: Path) -> Iterator[str]:
    """`path` as a Unix socket address: itself, or where it is longer than one holds (SOCKET_PATH_MAX bytes), the
    same file reached through a descriptor of its directory (Linux's /proc/self/fd; elsewhere bind and connect
    then fail, and validate starts its own child)."""
    if len(os.fsencode(str(path))) <= SOCKET_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False


def _unlink_socket(path: Path) -> None:
    if _is_socket(path):
        path.unlink(missing_ok=True)


class WarmBlock:
    """A warm child (`start_warm`) and its socket; `stop` ends it (once validate is over, or the driver)."""

    def __init__(self, path: Path, proc: subprocess.Popen):
        self.path, self.proc = path, proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        _unlink_socket(self.path)


def start_warm(sock_path: str | os.PathLike, src_dir: str | os.PathLike, device: str = "cpu", *,
               idle_s: float = WARM_IDLE_S) -> WarmBlock | None:
    """Start the decoder-block check's child ahead of validate: it imports torch and the source family's
    transformers layer, then runs the source's and the output's layer 0 for one validate at `sock_path`
    (start_first_block's `block_socket`) and exits, or after `idle_s` without one. This process binds the socket
    before starting it, so a validate started at once finds it. None where it cannot be (no Unix sockets, a bind
    or start error): validate then starts its own child, as without."""
    path = Path(sock_path)
    if not hasattr(socket, "AF_UNIX"):
        return None
    _unlink_socket(path)  # one a killed child left
    root, env = _root_env()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(path) as addr:
            lsock.bind(addr)
        lsock.listen(4)
        fd = lsock.fileno()
        proc = subprocess.Popen([sys.executable, "-m", "engine.convert.block_child", "--warm", str(path), str(fd),
                                 str(src_dir), device, str(os.getpid()), str(idle_s)], pass_fds=(fd,),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, cwd=root)
    except OSError:
        _unlink_socket(path)
        return None
    finally:
        lsock.close()  # the child holds it now: should it die, a connect is refused instead of left waiting
    return WarmBlock(path, proc)


def _warm_up(src_dir: str, device: str) -> SourceSide | None:
    """The source's half of the check prepared before anyone asks: its imports and the device's context, most of
    its time. Layer 0 of the source is read and run when validate asks (`_serve`): started beside a conversion,
    this child would otherwise read the source while the conversion streams it, and contend for the disk and the
    GPU; asked, it reads it beside validate's pass (from the page cache the conversion left, where the source fits
    in memory). None on any error: the request's own check then meets it again and reports it as a child of
    validate's own would."""
    try:
        return source_side(CheckpointReader(src_dir), device, run=False)
    except Exception:  # noqa: BLE001
        return None


def _serve(conn: socket.socket, side: SourceSide | None, src_dir: str, device: str) -> None:
    try:
        conn.settimeout(REQUEST_S)
        req = json.loads(_read_line(conn))
        conn.settimeout(None)
        out, src, target, dev = req["out"], req["src"], req["target"], req["device"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    rec = _Recorder()
    try:
        r = CheckpointReader(out, strict=False)
        if side is not None and dev == device and Path(src).resolve() == Path(src_dir).resolve():
            output_side(r, run_source(side, CheckpointReader(src_dir)), rec, target)
        else:  # asked about another source or device than warmed up for: the whole check, still warm
            check_first_block(r, CheckpointReader(src), rec, target, dev)
        answer: dict[str, Any] = {"calls": rec.calls, "pid": os.getpid()}
    except Exception:  # noqa: BLE001 - validate runs the check itself then, and meets the error there
        answer = {"error": traceback.format_exc()[-4000:]}
    try:
        conn.sendall((json.dumps(answer) + "\n").encode())
    except OSError:
        pass  # validate gave up on us (cancelled)


def warm_main(argv: list[str]) -> int:
    """`python -m engine.convert.block_child --warm SOCKET FD SRC DEVICE PARENT_PID IDLE_S` (start_warm): listens
    on the bound socket FD (SOCKET its path) for one request, answers it, and exits; also after IDLE_S seconds
    without one, and at once when PARENT_PID (the driver) dies. SOCKET is removed on the first request and at exit."""
    path, fd, src_dir, device = Path(argv[0]), int(argv[1]), argv[2], argv[3]
    parent, idle_s = int(argv[4]), float(argv[5])
    die_with_parent(parent)
    lsock = socket.socket(fileno=fd)
    try:
        with imports_without_gc():  # as main(): a short life that mostly imports
            t0 = time.monotonic()
            side = _warm_up(src_dir, device)
            lsock.settimeout(max(0.1, idle_s - (time.monotonic() - t0)))
            try:
                conn, _ = lsock.accept()
            except (TimeoutError, OSError):
                return 0
            _unlink_socket(path)  # the next validate (another layout's dir) starts its own child
            lsock.close()
            with conn:
                _serve(conn, side, src_dir, device)
    finally:
        lsock.close()
        _unlink_socket(path)
    return 0


def main(argv: list[str]) -> int:
    """`python -m engine.convert.block_child OUT SRC TARGET DEVICE`: the report calls as one JSON line on stdout."""
    out_dir, src_dir, target, device = argv
    rec = _Recorder()
    # a short-lived child that mostly imports transformers (engine.core.gcpause): the collector stays off for its
    # one decoder-layer forward too, which makes no cyclic garbage worth collecting
    with imports_without_gc():
        check_first_block(CheckpointReader(out_dir, strict=False), CheckpointReader(src_dir), rec, target, device)
    sys.stdout.write(json.dumps(rec.calls) + "\n")
    return 0


if __name__ == "__main__":
    # validate reads a child's answer once the child has exited: not after transformers' teardown (~1 s on 2 cores)
    end_process(warm_main(sys.argv[2:]) if sys.argv[1:2] == ["--warm"] else main(sys.argv[1:]))
