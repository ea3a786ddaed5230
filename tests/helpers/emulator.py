"""launch/emulate_cluster.sh from tests: is it usable here, and run it with a time limit.

    from emulator import emulator_available, emulate
    reason = emulator_available()           # None, or why not (not root, no ip/tc, ...)
    cp = emulate(2, 2, "2gbit", ["-m", "parallel.bench", "ops=[all_reduce]"], timeout=300)
    assert cp.returncode == 0, cp.stdout + cp.stderr

`emulate` returns a subprocess.CompletedProcess (text stdout and stderr, `prefix` added:
the run's namespace prefix). On a timeout it stops the run (SIGTERM to the script, whose
own cleanup stops every process in its namespaces and deletes them; SIGKILL and a cleanup
from here if that does not finish) and then raises subprocess.TimeoutExpired. `start`
gives the running script (EmulatedRun) for tests that signal it themselves.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "emulate_cluster.sh"
STOP_GRACE_S = 30  # SIGTERM -> SIGKILL for a run that outlived its time limit
_SBIN = ("/usr/sbin", "/sbin")
_LAYOUT = re.compile(r"namespaces (\S+)-n0\.\.")


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path=os.pathsep.join(_SBIN))


@functools.cache
def emulator_available() -> str | None:
    """None when the emulator can run here, else the reason it cannot."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "setsid", "bash"):
        if _which(tool) is None:
            return f"no '{tool}' on PATH"
    probe = f"rtcheck{os.getpid()}"
    try:
        add = subprocess.run([_which("ip"), "netns", "add", probe], capture_output=True, text=True, timeout=30)
        if add.returncode != 0:
            return f"cannot create a network namespace: {add.stderr.strip()}"
        tbf = subprocess.run([_which("tc"), "-n", probe, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit",
                              "burst", "131072", "limit", "262144"], capture_output=True, text=True, timeout=30)
        if tbf.returncode != 0:
            return f"tc cannot add a tbf qdisc: {tbf.stderr.strip()}"
    finally:
        subprocess.run([_which("ip"), "netns", "del", probe], capture_output=True, timeout=30)
    return None


def namespaces() -> list[str]:
    """The names `ip netns list` shows."""
    out = subprocess.run([_which("ip") or "ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def scrub(prefix: str) -> list[str]:
    """Kills every process in the namespaces named `prefix-*` and deletes them; returns
    the names it found (a clean run leaves none)."""
    found = [ns for ns in namespaces() if ns.startswith(prefix + "-")]
    for ns in found:
        pids = subprocess.run([_which("ip") or "ip", "netns", "pids", ns], capture_output=True, text=True,
                              timeout=30).stdout
        for pid in pids.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for ns in found:
        subprocess.run([_which("ip") or "ip", "netns", "del", ns], capture_output=True, timeout=30)
    return found


def _default_interrupt():
    # A shell started in the background by a non-interactive one inherits SIGINT ignored, and bash
    # cannot trap a signal ignored at its start: the script would never see the Ctrl-C a test sends.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


class EmulatedRun:
    """The script running in a session (and process group) of its own; output in files."""

    def __init__(self, nnodes: int, nproc: int, rate: str, args: list[str], *, options: list[str] = (),
                 env: dict | None = None, cwd: str | os.PathLike | None = None):
        self.argv = ["bash", str(SCRIPT), "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
                     "--link-rate", str(rate), *map(str, options), "--", *map(str, args)]
        env = dict(os.environ if env is None else env)
        env.setdefault("PYTHON", sys.executable)
        self._dir = tempfile.TemporaryDirectory(prefix="emulate_")
        self._out = open(Path(self._dir.name) / "stdout", "w+")
        self._err = open(Path(self._dir.name) / "stderr", "w+")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, cwd=cwd or ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err, start_new_session=True,
                                     preexec_fn=_default_interrupt)

    @property
    def stdout(self) -> str:
        return Path(self._out.name).read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return Path(self._err.name).read_text(errors="replace")

    @property
    def prefix(self) -> str:
        """The run's namespace prefix: from the layout line, else rt<pid> (the default)."""
        m = _LAYOUT.search(self.stdout)
        return m.group(1) if m else f"rt{self.proc.pid}"

    def signal(self, sig: int) -> None:
        """`sig` to the script's process group (what Ctrl-C in a terminal does)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_GRACE_S, then whatever is left of its namespaces."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(30)
        scrub(self.prefix)

    def result(self) -> subprocess.CompletedProcess:
        cp = subprocess.CompletedProcess(self.argv, self.proc.returncode, self.stdout, self.stderr)
        cp.prefix = self.prefix
        cp.seconds = time.monotonic() - self.t0
        self._out.close()
        self._err.close()
        self._dir.cleanup()
        return cp

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """The finished run; on a timeout stops it (see stop) and raises TimeoutExpired."""
        try:
            self.proc.wait(max(0.0, timeout - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self.stop()
            cp = self.result()
            raise subprocess.TimeoutExpired(self.argv, timeout, output=cp.stdout, stderr=cp.stderr) from None
        except BaseException:  # KeyboardInterrupt in the test run, say: nothing left behind
            self.stop()
            raise
        return self.result()


def start(nnodes: int, nproc: int, rate: str, args: list[str], **kwargs) -> EmulatedRun:
    return EmulatedRun(nnodes, nproc, rate, args, **kwargs)


def emulate(nnodes: int, nproc: int, rate: str, args: list[str], *, timeout: float, env: dict | None = None,
            cwd: str | os.PathLike | None = None, options: list[str] = ()) -> subprocess.CompletedProcess:
    """Runs launch/emulate_cluster.sh (nnodes x nproc ranks, links at `rate`, `args` after
    `--`; `options` before it, e.g. ["--inspect"]) and returns its CompletedProcess."""
    return EmulatedRun(nnodes, nproc, rate, args, options=options, env=env, cwd=cwd).wait(timeout)


def scrub_since(before: set[str]) -> list[str]:
    """Removes the run namespaces (rt<pid>-*) that appeared since `before` was taken, with
    their processes: a test that failed because a run left them must not leave them too."""
    prefixes = {ns.rsplit("-", 1)[0] for ns in namespaces() if ns not in before and re.match(r"rt\d+-", ns)}
    return [ns for prefix in sorted(prefixes) for ns in scrub(prefix)]
