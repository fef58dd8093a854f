"""Two machines on one: Linux network namespaces joined by a veth pair, each with its own address, loopback and
ports (as root; the test skips, saying why, where they cannot be made). Processes started in a namespace see only
its network: `localhost` there is that host alone, and the other is reached at its address. The file system is
shared, as a disk every machine mounts (or a bucket) would be."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.helpers import ROOT


class Host:
    def __init__(self, namespace, address):
        self.namespace, self.address = namespace, address

    def start(self, *args, env=None):
        """`python ARGS...` started on this host, from the project root; its output goes to a temporary file
        (read with helpers.output)."""
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (read by helpers.output, after the process ends)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
        command = ["ip", "netns", "exec", self.namespace, sys.executable, *args]  # ip execs: the pid is python's.
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        process.log = log
        return process

    def __repr__(self):
        return f"Host({self.namespace}, {self.address})"


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def skip_unless_possible():
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need Linux, root and iproute2's `ip`")


def namespaces():
    return re.findall(r"^(\S+)", _ip("netns", "list").stdout, re.MULTILINE)


def remove_left_behind():
    """Namespaces of test runs that ended without their cleanup (kill -9): ax<PID>a and ax<PID>b, PID gone."""
    for name in namespaces():
        pid = re.fullmatch(r"ax(\d+)[ab]", name)
        if pid and not os.path.exists(f"/proc/{pid[1]}"):
            _ip("netns", "delete", name)


def _ended_by_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # Unwinds through the cleanup below, which SIGTERM's default would skip.


@contextlib.contextmanager
def two_hosts():
    """(host a at 10.231.0.1, host b at 10.231.0.2), removed at the end, even when a timeout's SIGTERM ends the
    tests; what a kill -9 left is removed by the next run."""
    skip_unless_possible()
    remove_left_behind()
    tag = f"ax{os.getpid()}"
    names, links = (f"{tag}a", f"{tag}b"), (f"{tag}va", f"{tag}vb")
    made = _ip("netns", "add", names[0])
    if made.returncode:
        pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
    previous = signal.signal(signal.SIGTERM, _ended_by_sigterm)
    try:
        steps = [
            ("netns", "add", names[1]),
            ("link", "add", links[0], "type", "veth", "peer", "name", links[1]),
        ]
        for i, (name, link) in enumerate(zip(names, links, strict=True)):
            steps += [
                ("link", "set", link, "netns", name),
                ("-n", name, "addr", "add", f"10.231.0.{i + 1}/24", "dev", link),
                ("-n", name, "link", "set", link, "up"),
                ("-n", name, "link", "set", "lo", "up"),
            ]
        for step in steps:
            done = _ip(*step)
            if done.returncode:
                pytest.skip(f"cannot join two network namespaces here (ip {' '.join(step)}): {done.stderr.strip()}")
        yield Host(names[0], "10.231.0.1"), Host(names[1], "10.231.0.2")
    finally:
        for name in names:
            _ip("netns", "delete", name)  # Deletes the veth pair with it.
        signal.signal(signal.SIGTERM, previous)


def printed(process):
    """What a started process has printed so far (read without moving the offset it writes at)."""
    return os.pread(process.log.fileno(), 1 << 24, 0).decode(errors="replace")


def wait_for(process, pattern, timeout):
    """Waits until the process prints something matching `pattern` (a regular expression); returns the match.
    Fails, with what it printed, when it ends or the time is up first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, printed(process))
        if found:
            return found
        if process.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"never printed {pattern!r} (exit status {process.poll()}):\n{printed(process)[-3000:]}")
