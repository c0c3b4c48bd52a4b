"""The `python` tool: runs model-written code in a throwaway, locked-down process.

Nothing here trusts the code. Each run goes through two fresh processes:

1. A launcher, ``python -I -S`` running this file as root with an empty environment (no
   ``preexec_fn``: the gRPC server is multi-threaded and ``preexec_fn`` is unsafe with threads).
   It moves into new network, PID, mount, IPC and UTS namespaces and forks.
2. The child, PID 1 of the new PID namespace, builds a new root on a size-capped tmpfs holding only
   read-only bind mounts of ``/usr`` and the Python installation, a private ``/proc``, four
   ``/dev`` nodes, ``/tmp`` and an empty ``/sandbox``; ``chroot``s into it; sets resource limits
   (CPU time, address space, processes, file size, open files, no core dumps); drops to the
   unprivileged uid/gid 65534 ("nobody") with no supplementary groups and ``no_new_privs``; and
   ``exec``s ``python -I -S`` with a minimal environment. A prelude installs an audit hook that
   refuses every ``socket.*`` event (a second layer behind the empty network namespace) and runs
   the code, read from stdin, as ``__main__``.

What each threat meets:

- network: the new network namespace has only a downed loopback; the audit hook refuses sockets.
- the server's files: not in the new root at all (only ``/usr``, the interpreter and the caller's
  ``python_path`` are), and the process runs as nobody, so even a bound file readable only by its
  owner stays closed.
- the server's environment: the child's environment is three fixed variables, and its ``/proc``
  shows only the sandbox's own processes.
- fork bombs: ``RLIMIT_NPROC`` as nobody (the limit does not bind root, hence the uid drop).
- memory: ``RLIMIT_AS``; disk: ``RLIMIT_FSIZE`` plus the tmpfs size.
- time: ``RLIMIT_CPU`` and a wall-clock deadline, after which the parent SIGKILLs the namespace's
  PID 1, and the kernel kills every process left in the namespace (even ones that ``setsid``-ed).
- output: each stream is cut at ``max_output_bytes``; overflowing it stops the run.

The server must run as root with CAP_SYS_ADMIN (namespaces, mounts), as in a privileged
container; otherwise every run returns a ``ToolResult`` whose ``error`` says the sandbox is
unavailable and why: it never falls back to running the code unconfined. Linux only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

SANDBOX_UID = SANDBOX_GID = 65534  # "nobody"
MAX_CODE_CHARS = 100_000
SETUP_FAILED_EXIT = 125

# Runs in the sandboxed interpreter. It reads the code before anything else so that the parent
# can close stdin; the audit hook is installed before the first line of user code.
_PRELUDE = r"""
import sys, os, linecache
sys.path[:0] = sys.argv[1:]  # the caller's read-only library directories
sys.argv = ["<python>"]
code = sys.stdin.read()
_fd = os.open("/dev/null", os.O_RDONLY)
os.dup2(_fd, 0)
os.close(_fd)
def _no_network(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in the python tool")
sys.addaudithook(_no_network)
del _no_network, _fd
linecache.cache["<python>"] = (len(code), None, code.splitlines(True), "<python>")
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(code, "<python>", "exec"), _globals)
except SystemExit:
    raise
except BaseException as _e:
    import traceback
    traceback.print_exception(type(_e), _e, _e.__traceback__.tb_next)
    sys.exit(1)
