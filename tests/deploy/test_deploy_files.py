"""The deployment files and the README's federation guide use commands that exist.

Docker and Kubernetes are not available here; these tests parse every ``radfl`` command the
Compose file, the Kubernetes manifest, the systemd unit and the README's "Run a real
federation" section give, with RadFL's own argument parser, and check that the guide's commands
are the ones the real-process test runs.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from common.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: The commands tests/deploy/test_real_federation.py runs.
EXERCISED = {
    ("coordinator", "init"),
    ("coordinator", "add-site"),
    ("coordinator", "add-operator"),
    ("coordinator", "start"),
    ("coordinator", "run"),
    ("site", "keygen"),
    ("site", "start"),
}


def _parses(argv: list[str]) -> None:
    assert argv[0] == "radfl", argv
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"radfl refuses {shlex.join(argv)} (exit {exc.code})")


def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run a real federation", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip():
                commands.append(shlex.split(command))
    return commands


def test_readme_federation_guide_commands_parse_and_are_the_tested_ones():
    commands = _readme_commands()
    for argv in commands:
        _parses(argv)
    assert {(argv[1], argv[2]) for argv in commands} == EXERCISED
    test = (ROOT / "tests/deploy/test_real_federation.py").read_text()
    for group, command in EXERCISED:
        assert re.search(rf'"{group}",\s*"{command}"', test), (group, command)


def test_compose_file_commands_parse():
    compose = yaml.safe_load((DEPLOY / "docker/docker-compose.yml").read_text())
    services = compose["services"]
    assert {"coordinator", "site-0", "site-1", "site-2"} <= set(services)
    _parses(["radfl", "coordinator", *services["coordinator"]["command"]])
    for name in ("site-0", "site-1", "site-2"):
        argv = ["radfl", "site", *services[name]["command"]]
        _parses(argv)
        assert "--insecure" not in argv
        assert "ports" not in services[name]  # a site opens no port
    setup = services["setup"]["command"][0]
    for part in re.findall(r"radfl [^;|]+", setup.replace("$$s", "site-0")):
        _parses(shlex.split(part))
    # The sites' listener on every interface; the operators' MLflow route on the host's
    # loopback only. Nothing else is published.
    assert services["coordinator"]["ports"] == ["8000:8000", "127.0.0.1:5000:5000"]
    assert all(
        "ports" not in service for name, service in services.items() if name != "coordinator"
    )
    assert "--mlflow-bind 0.0.0.0" in setup and "add-operator admin" in setup
    for name, service in services.items():
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert not service["image"].endswith(":latest") and ":" in service["image"], name


def test_kubernetes_manifest_commands_parse():
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes/coordinator.yaml").read_text()))
    kinds = {doc["kind"] for doc in documents}
    assert {"Namespace", "StatefulSet", "Service", "NetworkPolicy"} <= kinds
    stateful = next(doc for doc in documents if doc["kind"] == "StatefulSet")
    pod = stateful["spec"]["template"]["spec"]
    _parses(["radfl", "coordinator", *pod["containers"][0]["args"]])
    # The CA is made offline: nothing in the cluster runs `init`, and the pod refuses to start
    # while ca.key sits on the services' volume.
    init = pod["initContainers"][0]["args"][0]
    assert "coordinator init" not in init and "test -e /federation/ca.key" in init
    header = (DEPLOY / "kubernetes/coordinator.yaml").read_text().split("apiVersion", 1)[0]
    offline = re.findall(r"radfl coordinator (?:init|add-operator) [^#\n]+", header)
    assert len(offline) == 2, offline
    for part in offline:
        _parses(shlex.split(part.replace("\\", "")))
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["initContainers"] + pod["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        assert re.fullmatch(r"radfl-coordinator:\d+\.\d+\.\d+", container["image"])
    policy = next(doc for doc in documents if doc["kind"] == "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    mlflow_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 5000)
    assert mlflow_rule["from"]  # only operators' pods, never everyone
    exposed = [doc for doc in documents if doc["kind"] == "Service"]
    assert {p["port"] for doc in exposed for p in doc["spec"]["ports"]} == {8000, 5000}
    assert (
        next(d for d in exposed if d["metadata"]["name"] == "radfl-mlflow")["spec"]["type"]
        == "ClusterIP"
    )  # MLflow stays inside the cluster


def test_systemd_unit_starts_the_site_daemon():
    unit = (DEPLOY / "systemd/radfl-site.service").read_text()
    values = dict(
        line.split("=", 1)
        for line in (DEPLOY / "systemd/radfl-site.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    exec_start = re.search(r"^ExecStart=(.*)$", unit, flags=re.M).group(1)
    for key, value in values.items():
        exec_start = exec_start.replace(f"${{{key}}}", value)
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/radfl")
    _parses(["radfl", *argv[1:]])


def test_dockerfiles_pin_the_cpu_torch_and_copy_every_package():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    for name in ("Dockerfile.coordinator", "Dockerfile.site"):
        text = (DEPLOY / "docker" / name).read_text()
        assert "torch==2.13.0" in text
        assert re.search(r"^FROM python:\d+\.\d+\.\d+-slim-\w+$", text, re.M), name
        assert re.search(r"^USER 10001:10001$", text, re.M), name  # never root
        for package in {p.split(".")[0] for p in packages}:  # a COPY of simulations holds .bench
            assert f"COPY {package} {package}" in text, (name, package)
    assert not re.search(r"^EXPOSE", (DEPLOY / "docker/Dockerfile.site").read_text(), re.M)
    assert "nginx-light" in (DEPLOY / "docker/Dockerfile.coordinator").read_text()
