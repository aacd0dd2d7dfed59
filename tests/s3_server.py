"""A moto S3 server on 127.0.0.1 for the tests: its own process, waited for with a timeout, stopped by PID."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ldm_train.runtime.distributed import free_ports

AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_server(log_path: Path, start_timeout: float = 30.0) -> Iterator[dict[str, str]]:
    """Run ``moto_server`` on a free loopback port; yields the AWS env (endpoint + dummy credentials) for it.

    Skips the test when moto's server is not installed."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        pytest.skip("moto_server not installed: pip install 'moto[server]'")
    port = free_ports()[0]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto_server did not start on port {port}: "
                                           f"{Path(log_path).read_text()[-2000:]}") from None
                    time.sleep(0.2)
            yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **AWS_TEST_ENV}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
