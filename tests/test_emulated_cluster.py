"""launch/emulate_cluster.sh end to end, with real namespaces, veths, a bridge and tbf:

- 2 nodes x 2 ranks and 3 nodes x 1 rank run tests/helpers/emulated_probe.py: torchrun's
  GROUP_RANK / LOCAL_RANK / LOCAL_WORLD_SIZE / WORLD_SIZE fit the layout, a gloo
  all_reduce and all_gather across the bridge, one node per namespace (rank 0 checks the
  node map); a node's own address routes over lo, another node's over eth0;
- the shaping (--inspect dumps `tc -s qdisc` of every namespace before and after the
  command): a tbf at the rate on both ends of every link, and the traffic went through it;
- cleanup: no namespace of a run is left and no process of it survives, after success,
  after a worker that exits 1 (the run fails), after SIGINT mid-run (and a run right after
  works), and after the helper's time limit;
- errors: not root, a missing or bad option: exit 2, one line on stderr, nothing created.

Nothing here is timed (no throughput asserted): the shaping is checked by configuration.
Each launch costs a torchrun start-up (5-10 s); the checks share launches.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from emulator import SCRIPT, emulate, emulator_available, namespaces, scrub_since, start

REASON = emulator_available()
if REASON is not None:
    pytest.skip(f"emulated cluster unavailable: {REASON}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _no_namespace_outlives_a_test():
    """Whatever a test's runs leave (a failing test, a mutant of the cleanup) goes after it."""
    before = set(namespaces())
    yield
    scrub_since(before)

PROBE = Path(__file__).resolve().parent / "helpers" / "emulated_probe.py"
TIMEOUT_S = 180  # per launch; a healthy one takes 5-20 s
CLEANUP_S = 30  # SIGINT to exit, namespaces gone
TC_LINE = re.compile(r"^# ns (\S+) (eth0|v\d+): qdisc tbf \S+ root .*\brate (\S+) ", re.M)
SENT = re.compile(r"^# ns (\S+) (eth0|v\d+):\s+Sent (\d+) bytes", re.M)


def _probe(out: Path, nnodes: int, nproc: int, *extra) -> list[str]:
    # (not --nnodes / --nproc: torchrun's parser sees those even after the script)
    return [str(PROBE), "--out", str(out), "--layout", f"{nnodes}x{nproc}", *map(str, extra)]


def _left(prefix: str) -> list[str]:
    return [ns for ns in namespaces() if ns.startswith(prefix + "-")]


def _alive(out: Path) -> list[int]:
    """The probe processes of a run (pids from OUT/rank_*.pid) that still exist."""
    alive = []
    for f in out.glob("rank_*.pid"):
        try:
            cmd = Path(f"/proc/{int(f.read_text())}/cmdline").read_bytes()
        except OSError:
            continue
        if b"emulated_probe" in cmd:
            alive.append(int(f.read_text()))
    return alive


def _log(cp) -> str:
    return f"exit {cp.returncode}\n--- stdout\n{cp.stdout[-6000:]}\n--- stderr\n{cp.stderr[-6000:]}"


def _sections(stdout: str) -> tuple[str, str]:
    """The --inspect dumps: (before the run, after the run)."""
    before = stdout.split("# inspect (before the run)", 1)[1].split("# inspect (after the run)", 1)
    return before[0], before[1]


