"""Which Ray a simulation's sites run on: its own unless ``--ray-address`` names a cluster."""

from pathlib import Path

import pytest
from ray._private.services import canonicalize_bootstrap_address

from common.errors import RadFLError
from simulations.inprocess import choose_backend, ray_env, where_sites_run


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
    env = ray_env({}, None)
    monkeypatch.setenv("RAY_ADDRESS", env["RAY_ADDRESS"])
    assert canonicalize_bootstrap_address(None, str(tmp_path)) is None  # start its own
    # ... and the run is local: neither a Ray backend nor a cluster is chosen for it.
    assert choose_backend(None, env=env, gpus_per_site=0, faults="") == "local"
    assert where_sites_run("ray", env) == "sites in a private Ray"


def test_a_ray_address_the_user_set_is_kept_and_the_option_comes_first() -> None:
    assert ray_env({"RAY_ADDRESS": "10.0.0.9:6379"}, None)["RAY_ADDRESS"] == "10.0.0.9:6379"
    env = ray_env({"RAY_ADDRESS": "10.0.0.9:6379"}, "10.0.0.1:6379")
    assert env["RAY_ADDRESS"] == "10.0.0.1:6379"
    assert choose_backend(None, env=env, gpus_per_site=0, faults="") == "ray"
    assert where_sites_run("ray", env) == "sites on Ray cluster 10.0.0.1:6379"


def test_an_address_attaches_and_a_malformed_one_is_refused_by_name() -> None:
    assert ray_env({}, "127.0.0.1:6380") == {"RAY_ADDRESS": "127.0.0.1:6380"}
    with pytest.raises(RadFLError, match="--ray-address 'head': expected HOST:PORT"):
        ray_env({}, "head")
