"""The site's ClientApp launcher wraps Flower's runner so that an unsigned bundle is never
installed: the refusal is raised where Flower turns it into the task's error reply."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client import launcher
from common import signing

FAB = b"the bundle's bytes"


def _runtime(signature: str) -> tuple[Any, list[bytes]]:
    installed: list[bytes] = []
    context = types.SimpleNamespace(run_config={"app-signature": signature, "num-rounds": 1})
    run = types.SimpleNamespace(run_id=7)
    fab = types.SimpleNamespace(content=FAB)
    runtime = types.SimpleNamespace(
        pull_task_input=lambda client: ("message", context, run, fab),
        install_from_fab=lambda content, skip_prompt: installed.append(content),
    )
    return runtime, installed


def _flower_step(runtime: Any) -> None:
    """What Flower's ``run_clientapp`` does, in order: pull, then install the bundle."""
    _, _, _, fab = runtime.pull_task_input(object())
    runtime.install_from_fab(fab.content, skip_prompt=True)


def test_a_signed_bundle_is_installed():
    key = Ed25519PrivateKey.generate()
    runtime, installed = _runtime(str(signing.sign(FAB, key)))
    launcher.guard(runtime, [key.public_key()], forget_radfl_modules=False)
    _flower_step(runtime)
    assert installed == [FAB]


@pytest.mark.parametrize("signer", ["nobody", "another key"])
def test_an_unsigned_or_foreign_bundle_is_never_installed(signer: str):
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signature = "" if signer == "nobody" else str(signing.sign(FAB, other))
    runtime, installed = _runtime(signature)
    launcher.guard(runtime, [key.public_key()], forget_radfl_modules=False)
    with pytest.raises(signing.AppSignatureError, match=signing.REFUSAL):
        _flower_step(runtime)
    assert installed == []


def test_trusted_keys_come_from_the_environment_and_a_bad_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    signing.make_key_pair(tmp_path / "a.key", tmp_path / "a.pub")
    signing.make_key_pair(tmp_path / "b.key", tmp_path / "b.pub")
    monkeypatch.setenv(launcher.TRUSTED_KEYS_ENV, f"{tmp_path / 'a.pub'}:{tmp_path / 'b.pub'}")
    assert len(launcher.trusted_keys_from_env()) == 2
    monkeypatch.delenv(launcher.TRUSTED_KEYS_ENV)
    assert launcher.trusted_keys_from_env() == []  # and verify() then refuses everything
    monkeypatch.setenv(launcher.TRUSTED_KEYS_ENV, str(tmp_path / "a.key"))
    with pytest.raises(signing.RadFLError, match="a.key is not a PEM public key"):
        launcher.trusted_keys_from_env()


def test_the_clientapp_command_runs_this_python_and_module(tmp_path: Path):
    import sys

    path = launcher.write_clientapp_command(tmp_path / "bin" / "radfl-clientapp")
    assert path.stat().st_mode & 0o777 == 0o700
    assert path.read_text().splitlines() == [
        "#!/bin/sh",
        f'exec {sys.executable} -m client.launcher clientapp "$@"',
    ]


def test_the_flower_internals_the_launcher_wraps_are_there_as_it_uses_them():
    """``client.launcher`` replaces two functions of Flower's ClientApp runner and one entry of
    a table its executors read: a Flower upgrade that moves or reshapes one of them must fail
    here, not at a hospital (where the launcher would then run unchecked or not at all)."""
    import inspect
    import typing

    from flwr.supercore import constant
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supernode.runtime import run_clientapp as runtime

    # The runner calls both through its module globals, which guard() replaces.
    loop = inspect.getsource(runtime.run_clientapp)
    assert "pull_task_input(client)" in loop
    assert "install_from_fab(fab.content, skip_prompt=True)" in loop
    pull = inspect.signature(runtime.pull_task_input)
    assert list(pull.parameters) == ["client"]
    returned = [t.__name__ for t in typing.get_args(pull.return_annotation)]
    assert returned == ["Message", "Context", "Run", "Fab"]  # unpacked in that order
    install = inspect.signature(runtime.install_from_fab)
    assert list(install.parameters)[0] == "fab_file" and "skip_prompt" in install.parameters
    # The executor reads the same dict object the launcher writes into, on every launch.
    table = constant.TASK_TYPE_TO_COMMAND
    assert subprocess_executor.TASK_TYPE_TO_COMMAND is table
    assert table[constant.TaskType.CLIENT_APP] == "flwr-clientapp"