"""

WORKDIR = "/sandbox"  # the code's working directory, empty at the start of every run
_CHILD_ENV = {"HOME": WORKDIR, "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What one run of the ``python`` tool produced.

    Attributes:
        stdout: what the code printed (UTF-8, invalid bytes replaced), cut at the output limit.
        stderr: tracebacks and other diagnostics, likewise cut.
        exit_code: the process's exit status; negative ``-N`` when signal N killed it; None when
            it never ran (setup failed, code refused).
        timed_out: the wall-clock deadline passed and the sandbox was killed.
        truncated: stdout or stderr was cut.
        error: why the run failed beyond an ordinary non-zero exit (timeout, CPU limit, signal,
            output limit, sandbox unavailable); None otherwise.
        duration_s: wall-clock seconds from launch to the end of the sandbox.
    """

    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    timed_out: bool = False
    truncated: bool = False
    error: str | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """The code ran to completion and exited with status 0."""
        return self.exit_code == 0 and self.error is None


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run; checked on construction.

    Attributes:
        timeout_s: wall-clock limit in seconds (> 0), counted from the launch (the sandbox's
            setup takes ~0.1-0.2 s of it).
        cpu_time_s: CPU-time limit in whole seconds; default ``ceil(timeout_s)``.
        memory_mb: address-space limit of each process in MiB (>= 64: the interpreter needs ~30).
        max_output_bytes: kept bytes per stream (stdout, stderr); more stops the run.
        max_processes: processes the sandbox's uid may have at once (fork-bomb bound); runs
            that overlap in time share this count, as they share the uid.
        max_file_mb: largest file the code may write, in MiB.
        disk_mb: size of the sandbox's whole filesystem (tmpfs), in MiB.
        max_open_files: file descriptors per process.
    """

    timeout_s: float = 5.0
    cpu_time_s: int | None = None
    memory_mb: int = 256
    max_output_bytes: int = 16_384
    max_processes: int = 16
    max_file_mb: int = 8
    disk_mb: int = 32
    max_open_files: int = 64

    def __post_init__(self):
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not 0 < self.timeout_s < math.inf:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if self.cpu_time_s is None:
            object.__setattr__(self, "cpu_time_s", max(1, math.ceil(self.timeout_s)))
        for name, lo in (("cpu_time_s", 1), ("memory_mb", 64), ("max_output_bytes", 1),
                         ("max_processes", 1), ("max_file_mb", 1), ("disk_mb", 1),
                         ("max_open_files", 8)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256,
               cpu_time_s: int | None = None, max_output_bytes: int = 16_384,
               max_processes: int = 16, max_file_mb: int = 8, disk_mb: int = 32,
               python_path: Sequence[str] = ()) -> ToolResult:
    """Runs ``code`` in the sandbox and reports what happened; never raises for the code's sake.

    Args:
        code: Python source, run as ``__main__`` in an empty ``/sandbox`` directory.
        timeout_s, memory_mb, cpu_time_s, max_output_bytes, max_processes, max_file_mb, disk_mb:
            see ``SandboxLimits``.
        python_path: absolute directories (e.g. a site-packages with numpy and sympy) bound
            read-only into the sandbox at the same paths and put first on ``sys.path``. The code
            can read everything in them: never pass a directory holding the server's own files.

    Returns:
        A ``ToolResult``. Whatever the code does (loops, forks, allocates, opens sockets, reads
        files) ends as a result, with ``error`` set when the sandbox stopped it.

    Raises:
        ValueError: a limit is malformed (a server configuration error, not the code's).
    """
    limits = SandboxLimits(timeout_s=timeout_s, cpu_time_s=cpu_time_s, memory_mb=memory_mb,
                           max_output_bytes=max_output_bytes, max_processes=max_processes,
                           max_file_mb=max_file_mb, disk_mb=disk_mb)
    return run_sandboxed(code, limits, python_path=python_path)


def run_sandboxed(code: str, limits: SandboxLimits, *, python_path: Sequence[str] = ()) -> ToolResult:
    """``run_python`` with a ``SandboxLimits``."""
    if isinstance(python_path, str):
        raise ValueError(f"python_path must be a sequence of directories, got the string {python_path!r}")
    python_path = [str(p) for p in python_path]
    for p in python_path:
        real = os.path.realpath(p)
        if not os.path.isabs(p) or not os.path.isdir(p) or real == "/" or any(
                real == d or real.startswith(d + "/") for d in (WORKDIR, "/dev", "/proc")):
            raise ValueError(f"python_path entries must be absolute directories other than /, "
                             f"{WORKDIR}, /dev and /proc, got {p!r}")
    if not isinstance(code, str):
        return ToolResult(error=f"code must be a string, got {type(code).__name__}")
    if len(code) > MAX_CODE_CHARS:
        return ToolResult(error=f"code is too long: {len(code)} characters, at most {MAX_CODE_CHARS}")
    if "\x00" in code:
        return ToolResult(error="code contains a NUL character")
    if not sys.platform.startswith("linux"):
        return ToolResult(error="python tool unavailable: the sandbox needs Linux")
    if os.geteuid() != 0:
        return ToolResult(error="python tool unavailable: the sandbox needs the server to run as root "
                                "to drop the code to an unprivileged user in private namespaces")
    root = tempfile.mkdtemp(prefix="kestrel-python-")
    try:
        return _run(code.encode("utf-8", "replace"), limits, root, python_path)
    finally:
        # The tmpfs lived in the sandbox's mount namespace, which died with its processes: the
        # directory is an empty mount point here.
        shutil.rmtree(root, ignore_errors=True)


def _run(code: bytes, limits: SandboxLimits, root: str, python_path: list[str]) -> ToolResult:
    status_r, status_w = os.pipe()
    cfg = {
        "root": root,
        "status_fd": status_w,
        "python": os.path.realpath(sys.executable),
        "binds": _bind_paths() + [os.path.realpath(p) for p in python_path],
        "python_path": [os.path.realpath(p) for p in python_path],
        "limits": dataclasses.asdict(limits),
    }
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), "--launch", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={},
            cwd="/", pass_fds=(status_w,), start_new_session=True, close_fds=True)
    finally:
        os.close(status_w)
    out = _Streams(limits.max_output_bytes)
    status_buf = bytearray()
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(status_r, selectors.EVENT_READ, "status")
    pending = memoryview(code)
    deadline = start + limits.timeout_s
    timed_out = overflow = False
    child_pidfd = None
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=remaining):
                name = key.data
                if name == "stdin":
                    try:
                        n = os.write(key.fd, pending[:65536])
                    except (BrokenPipeError, BlockingIOError) as e:
                        n = 0 if isinstance(e, BlockingIOError) else len(pending)
                    pending = pending[n:]
                    if not pending:
                        sel.unregister(key.fileobj)
                        proc.stdin.close()
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if name == "status":
                    status_buf += data
                    if child_pidfd is None:
                        child_pidfd = _open_child(status_buf)
                elif not out.add(name, data):
                    overflow = True
            if overflow:
                break
        if timed_out or overflow:
            _stop(proc, child_pidfd)
            _drain(sel, out, status_buf, until=time.monotonic() + 1.0)
    except BaseException:
        _stop(proc, child_pidfd)
        raise
    finally:
        try:
            # The launcher reaps the killed PID 1 and reports; only if it hangs is it killed
            # (which leaves PID 1 to the host's init to reap).
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            proc.wait()
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if not f.closed:
                f.close()
        os.close(status_r)
        if child_pidfd is not None:
            os.close(child_pidfd)
    duration = time.monotonic() - start
    status = _parse_status(status_buf)
    stdout, stderr = out.text("stdout"), out.text("stderr")
    common = dict(stdout=stdout, stderr=stderr, truncated=out.truncated, duration_s=duration)
    if "setup_error" in status:
        return ToolResult(error=f"python tool unavailable: sandbox setup failed: {status['setup_error']}",
                          **common)
    exit_code = status.get("exit_code")
    if timed_out:
        return ToolResult(exit_code=exit_code, timed_out=True, error=(
            f"timed out after {limits.timeout_s:g} s of wall-clock time; the process was killed"), **common)
    if overflow:
        return ToolResult(exit_code=exit_code, error=(
            f"output limit exceeded: more than {limits.max_output_bytes} bytes on one stream; "
            "the process was stopped"), **common)
    if exit_code is None:
        launcher = proc.returncode
        return ToolResult(error=f"python tool failed: the sandbox launcher exited with status {launcher}"
                                f": {stderr.strip()[-300:]}", **common)
    error = None
    if exit_code < 0:
        sig = _signal_name(-exit_code)
        # The kernel's SIGKILL at RLIMIT_CPU; rusage under-reports CPU time by up to a tick or
        # so per thread, hence the margin.
        if sig == "SIGKILL" and status.get("cpu_s", 0.0) >= 0.75 * limits.cpu_time_s:
            error = f"CPU time limit of {limits.cpu_time_s} s exceeded; the process was killed ({sig})"
        else:
            error = f"the process was killed by {sig}"
    return ToolResult(exit_code=exit_code, error=error, **common)


def render_for_model(result: ToolResult) -> str:
    """The text the model sees as the ``python`` tool's response.

    Follows the convention of the synthetic training data (``train/synthetic/python_tool.py``):
    a successful run is what it printed, trailing whitespace removed; a failed one starts with an
    ``error: `` line (``error: python tool code failed: ZeroDivisionError: division by zero``,
    ``error: timed out after ...``). What the code printed and its traceback follow, so a model
    can debug from them.
    """
    parts = []
    if not result.ok:
        parts.append(f"error: {_failure_reason(result)}")
    if result.stdout.strip():
        parts.append(result.stdout.rstrip() if result.ok else "[stdout]\n" + result.stdout.rstrip())
    if result.stderr.strip():
        parts.append("[stderr]\n" + result.stderr.rstrip())
    if result.truncated:
        parts.append("[output truncated]")
    return "\n".join(parts)


def _failure_reason(result: ToolResult) -> str:
    if result.error:
        return result.error
    last = result.stderr.strip().rsplit("\n", 1)[-1].strip()
    if result.exit_code == 1 and "Traceback (most recent call last)" in result.stderr and last:
        return f"python tool code failed: {last}"  # the exception line, e.g. "ValueError: ..."
    return f"the program exited with status {result.exit_code}"


# ---------------------------------------------------------------------------- parent helpers
class _Streams:
    """Keeps at most ``cap`` bytes of each output stream."""

    def __init__(self, cap: int):
        self.cap = cap
        self.data = {"stdout": bytearray(), "stderr": bytearray()}
        self.truncated = False

    def add(self, name: str, chunk: bytes) -> bool:
        """Appends; False once the stream went past the cap."""
        buf = self.data[name]
        room = self.cap - len(buf)
        buf += chunk[:max(room, 0)]
        if len(chunk) > room:
            self.truncated = True
            return False
        return True

    def text(self, name: str) -> str:
        text = self.data[name].decode("utf-8", "replace")
        # A cut in the middle of a character leaves one replacement character; drop it.
        return text.rstrip("\ufffd") if self.truncated else text


def _bind_paths() -> list[str]:
    """Host paths the sandbox's root shows read-only: /usr, /lib*-style links, the interpreter."""
    paths = ["/usr"]
    for top in ("/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin"):
        if os.path.lexists(top):
            paths.append(top)
    for p in {sys.base_prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}:
        p = os.path.realpath(p)
        if not any(p == q or p.startswith(q + "/") for q in paths):
            paths.append(p)
    return paths


def _open_child(status_buf: bytes) -> int | None:
    """A pidfd of the namespace's PID 1 once the launcher reported its pid (kills it safely)."""
    status = _parse_status(status_buf)
    pid = status.get("child_pid")
    if pid is None or "exit_code" in status:  # not started, or already reaped (pid reusable)
        return None
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def _stop(proc: subprocess.Popen, child_pidfd: int | None) -> None:
    """Kills the sandbox: its PID 1 (the kernel then kills every process in its namespace)."""
    if child_pidfd is None:
        # PID 1 not known yet: killing the launcher kills it through its parent-death signal.
        _killpg(proc)
        return
    try:
        signal.pidfd_send_signal(child_pidfd, signal.SIGKILL)
    except OSError:
        pass  # already gone


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _drain(sel: selectors.BaseSelector, out: _Streams, status_buf: bytearray, until: float) -> None:
    while sel.get_map() and time.monotonic() < until:
        for key, _ in sel.select(timeout=max(until - time.monotonic(), 0.0)):
            if key.data == "stdin":
                sel.unregister(key.fileobj)
                continue
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
            elif key.data == "status":
                status_buf += data
            else:
                out.add(key.data, data)


def _parse_status(buf: bytes) -> dict:
    status: dict = {}
    for line in bytes(buf).decode("utf-8", "replace").splitlines():
        try:
            status.update(json.loads(line))
        except ValueError:
            pass
    return status


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


# ---------------------------------------------------------------------------- launcher (root)
# Everything below runs in the launcher process and its child, before the code is exec'd.
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


def _launch(cfg: dict) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    status_fd = cfg["status_fd"]

    def report(**kw):
        os.write(status_fd, (json.dumps(kw) + "\n").encode())

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    try:
        check(libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC
                           | _CLONE_NEWUTS), "unshare")
    except OSError as e:
        report(setup_error=str(e))
        os._exit(SETUP_FAILED_EXIT)
    pid = os.fork()
    if pid == 0:
        try:
            _enter(cfg, libc, check)
        except BaseException as e:  # noqa: BLE001 - any failure here must become a report
            report(setup_error=f"{type(e).__name__}: {e}")
        os._exit(SETUP_FAILED_EXIT)
    report(child_pid=pid)
    # The launcher keeps no copy of the code's pipes, so EOF comes when the sandbox is gone.
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _, status, usage = os.wait4(pid, 0)
    report(exit_code=os.waitstatus_to_exitcode(status), cpu_s=usage.ru_utime + usage.ru_stime)
    os._exit(0)


