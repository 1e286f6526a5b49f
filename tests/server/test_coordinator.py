"""The federation folder: certificates that verify, keys that stay private, site registry."""

from __future__ import annotations

import json
import ssl
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from client import daemon
from common import pki, signing
from common.errors import RadFLError
from server import coordinator

ROOT = Path(__file__).resolve().parents[2]


def test_init_writes_a_ca_and_a_superlink_certificate_for_every_host(tmp_path: Path):
    federation = coordinator.init(
        tmp_path / "fed", ["fl.hospital-net.org", "10.1.2.3"], port=9000, mlflow_port=9001
    )
    ca = pki.load_certificate(federation.ca_cert)
    server = pki.load_certificate(federation.server_cert)
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    # The hosts sites dial, and loopback: the CLI, the ServerApp runner and nginx dial there.
    assert sorted(pki.certificate_hosts(server)) == [
        "10.1.2.3",
        "127.0.0.1",
        "fl.hospital-net.org",
        "localhost",
    ]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Python's TLS stack accepts the pair as a server certificate and key.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(federation.server_cert, federation.server_key)
    for secret in ("ca.key", "superlink.key", "state/app-signing.key"):
        assert (federation.root / secret).stat().st_mode & 0o777 == 0o600
    # The app-signing key pair: the private half in state/, the public half beside ca.crt.
    assert signing.key_id(signing.load_public_key(federation.signing_public_key)) == (
        signing.key_id(signing.load_private_key(federation.signing_key).public_key())
    )
    assert federation.signing_public_key.parent == federation.ca_cert.parent
    connection = tomllib.loads((federation.flwr_home / "config.toml").read_text())
    # Operators' Flower CLI dials the SuperLink itself, on loopback; sites dial nginx.
    assert connection["superlink"]["radfl"] == {
        "address": f"127.0.0.1:{coordinator.DEFAULT_SUPERLINK_LOCAL_PORT}",
        "root-certificates": str(federation.ca_cert),
    }
    assert federation.address == "fl.hospital-net.org:9000"
    assert federation.mlflow_uri == f"http://127.0.0.1:{coordinator.DEFAULT_MLFLOW_LOCAL_PORT}"
    assert federation.operators_mlflow_url == "https://127.0.0.1:9001"
    assert coordinator.Federation.load(federation.root) == federation
    for folder in (federation.root, federation.state, federation.sites_dir, federation.flwr_home):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    assert federation.operators_file.stat().st_mode & 0o777 == 0o600
    with pytest.raises(RadFLError, match="already holds a federation"):
        coordinator.init(tmp_path / "fed", ["x"])
    with pytest.raises(RadFLError, match="must differ"):
        coordinator.init(tmp_path / "other", ["x"], port=5000, mlflow_port=5000)


def test_a_federation_folder_made_before_the_proxy_loads_with_loopback_defaults(tmp_path: Path):
    federation = coordinator.init(tmp_path / "fed", ["127.0.0.1"])
    settings = federation.root / coordinator.SETTINGS
    old = [
        line
        for line in settings.read_text().splitlines()
        if not line.startswith(("mlflow-bind", "superlink-local-port", "mlflow-local-port"))
    ]
    settings.write_text("\n".join(old) + "\n")
    loaded = coordinator.Federation.load(federation.root)
    assert loaded.mlflow_bind == "127.0.0.1"
    assert loaded.superlink_local_port == coordinator.DEFAULT_SUPERLINK_LOCAL_PORT
    assert loaded.mlflow_local_port == coordinator.DEFAULT_MLFLOW_LOCAL_PORT


def test_site_keys_are_ec_openssh_and_private_keys_stay_owner_only(tmp_path: Path):
    private, public = daemon.keygen(tmp_path / "site")
    assert private.stat().st_mode & 0o777 == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pki.check_site_private_key(private)
    assert pki.read_site_public_key(public).startswith(b"ecdsa-sha2-nistp384 ")
    with pytest.raises(RadFLError, match="exists"):
        daemon.keygen(tmp_path / "site")
    private.chmod(0o644)
    with pytest.raises(RadFLError, match="readable by others"):
        pki.check_site_private_key(private)


