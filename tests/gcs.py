"""A GCS API on loopback for tests: gcp-storage-emulator (PyPI) in a process of its own, reached by the real
google-cloud-storage client (and so Beam's gcsio) through STORAGE_EMULATOR_HOST, behind a proxy that counts the
bytes the server sends: what an object store would bill as served, measured on the wire, not by the project."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

BUCKET = "imagenet"
# Application Default Credentials that need no network: a user credential whose token never expires (the emulator
# accepts any). Without credentials Beam backs off ~25 s in every process before it connects anonymously.
CREDENTIALS = {
    "type": "authorized_user",
    "client_id": "emulator",
    "client_secret": "emulator",
    "refresh_token": "emulator",
    "token": "emulator",
    "expiry": "2999-01-01T00:00:00Z",
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingProxy:
    """Forwards loopback connections to `port`, counting the bytes that come back from it."""

    def __init__(self, port):
        self.target, self.served, self._lock = port, 0, threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source, destination, count):
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 20):
                destination.sendall(data)
                if count:
                    with self._lock:
                        self.served += len(data)
        for s in (source, destination):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def reset(self):
        with self._lock:
            self.served = 0

    def close(self):
        self.listener.close()


@contextlib.contextmanager
def emulator(tmp_path):
    """(the proxy, the environment a process needs to reach the emulator): set it, or pass it to subprocesses."""
    executable = shutil.which("gcp-storage-emulator", path=os.path.dirname(sys.executable))
    if executable is None:
        pytest.skip("gcp-storage-emulator is not installed (pip install -e '.[test]')")
    port = _free_port()
    command = [executable, "start", f"--port={port}", "--host=127.0.0.1", "--in-memory", f"--default-bucket={BUCKET}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        _wait_for(port, process)
        proxy = CountingProxy(port)
        credentials = tmp_path / "adc.json"
        credentials.write_text(json.dumps(CREDENTIALS))
        env = {
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{proxy.port}",
            "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
            "GOOGLE_CLOUD_PROJECT": "emulator",
        }
        yield proxy, env
        proxy.close()
    finally:
        process.kill()
        process.wait()


def _wait_for(port, process, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"gcp-storage-emulator did not listen on port {port} within {seconds} s")


def upload_tree(local_dir, url):
    """Every file under local_dir to url (gs://BUCKET/...), through Beam's file systems; returns the bytes sent."""
    from apache_beam.io.filesystems import FileSystems

    total = 0
    for folder, _, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as src, FileSystems.create(f"{url}/{os.path.relpath(path, local_dir)}") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
            total += os.path.getsize(path)
    return total


def read(url):
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(url) as f:
        return f.read()
