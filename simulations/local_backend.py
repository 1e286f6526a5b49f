"""The sites of ``radfl simulate`` run inside its own process, one message at a time, without Ray.

Flower's simulation runtime hands each message to a ``Backend`` (``flwr.server.superlink.fleet.
vce.backend``); its only backend, ``RayBackend``, starts Ray (about 10 s measured here under
load) and a pool of actors, each of which imports torch and MONAI again (seconds of CPU each, on
a machine whose cores the sites share). ``LocalBackend`` runs the ClientApp this process has
already imported, sequentially, each with its ``--cpus-per-site`` as torch's threads (what Ray
gives an actor): no start-up, but one site at a time where Ray runs as many side by side as
the cores hold, so on an idle machine with more cores than a site's CPUs the training itself
can take longer than in Ray (several sites at once is the next step: RadFL's per-site log
routing, ``client.failures.site_log``, would first have to allow it).

Flower 1.42 cannot select a backend by name: ``vce_api.start_vce`` takes a ``backend_name`` and
ignores it, building ``RayBackend`` always. So ``run_federation`` composes the same pieces that
``flwr.simulation.run_simulation._main_loop`` and ``start_vce`` compose (the in-memory link state
with the run registered, the ServerApp thread, the virtual nodes and their contexts, and the
message loop ``vce_api.run_api``) with ``LocalBackend`` as the backend; nothing of Flower's is
copied but that wiring, and ``tests/simulations/test_local_backend.py`` checks it against the
installed Flower.

A site here behaves as in an actor of its own: it gets a copy of each message and of its
context, as Ray's serialisation gives an actor, so nothing a ClientApp changes in either reaches
the link state or survives a failed call; an exception is the site's error reply, named by the
site (``client.failures``), and the federation goes on. What a Ray actor never shared with the
ServerApp but a thread here does, and why each is safe: the environment (the same values:
``simulations.inprocess`` sets it before either starts); torch's global RNG (every model is
built from the run's seed, every shuffle from its own generator); MLflow's active run (a
thread-local stack); RadFL's site log (its handler takes only the site thread's records). Site
data cached by ``client.site`` is dropped when the run ends, as it went with the actors.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from queue import Empty, Queue
from typing import Any, cast

from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

#: The name ``radfl simulate --backend`` takes for this backend.
NAME = "local"


class LocalBackend(Backend):
    """Run the ClientApp in this process, one message at a time (Flower's message loop starts
    one worker thread per ``num_workers``; sites' handlers are not written to share a process
    concurrently: their log routing is per process)."""

    def __init__(self, backend_config: BackendConfig | None = None) -> None:
        super().__init__(backend_config or {})
        resources = (backend_config or {}).get("client_resources", {})
        #: torch's threads while the sites run: a site's CPUs, as Ray gives an actor
        #: (``OMP_NUM_THREADS``). With torch's default (every core) on this shared 2-core
        #: machine, a round of the bench's one-round run took 148.5 s against 41.5 s in
        #: Ray's single-threaded actors (medians of 2, load 15-35): idle threads of one
        #: process waiting on each other whenever another process holds a core.
        self.threads = int(cast(float, resources.get("num_cpus", 1)))
        self.threads_before: int | None = None
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        import torch

        self.app_fn = app_fn
        self.threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on copies of ``message`` and ``context`` (what a Ray actor gets);
        raise as ``RayBackend``'s actors raise: ``ClientAppException`` for the app's errors."""
        if self.app_fn is None:
            raise ValueError("LocalBackend.build() must be called before process_message()")
        app = self.app_fn()
        site_context = copy.deepcopy(context)
        try:
            reply = app(message=copy.deepcopy(message), context=site_context)
        except LoadClientAppError:
            raise
        except Exception as error:
            raise ClientAppException(str(error)) from error
        return reply, site_context

    def terminate(self) -> None:
        import torch

        from client.site import clear_cache

        clear_cache()
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)


def run_federation(
    *,
    num_sites: int,
    cpus_per_site: int,
    server_app_attr: str,
    client_app_attr: str,
    server_context: Context,
    app_dir: str,
    run: Any,
) -> Context:
    """Run the ServerApp ``server_app_attr`` in a thread against ``num_sites`` virtual sites
    whose ClientApp ``client_app_attr`` runs in ``LocalBackend`` with ``cpus_per_site`` torch
    threads, until the ServerApp returns; its final context. Raises what the ServerApp
    raised."""
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics
    from flwr.server.superlink.fleet.vce.vce_api import (
        _register_node_info_stores,
        _register_nodes,
        run_api,
    )
    from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.simulation.run_simulation import run_serverapp_th
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    state_factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = cast(InMemoryLinkState, state_factory.state())
    # As Flower's _main_loop: the run and its primary task exist before the ServerApp asks.
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=state_factory)
    grid.set_run(run)
    nodes = _register_nodes(num_nodes=num_sites, state_factory=state_factory)
    node_stores = _register_node_info_stores(nodes_mapping=nodes, run=run, app_dir=app_dir)
    client_app = get_load_client_app_fn(
        default_app_ref=client_app_attr, app_path=app_dir, multi_app=False
    )(run.fab_id, run.fab_version, run.fab_hash)

    stop = threading.Event()
    server_errors: Queue[BaseException] = Queue()
    contexts: Queue[Context] = Queue()
    server_thread = run_serverapp_th(
        server_app_attr=server_app_attr,
        server_app=None,
        server_app_context=server_context,
        grid=grid,
        app_dir=app_dir,
        f_stop=stop,  # set by the thread when the ServerApp returns or raises
        exception_queue=server_errors,
        enable_tf_gpu_growth=False,
        ctx_queue=contexts,
    )
    resources: BackendConfig = {"client_resources": {"num_cpus": cpus_per_site}}
    backend = functools.partial(LocalBackend, resources)
    try:
        run_api(lambda: client_app, backend, nodes, state_factory, node_stores, stop, VceMetrics())
    finally:
        stop.set()
    server_thread.join()  # run_api returned: the ServerApp has (stop is set only by it)
    try:
        raise server_errors.get_nowait()
    except Empty:
        return contexts.get_nowait()
