import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Flower's Message needs the run it belongs to; a ServerApp process sets it, tests do here."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a slow (end-to-end) test first, each module's tests kept together and in
    order: a parallel run (``make test``: pytest-xdist, a module per worker) then starts the
    long modules first and fills in with the quick ones, instead of leaving one worker on a
    five-minute test at the end while the other idles."""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    # Stable: the order within each group is the collection order.
    items.sort(key=lambda item: item.path not in slow_modules)