def test_add_site_refuses_bad_names_keys_and_duplicates(tmp_path: Path):
    federation = coordinator.init(tmp_path / "fed", ["127.0.0.1"])
    _, public = daemon.keygen(tmp_path / "a")
    stored = coordinator.add_site(federation.root, "site-a", public)
    assert stored.read_bytes() == public.read_bytes()
    with pytest.raises(RadFLError, match="already registered"):
        coordinator.add_site(federation.root, "site-a", public)
    with pytest.raises(RadFLError, match="already registered as site site-a"):
        coordinator.add_site(federation.root, "site-b", public)
    with pytest.raises(RadFLError, match="site name"):
        coordinator.add_site(federation.root, "Site A", public)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa.pub").write_bytes(
        rsa_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(RadFLError, match="not an EC key"):
        coordinator.add_site(federation.root, "site-c", tmp_path / "rsa.pub")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(RadFLError, match="not an OpenSSH public key"):
        coordinator.add_site(federation.root, "site-d", tmp_path / "junk.pub")


def test_site_start_runs_the_supernode_with_tls_and_its_key_never_insecure(tmp_path: Path):
    command = daemon.supernode_command(
        superlink="fl.example.org:8000",
        data=tmp_path / "data",
        name="site-a",
        root_certificates=tmp_path / "ca.crt",
        auth_key=tmp_path / "site.key",
        port=9100,
        extra_config={"skip-bad-rows": True},
    )
    assert "--insecure" not in command
    assert command[command.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert command[command.index("--auth-supernode-private-key") + 1] == str(tmp_path / "site.key")
    node_config = command[command.index("--node-config") + 1]
    assert f'data-path="{tmp_path / "data"}"' in node_config
    assert 'site-name="site-a"' in node_config and "skip-bad-rows=true" in node_config
    assert command[command.index("--host") + 1] == "127.0.0.1"
    # Its ClientApps are started by RadFL's launcher, which checks the bundle's signature.
    assert command[command.index("--isolation") + 1] == "process"
    unsigned = daemon.supernode_command(
        superlink="fl.example.org:8000",
        data=tmp_path / "data",
        name="site-a",
        root_certificates=tmp_path / "ca.crt",
        auth_key=tmp_path / "site.key",
        port=9100,
        extra_config={},
        signed_apps_only=False,  # --allow-unsigned-apps: Flower starts its ClientApps itself
    )
    assert "--isolation" not in unsigned
    launch = daemon.launcher_command(
        local_port=9100, clientapp_command=tmp_path / "radfl-clientapp", parent_pid=42
    )
    assert launch[1:4] == ["-m", "client.launcher", "superexec"]
    assert launch[launch.index("--runtime-api-address") + 1] == "127.0.0.1:9100"


def test_a_site_without_the_coordinators_signing_key_does_not_start(tmp_path: Path, capsys):
    from common.cli import main

    private, site_public = daemon.keygen(tmp_path / "keys")
    (tmp_path / "ca.crt").write_text("unused")
    argv = [
        "site", "start", "--superlink", "127.0.0.1:1", "--data", str(tmp_path / "data"),
        "--name", "site-a", "--root-certificates", str(tmp_path / "ca.crt"),
        "--auth-key", str(private),
    ]  # fmt: skip
    assert main(argv) != 0
    assert f"--trusted-key {tmp_path / 'app-signing.pub'}: no such file" in capsys.readouterr().err
    (tmp_path / "not-ed25519.pub").write_bytes(site_public.read_bytes())
    assert main([*argv, "--trusted-key", str(tmp_path / "not-ed25519.pub")]) != 0
    assert "not-ed25519.pub is not a PEM public key" in capsys.readouterr().err
    assert not (tmp_path / "data" / ".radfl-logs" / "supernode.log").exists()


def test_rotating_the_signing_key_keeps_the_old_public_key_for_the_overlap(tmp_path: Path):
    federation = coordinator.init(tmp_path / "fed", ["127.0.0.1"])
    old = signing.key_id(signing.load_public_key(federation.signing_public_key))
    new, retired = coordinator.rotate_signing_key(federation.root)
    assert new != old and retired == federation.root / f"app-signing.{old}.pub"
    assert signing.key_id(signing.load_public_key(retired)) == old
    assert signing.key_id(signing.load_public_key(federation.signing_public_key)) == new
    assert federation.signing_key.stat().st_mode & 0o777 == 0o600


def test_a_site_that_fails_its_data_check_does_not_start(tmp_path: Path, capsys):
    from common.cli import main

    private, _ = daemon.keygen(tmp_path / "keys")
    (tmp_path / "ca.crt").write_text("unused")
    signing.make_key_pair(tmp_path / "app-signing.key", tmp_path / daemon.TRUSTED_KEY_NAME)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("image,patient_id,study_id,label\n")
    code = main(
        [
            "site", "start", "--superlink", "127.0.0.1:1", "--data", str(tmp_path / "data"),
            "--name", "site-a", "--root-certificates", str(tmp_path / "ca.crt"),
            "--auth-key", str(private),
        ]
    )  # fmt: skip
    assert code == 1
    assert "site check failed" in capsys.readouterr().out
    assert (tmp_path / "data" / ".radfl-logs" / "site.log").exists()
    assert (tmp_path / "data" / ".radfl-logs").stat().st_mode & 0o777 == 0o700


def test_run_exits_with_the_superlinks_final_status_not_flwr_runs(tmp_path: Path, monkeypatch):
    """`flwr run --stream` exits 0 even when the run failed; `radfl coordinator run` asks the
    SuperLink (`flwr ls`) and fails unless the run finished completed. A stand-in `flwr`
    plays the CLI here; the real one is exercised in tests/deploy."""
    federation = coordinator.init(tmp_path / "fed", ["127.0.0.1"])
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "flwr").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = run ]; then echo "$@" > "$FAKE_STATUS.args"; '
        'echo "Successfully started run 42"; exit 0; fi\n'
        'if [ "$1" = ls ]; then cat "$FAKE_STATUS"; exit 0; fi\n'
        "exit 3\n"
    )
    (fake / "flwr").chmod(0o755)
    environment = coordinator.Federation.env

    def env(self):
        values = environment(self)
        values["PATH"] = f"{fake}:{values['PATH']}"
        values["FAKE_STATUS"] = str(tmp_path / "status.json")
        return values

    monkeypatch.setattr(coordinator.Federation, "env", env)
    for status, expected in (("finished:failed", 1), ("finished:completed", 0)):
        (tmp_path / "status.json").write_text(
            json.dumps({"success": True, "runs": [{"run-id": 42, "status": status}]})
        )
        assert coordinator.run(federation.root, ROOT, {"num-rounds": 1}) == expected
    # The bundle flwr run submits is signed: its signature travels in the run config.
    from flwr.cli.build import build_fab_from_disk

    submitted = (tmp_path / "status.json.args").read_text()
    value = submitted.split("app-signature=", 1)[1].split()[0].strip('"')
    trusted = [signing.load_public_key(federation.signing_public_key)]
    signing.verify(build_fab_from_disk(ROOT), value, trusted)
    with pytest.raises(RadFLError, match="num-rounds"):
        coordinator.run(federation.root, ROOT, {"num-rounds": "many"})
    federation.signing_key.unlink()  # a federation made before signed apps
    with pytest.raises(RadFLError, match="no app-signing key.*rotate-signing-key"):
        coordinator.run(federation.root, ROOT, {"num-rounds": 1})
