"""The sites of `radfl simulate` in its own process, without Ray (`simulations.local_backend`):
the pieces of Flower it composes, a site's isolation from the others and from the ServerApp,
the choice of backend, and one shared tiny real run in which a site crashes."""

from __future__ import annotations

import importlib
import inspect
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.client_app import ClientAppException
from flwr.supercore.task_identity import TaskIdentity

from client.failures import site_log
from common.errors import RadFLError
from simulations import inprocess
from simulations.local_backend import LocalBackend
from simulations.synth import FederationSpec, write_federation
from tests.simulations.conftest import TINY_SETTINGS, set_options, tracking_env

#: ``radfl simulate`` that reports whether Ray was ever imported in its process.
WITH_RAY_REPORT = (
    "import sys; from common.cli import main; code = main(sys.argv[1:]); "
    "print('ray imported:', 'ray' in sys.modules); sys.exit(code)"
)


def test_the_flower_pieces_the_local_backend_composes_still_take_what_it_passes():
    vce_api = importlib.import_module("flwr.server.superlink.fleet.vce.vce_api")
    run_simulation = importlib.import_module("flwr.simulation.run_simulation")
    expected = {
        vce_api.run_api: [
            "app_fn", "backend_fn", "nodes_mapping", "state_factory", "node_info_stores",
            "f_stop", "metrics",
        ],
        vce_api._register_nodes: ["num_nodes", "state_factory"],
        vce_api._register_node_info_stores: ["nodes_mapping", "run", "app_dir"],
        run_simulation.run_serverapp_th: [
            "server_app_attr", "server_app", "server_app_context", "grid", "app_dir", "f_stop",
            "exception_queue", "enable_tf_gpu_growth", "ctx_queue",
        ],
    }  # fmt: skip
    for function, names in expected.items():
        assert list(inspect.signature(function).parameters) == names, function.__name__


def _message(node_id: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    content = RecordDict({"config": ConfigRecord({"note": "from the server"})})
    return Message(content, dst_node_id=node_id, message_type="train")


def _context(partition_id: int) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )


class _CountingApp:
    """A ClientApp stand-in: counts its calls in the site's context, scribbles on the message
    it got, and raises when the message says so."""

    def __call__(self, message: Message, context: Context) -> Message:
        previous = context.state.get("visits", MetricRecord({"count": 0}))
        count = int(previous["count"]) + 1  # type: ignore[index,arg-type]
        context.state["visits"] = MetricRecord({"count": count})
        message.content["config"]["note"] = "changed by the site"  # type: ignore[index]
        if message.metadata.dst_node_id < 0:
            raise RuntimeError("the site's own failure")
        return Message(RecordDict({"m": MetricRecord({"count": count})}), reply_to=message)


def _count(context: Context) -> int:
    return int(context.state["visits"]["count"])  # type: ignore[index,arg-type]


def test_each_site_keeps_its_own_state_and_gets_its_own_copy_of_each_message():
    backend = LocalBackend()
    backend.build(_CountingApp)
    site_0, site_1 = _context(0), _context(1)
    message = _message(node_id=100)
    _, site_0 = backend.process_message(message, site_0)
    reply, site_0 = backend.process_message(message, site_0)
    _, site_1 = backend.process_message(_message(node_id=101), site_1)
    assert (_count(site_0), _count(site_1)) == (2, 1)
    assert reply.content["m"]["count"] == 2
    # What the site changed in its message stays in its copy, as in a Ray actor.
    assert message.content["config"]["note"] == "from the server"


def test_a_site_that_raises_is_an_error_of_that_call_and_leaves_its_context_as_it_was():
    backend = LocalBackend()
    backend.build(_CountingApp)
    site = _context(0)
    _, site = backend.process_message(_message(node_id=100), site)
    with pytest.raises(ClientAppException, match="the site's own failure"):
        backend.process_message(_message(node_id=-1), site)
    assert _count(site) == 1  # the failed call's count did not reach the stored context


