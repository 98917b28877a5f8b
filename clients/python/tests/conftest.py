"""Fixtures: kvrecalld started on 127.0.0.1 port 0 from the build tree.

KVRECALL_BUILD_DIR names the build directory (deploy/test-python.sh sets it;
default <repo>/build). Each daemon gets a fresh data directory and is stopped
with SIGTERM at the end.
"""

import os
import pathlib
import signal
import subprocess
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
BUILD = pathlib.Path(os.environ.get("KVRECALL_BUILD_DIR", REPO / "build"))
KVRECALLD = BUILD / "bin" / "kvrecalld"

TENANTS = {
    "alpha": "token-alpha-0123456789abcdef",
    "beta": "token-beta-0123456789abcdef0",
}


class Daemon:
    def __init__(self, extra_args=()):
        if not KVRECALLD.exists():
            raise RuntimeError(f"{KVRECALLD} is missing: build the kvrecalld target first")
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="kvrecall-pytest-"))
        port_file = self.dir / "port"
        self.log = open(self.dir / "kvrecalld.log", "wb")
        self.proc = subprocess.Popen(
            [str(KVRECALLD), "--listen=127.0.0.1:0", f"--port_file={port_file}",
             f"--data_dir={self.dir / 'data'}", "--memory_capacity_bytes=256MiB",
             "--disk_capacity_bytes=1GiB", "--rocksdb_capacity_bytes=1GiB", *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvrecalld exited with {self.proc.returncode}: "
                                   f"{(self.dir / 'kvrecalld.log').read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("kvrecalld did not write its port file within 60 s")
            time.sleep(0.01)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def daemon():
    d = Daemon()
    yield d
    assert d.stop() == 0, "kvrecalld should exit cleanly on SIGTERM"


@pytest.fixture(scope="session")
def auth_daemon():
    tenants = pathlib.Path(tempfile.mkdtemp(prefix="kvrecall-tenants-")) / "tenants"
    tenants.write_text("".join(f"{t} {tok}\n" for t, tok in TENANTS.items()))
    d = Daemon([f"--tenants_file={tenants}"])
    yield d
    assert d.stop() == 0