def _check_layout(cp, out: Path, nnodes: int, nproc: int, rate_shown: str, mtu: int) -> None:
    assert cp.returncode == 0, _log(cp)
    prefix = cp.prefix
    layout = [line for line in cp.stdout.splitlines() if line.startswith("# emulated cluster:")]
    assert len(layout) == 1 and f"{nnodes} node(s) x {nproc} rank(s)" in layout[0], layout
    assert f"namespaces {prefix}-n0..n{nnodes - 1}" in layout[0], layout

    result = json.loads((out / "result.json").read_text())
    assert result["errors"] == [] and result["world_size"] == nnodes * nproc, result
    assert result["all_reduce"] == nnodes * nproc * (nnodes * nproc + 1) / 2
    assert sorted(result["node_of_group"].values()) == list(range(nnodes))  # one namespace per node rank
    by_group: dict[int, list] = {}
    for group, local, node, rank, octet in result["gathered"]:
        by_group.setdefault(group, []).append((local, node, octet))
        assert octet == node + 1  # the rank sits in the namespace whose address it uses
    assert sorted(by_group) == list(range(nnodes))
    for group, members in by_group.items():
        assert sorted(m[0] for m in members) == list(range(nproc)), members  # P ranks per node
        assert len({m[1] for m in members}) == 1, members  # all in one namespace
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(nnodes * nproc)]
    assert all(r["errors"] == [] for r in ranks), ranks
    heads = [r for r in ranks if r["env"]["LOCAL_RANK"] == "0"]
    assert len(heads) == nnodes
    for r in heads:
        assert r["env"]["GLOO_SOCKET_IFNAME"] == "eth0"
        assert re.search(r"^local \S+ dev lo\b", r["route_self"]), r["route_self"]  # intra-node: loopback
        if nnodes > 1:
            assert " dev eth0 " in r["route_other"], r["route_other"]  # inter-node: the shaped link

    before, after = _sections(cp.stdout)
    shaped = {(ns, dev): rate for ns, dev, rate in TC_LINE.findall(before)}
    nodes = [f"{prefix}-n{i}" for i in range(nnodes)]
    want = {**{(ns, "eth0"): rate_shown for ns in nodes}, **{(f"{prefix}-sw", f"v{i}"): rate_shown
                                                             for i in range(nnodes)}}
    assert shaped == want, before  # both ends of every link, nothing else
    for i, ns in enumerate(nodes):
        assert re.search(rf"^# ns {ns}: eth0 10\.77\.0\.{i + 1}/24 mtu {mtu}$", before, re.M), before
    if nnodes > 1:  # the collectives' bytes crossed every link's shaper, both ways
        sent = {(ns, dev): int(n) for ns, dev, n in SENT.findall(after)}
        assert set(sent) == set(want) and all(n > 0 for n in sent.values()), after
    assert not _left(prefix) and not _alive(out)


def test_two_nodes_of_two_ranks(tmp_path):
    out = tmp_path / "probe"
    cp = emulate(2, 2, "2gbit", _probe(out, 2, 2), options=["--inspect"], timeout=TIMEOUT_S)
    _check_layout(cp, out, 2, 2, "2Gbit", 1500)
    assert "[node0] probe rank 0: ok" in cp.stdout and "[node1]" in cp.stdout  # per-node prefixes
    print(f"\n2 x 2: {cp.seconds:.1f} s")


def test_three_nodes_of_one_rank_jumbo_frames(tmp_path):
    out = tmp_path / "probe"
    cp = emulate(3, 1, "500mbit", _probe(out, 3, 1), options=["--inspect", "--mtu", "9000"], timeout=TIMEOUT_S)
    _check_layout(cp, out, 3, 1, "500Mbit", 9000)
    print(f"\n3 x 1: {cp.seconds:.1f} s")


def test_a_failing_worker_fails_the_run_and_cleans_up(tmp_path):
    out = tmp_path / "probe"
    cp = emulate(2, 1, "1gbit", _probe(out, 2, 1, "--fail-rank", 1), timeout=TIMEOUT_S)
    assert cp.returncode == 1, _log(cp)  # the failed agent's status
    assert "probe rank 1: exiting 1 as told" in cp.stdout
    assert re.search(r"node\d's agent exited with status 1", cp.stderr), _log(cp)
    assert len(list(out.glob("rank_*.pid"))) == 2  # both ranks had started
    assert not _left(cp.prefix) and not _alive(out)
    print(f"\nfailing worker: exit after {cp.seconds:.1f} s")


