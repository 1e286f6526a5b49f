"""Which Ray a simulation's sites run on: its own unless ``--ray-address`` names a cluster."""

from pathlib import Path

import pytest
from ray._private.services import canonicalize_bootstrap_address

from common.errors import RadFLError
from simulations.simulate import ray_env


def test_without_an_address_a_run_starts_its_own_ray_even_where_a_cluster_was_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head that ``ray start`` left on this machine (its address in the temp folder's
    ``ray_current_cluster``) is where ``ray.init()`` goes by default; a local simulation must
    not join it. A stopped test cluster made a benchmark's runs fail this way."""
    (tmp_path / "ray_current_cluster").write_text("127.0.0.1:6379")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # What Ray does without RadFL's setting: attach to the other cluster.
    assert canonicalize_bootstrap_address(None, str(tmp_path)) is not None
    for inherited in (None, "10.0.0.9:6379"):  # nothing, or an address left in the shell
        env = {} if inherited is None else {"RAY_ADDRESS": inherited}
        monkeypatch.setenv("RAY_ADDRESS", ray_env(env, None)["RAY_ADDRESS"])
        assert canonicalize_bootstrap_address(None, str(tmp_path)) is None  # start its own


def test_an_address_attaches_and_a_malformed_one_is_refused_by_name() -> None:
    assert ray_env({}, "127.0.0.1:6380") == {"RAY_ADDRESS": "127.0.0.1:6380"}
    with pytest.raises(RadFLError, match="--ray-address 'head': expected HOST:PORT"):
        ray_env({}, "head")
