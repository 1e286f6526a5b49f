"""nginx in front of the SuperLink and MLflow: the generated configuration, and the operators'
passwords. tests/deploy/test_real_federation.py sends real requests through it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from common.errors import RadFLError
from server import coordinator, proxy


def _nginx() -> str:
    try:
        return proxy.nginx_binary()
    except RadFLError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install nginx (.ci/run): {exc}")
        pytest.skip(str(exc))


def test_nginx_accepts_the_configuration_and_passes_only_the_fleet_api_and_health(
    tmp_path: Path,
):
    nginx = _nginx()
    federation = coordinator.init(
        tmp_path / "fed", ["fl.example.org"], port=18000, mlflow_port=15000
    )
    prefix = federation.nginx_prefix
    config = proxy.write_nginx_config(federation.routes(), prefix)
    checked = subprocess.run(
        [nginx, "-t", "-c", str(config), "-p", f"{prefix}/", "-e", str(prefix / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    assert "syntax is ok" in checked.stderr
    text = config.read_text()
    sites, operators = text.split("    server {")[1:]
    # Sites: what passes to the SuperLink is /v1/fleet/ and /health, on loopback; the rest is
    # refused with RadFL's message.
    passed = re.findall(r"location ([^{]+) \{\s+proxy_pass ([^;]+);", sites)
    assert passed == [
        ("/v1/fleet/", f"https://127.0.0.1:{federation.superlink_local_port}/v1/fleet/"),
        ("= /health", f"https://127.0.0.1:{federation.superlink_local_port}/health"),
    ]
    assert re.findall(r"location ([^{]+) \{", sites) == ["/v1/fleet/", "= /health", "/"]
    assert "listen 18000 ssl;" in sites and "proxy_ssl_verify on;" in sites
    assert proxy.REFUSAL in sites and "return 403" in sites
    # Operators: MLflow behind a password, its own port on loopback.
    assert "listen 127.0.0.1:15000 ssl;" in operators
    assert f"auth_basic_user_file {federation.operators_file};" in operators
    assert f"proxy_pass http://127.0.0.1:{federation.mlflow_local_port};" in operators


def test_operators_get_a_random_password_once_and_can_be_removed(tmp_path: Path):
    path = tmp_path / "operators.htpasswd"
    password = proxy.add_operator(path, "alice")
    assert len(password) >= 40
    stored = proxy.read_operators(path)
    assert set(stored) == {"alice"} and password not in path.read_text()
    assert proxy.check_ssha(password, stored["alice"])
    assert not proxy.check_ssha(password + "x", stored["alice"])
    assert path.stat().st_mode & 0o777 == 0o600
    second = proxy.add_operator(path, "bob")
    assert second != password
    with pytest.raises(RadFLError, match="operator alice already exists"):
        proxy.add_operator(path, "alice")
    with pytest.raises(RadFLError, match="operator name 'Eve Smith'"):
        proxy.add_operator(path, "Eve Smith")
    with pytest.raises(RadFLError, match="operator name 'x:y'"):
        proxy.add_operator(path, "x:y")  # ':' would forge an htpasswd field
    proxy.remove_operator(path, "alice")
    assert set(proxy.read_operators(path)) == {"bob"}
    with pytest.raises(RadFLError, match="operator alice is not in"):
        proxy.remove_operator(path, "alice")