def test_sigint_mid_run_cleans_up_and_the_next_run_works(tmp_path):
    out = tmp_path / "held"
    run = start(2, 2, "1gbit", _probe(out, 2, 2, "--hold", 600))
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "running").exists():
            assert run.proc.poll() is None, f"ended before running: {run.stdout}{run.stderr}"
            assert time.monotonic() < deadline, "probe never reported running"
            time.sleep(0.2)
        prefix = run.prefix
        assert len(_left(prefix)) == 3 and len(_alive(out)) == 4  # 2 nodes + the switch, 4 ranks
        t0 = time.monotonic()
        run.signal(signal.SIGINT)  # as Ctrl-C: the script's whole process group
        rc = run.proc.wait(CLEANUP_S)
        took = time.monotonic() - t0
    finally:
        run.stop()
    cp = run.result()
    assert rc == 130, _log(cp)
    assert "interrupted" in cp.stderr
    assert not _left(prefix) and not _alive(out)
    print(f"\nSIGINT: exit and cleanup in {took:.1f} s")
    again = tmp_path / "again"
    cp = emulate(2, 1, "1gbit", _probe(again, 2, 1), timeout=TIMEOUT_S)
    assert cp.returncode == 0 and json.loads((again / "result.json").read_text())["errors"] == [], _log(cp)
    assert not _left(cp.prefix)


def test_time_limit_of_the_helper_stops_and_cleans_up(tmp_path):
    out = tmp_path / "held"
    with pytest.raises(subprocess.TimeoutExpired) as exc:
        emulate(1, 2, "1gbit", _probe(out, 1, 2, "--hold", 600), timeout=12)
    prefix = re.search(r"namespaces (\S+)-n0\.\.", exc.value.output or "")
    assert prefix, exc.value.output
    assert not _left(prefix.group(1)) and not _alive(out)


def _as_nobody(argv: list[str]) -> subprocess.CompletedProcess | None:
    """Runs argv as the unprivileged user nobody (setpriv, else su); None if neither works."""
    if shutil.which("setpriv"):
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
                           capture_output=True, text=True, timeout=60, cwd="/", env={**os.environ, "HOME": "/tmp"})
        if "setpriv:" not in r.stderr:
            return r
    if shutil.which("su"):
        r = subprocess.run(["su", "nobody", "-s", "/bin/bash", "-c", shlex.join(argv)], capture_output=True,
                           text=True, timeout=60, cwd="/")
        if not r.stderr.startswith("su:"):
            return r
    return None


def test_not_root_exits_2_with_one_line():
    r = _as_nobody(["bash", str(SCRIPT), "--nnodes", "2", "--nproc-per-node", "1", "--link-rate", "1gbit", "--",
                    str(PROBE)])
    if r is None:
        pytest.skip("no way to run a command as an unprivileged user here (setpriv, su)")
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "needs root" in r.stderr, r.stderr


@pytest.mark.parametrize("args, option", [
    (["--nproc-per-node", "2", "--link-rate", "1gbit"], "--nnodes"),
    (["--nnodes", "0", "--nproc-per-node", "2", "--link-rate", "1gbit"], "--nnodes"),
    (["--nnodes", "2", "--nproc-per-node", "0", "--link-rate", "1gbit"], "--nproc-per-node"),
    (["--nnodes", "2", "--nproc-per-node", "2", "--link-rate", "fastbit"], "--link-rate"),
    (["--nnodes", "2", "--nproc-per-node", "2", "--link-rate", "1gbitt"], "--link-rate"),
    (["--nnodes", "2", "--nproc-per-node", "2"], "--link-rate"),
    (["--nnodes", "2", "--nproc-per-node", "2", "--link-rate", "1gbit", "--mtu", "big"], "--mtu"),
    (["--nnodes", "2", "--nproc-per-node", "2", "--link-rate", "1gbit", "--nnodes"], "--nnodes"),
], ids=["no-nnodes", "nnodes-0", "nproc-0", "rate-word", "rate-suffix", "no-rate", "mtu", "no-value"])
def test_bad_options_exit_2_naming_the_option(args, option):
    before = set(namespaces())
    p = subprocess.Popen(["bash", str(SCRIPT), *args, "--", str(PROBE)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 2 and stdout == "", (p.returncode, stdout, stderr)
    assert stderr.count("\n") == 1 and stderr.startswith("emulate_cluster.sh: ") and option in stderr, stderr
    assert not [ns for ns in set(namespaces()) - before if ns.startswith(f"rt{p.pid}")]