def _enter(cfg: dict, libc, check) -> None:
    """In the new namespaces as PID 1: builds the root, limits itself, drops privileges, execs."""
    import resource

    lim = cfg["limits"]
    root = cfg["root"]
    os.set_inheritable(cfg["status_fd"], False)
    check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")

    def mount(src, dst, fstype, flags, data=None):
        check(libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(),
                         flags, data and data.encode()), f"mount {dst}")

    # Private propagation first, so nothing mounted here shows up in the server's namespace.
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={lim['disk_mb']}m,mode=755")
    # The sandbox's own directories first: a bind below /tmp then lands inside them.
    os.makedirs(root + "/dev", mode=0o755)
    for dev in ("null", "zero", "random", "urandom"):
        open(f"{root}/dev/{dev}", "w").close()
        mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, _MS_BIND)
    os.makedirs(root + "/proc", mode=0o555)
    mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.makedirs(root + "/tmp")
    os.chmod(root + "/tmp", 0o1777)
    os.makedirs(root + WORKDIR, mode=0o700)
    os.chown(root + WORKDIR, SANDBOX_UID, SANDBOX_GID)
    for path in cfg["binds"]:
        dst = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
            os.symlink(os.readlink(path), dst)
            continue
        os.makedirs(dst, mode=0o755, exist_ok=True)
        mount(path, dst, None, _MS_BIND | _MS_REC)
        mount(None, dst, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chroot(root)
    os.chdir(WORKDIR)

    mib = 1 << 20
    for res, soft, hard in (
            # soft == hard: the kernel sends SIGKILL at the limit (PID 1 ignores SIGXCPU).
            (resource.RLIMIT_CPU, lim["cpu_time_s"], lim["cpu_time_s"]),
            (resource.RLIMIT_AS, lim["memory_mb"] * mib, lim["memory_mb"] * mib),
            (resource.RLIMIT_NPROC, lim["max_processes"], lim["max_processes"]),
            (resource.RLIMIT_FSIZE, lim["max_file_mb"] * mib, lim["max_file_mb"] * mib),
            (resource.RLIMIT_NOFILE, lim["max_open_files"], lim["max_open_files"]),
            (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(res, (soft, hard))
    os.setgroups([])
    os.setgid(SANDBOX_GID)
    os.setuid(SANDBOX_UID)
    if os.getuid() != SANDBOX_UID or os.geteuid() != SANDBOX_UID:
        raise OSError("could not drop privileges")
    check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    # Changing credentials cleared the parent-death signal; set it again for the new uid.
    check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-X", "utf8", "-c", _PRELUDE,
                              *cfg["python_path"]], _CHILD_ENV)


if __name__ == "__main__" and sys.argv[1:2] == ["--launch"]:
    _launch(json.loads(sys.argv[2]))
