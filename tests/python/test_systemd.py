"""The systemd integration of issue 6: the unit file verifies, and the
gateway's sd_notify readiness works against a NOTIFY_SOCKET of the test's."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.skipif(os.geteuid() != 0 and not Path("/usr/local/bin/edgegate").exists(),
                    reason="needs root to link the binary for verify")
def test_unit_file_verifies():
    p = subprocess.run([str(REPO / "scripts" / "verify-systemd.sh")], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr.strip() == "", f"systemd-analyze warnings:\n{p.stderr}"


def test_sd_notify_ready_and_stopping(gateway, tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    try:
        gw = gateway(NOTIFY_SOCKET=str(path))
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg.split("\n"), msg
        gw.expect_exit()
        gw.sigterm()
        msg = sock.recv(4096).decode()
        assert "STOPPING=1" in msg.split("\n"), msg
        assert gw.wait_exit(15) == 0
    finally:
        sock.close()