def test_a_sites_log_file_takes_only_the_sites_own_thread(tmp_path: Path):
    """In one process the ServerApp's thread logs through the same loggers while a site's
    handler is attached: its records are not the site's."""
    path = tmp_path / "site.log"
    logger = logging.getLogger("common.test_local_backend")
    with site_log(path):
        logger.warning("the site's record")
        other = threading.Thread(target=logger.warning, args=("the coordinator's record",))
        other.start()
        other.join()
    text = path.read_text()
    assert "the site's record" in text
    assert "the coordinator's record" not in text


def test_the_backend_is_local_unless_the_run_needs_ray():
    def choose(requested: str | None = None, **options: Any) -> str:
        values: dict[str, Any] = {"env": {}, "gpus_per_site": 0.0, "faults": "", **options}
        return inprocess.choose_backend(requested, **values)

    assert choose() == "local"
    assert choose(faults="site-1:crash@1") == "local"  # a crash is an exception, not a death
    assert choose(env={"RAY_ADDRESS": "10.0.0.1:6379"}) == "ray"
    assert choose(gpus_per_site=0.5) == "ray"
    assert choose(faults="site-0:hang@2") == "ray"
    assert choose("ray") == "ray"
    with pytest.raises(RadFLError, match=r"--backend local: --gpus-per-site .* needs --backend"):
        choose("local", gpus_per_site=1.0)
    with pytest.raises(RadFLError, match=r"--backend local: --ray-address .* needs --backend"):
        choose("local", env={"RAY_ADDRESS": "10.0.0.1:6379"})
    with pytest.raises(RadFLError, match="--backend 'dask': expected one of local, ray"):
        choose("dask")


@pytest.fixture(scope="module")
def crashing_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny real run, sites on disk: site-1 crashes in round 1 of 2."""
    folder = tmp_path_factory.mktemp("local-backend")
    spec = FederationSpec(
        sites=2, task="classification", dims=2, seed=0, samples_per_site=24, image_size=32,
        num_classes=2,
    )  # fmt: skip
    write_federation(folder / "data", spec)
    command = [
        sys.executable, "-c", WITH_RAY_REPORT, "simulate", "--data", str(folder / "data"),
        "--sites", "2", "--rounds", "2", "--model", "small-cnn", "--faults", "site-1:crash@1",
        "--workdir", str(folder / "work"), *set_options(TINY_SETTINGS),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=folder, env=tracking_env(folder), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return folder, output


@pytest.mark.slow
def test_a_run_needs_no_ray_and_says_where_its_sites_run(crashing_run: tuple[Path, str]):
    _, output = crashing_run
    assert "sites in this process" in output
    assert "ray imported: False" in output


@pytest.mark.slow
def test_a_crashing_site_is_reported_by_name_and_the_federation_goes_on(
    crashing_run: tuple[Path, str],
):
    folder, output = crashing_run
    assert "[radfl] train failed:" in output  # the site's console line, its public reason
    assert "site-1" in output.split("round 2/2")[0]  # the coordinator names it in round 1
    assert "[radfl] finished" in output
    assert "status FINISHED" in output
    # Each site's own log holds its own records only, though both ran in this one process.
    site_0 = (folder / "data/site-0/.radfl-logs/clientapp.log").read_text()
    site_1 = (folder / "data/site-1/.radfl-logs/clientapp.log").read_text()
    assert "injected crash at site-1 in round 1" in site_1
    assert "site-1" not in site_0


def test_the_sites_get_their_cpus_as_torch_threads_and_the_process_its_own_back():
    """A Ray actor runs with `OMP_NUM_THREADS` = its CPUs; torch's default (every core) made
    the local round 3.6x slower than Ray's on this loaded machine."""
    import torch

    before = torch.get_num_threads()
    backend = LocalBackend({"client_resources": {"num_cpus": before + 1}})
    backend.build(_CountingApp)
    assert torch.get_num_threads() == before + 1
    backend.terminate()
    assert torch.get_num_threads() == before
