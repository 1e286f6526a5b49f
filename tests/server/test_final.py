"""The ServerApp's work outside Flower's rounds, against a fake Grid (no network)."""

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.config import ServerConfig, default_run_config, from_run_config
from common.metrics import ClassificationStates
from common.report import EvaluationStates, build_report
from common.tasks import get_task
from server import final

TASK = get_task(from_run_config(ServerConfig, default_run_config()).model_config)


def _states(n: int, seed: int) -> ClassificationStates:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, n)
    score = np.clip(0.5 + 0.3 * (target - 0.5) + 0.2 * rng.standard_normal(n), 0, 1)
    states = ClassificationStates(2)
    states.update(np.stack([1 - score, score], 1), target)
    return states


def _final_reply(name: str, seed: int) -> RecordDict:
    content = RecordDict()
    for offset, split in enumerate(("validation", "test")):
        content[split] = MetricRecord(
            {"num-examples": 60, **_states(60, seed + offset).to_record()}
        )
        content[f"{split}/sex=F"] = MetricRecord(
            {"patients": 25, **_states(30, seed + 10 + offset).to_record()}
        )
    content["suppressed"] = ConfigRecord({"test": ["sex=O"], "validation": ["sex=O"]})
    content["site"] = ConfigRecord({"site-name": name})
    return content


class FakeGrid(Grid):
    """Replies to each message with ``handler(node_id, message)``: a RecordDict, or an Error."""

    def __init__(self, nodes, handler):
        self.nodes, self.handler, self.sent = list(nodes), handler, []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            answer = self.handler(node, message)
            if answer is None:
                continue
            reply = (
                Message(answer, reply_to=message)
                if isinstance(answer, Error)
                else Message(content=answer, reply_to=message)
            )
            replies.append(reply)
        return replies

    # Unused by the code under test.
    def set_run(self, run_id): ...
    @property
    def run(self): ...
    def create_message(self, *args, **kwargs): ...
    def push_messages(self, messages): ...
    def pull_messages(self, message_ids): ...


def _sites(*names):
    counts = {"validation-images": 60, "test-images": 60}
    return {i + 1: final.Site(i + 1, name, counts) for i, name in enumerate(names)}


def test_final_evaluation_collects_splits_cells_and_suppression_and_names_failed_sites():
    def handler(node, message):
        assert message.metadata.message_type == "evaluate.final"
        assert "arrays" in message.content
        if node == 3:
            return Error(code=1, reason="CUDA out of memory")
        return _final_reply(f"site-{node}", node)

    grid = FakeGrid([1, 2, 3], handler)
    state = {"w": torch.zeros(2)}
    splits, failed = final.final_evaluation(
        grid, _sites("a", "b", "c"), state, 2, timeout=5, min_cell_size=10, task=TASK
    )
    # One copy of the model, shared by every site's message: memory does not grow per site.
    assert len({id(message.content["arrays"]) for message in grid.sent}) == 1
    assert failed == {"c": "error 1: CUDA out of memory"}
    assert sorted(splits["test"].sites) == ["a", "b"]
    assert sorted(splits["test"].cells["sex=F"]) == ["a", "b"]
    assert splits["test"].patients["sex=F"] == {"a": 25, "b": 25}
    assert splits["test"].suppressed == {"sex=O": ["a", "b"]}


@pytest.mark.parametrize("model_round", [None, 0, 15])
def test_the_final_evaluation_names_the_round_of_its_model(model_round):
    # FedBN sites evaluate the best round's model with their layers of that round (client.app).
    grid = FakeGrid([1, 2], lambda node, message: _final_reply(f"site-{node}", node))
    final.final_evaluation(
        grid,
        _sites("a", "b"),
        {"w": torch.zeros(2)},
        2,
        timeout=5,
        min_cell_size=10,
        task=TASK,
        model_round=model_round,
    )
    for message in grid.sent:
        said = dict(message.content["config"])
        assert said == ({} if model_round is None else {"model-round": model_round})


def test_a_malformed_final_reply_drops_that_site_with_the_reason():
    def handler(node, message):
        reply = _final_reply(f"s{node}", node)
        if node == 2:
            reply["test"] = MetricRecord({"state.histogram": [1.0, 2.0]})
        return reply

    splits, failed = final.final_evaluation(
        FakeGrid([1, 2], handler),
        _sites("a", "b"),
        {"w": torch.zeros(1)},
        2,
        timeout=5,
        min_cell_size=10,
        task=TASK,
    )
    assert list(failed) == ["b"] and "malformed" in failed["b"]
    assert "b" not in splits["test"].sites


def _description(name: str, train: int = 10) -> RecordDict:
    return RecordDict(
        {
            "metrics": MetricRecord(
                {"train-images": train, "validation-images": 5, "test-images": 3}
            ),
            "site": ConfigRecord({"site-name": name}),
        }
    )


def test_describe_sites_names_nodes_and_leaves_out_nodes_sharing_a_name():
    def handler(node, message):
        assert message.metadata.message_type == "query"
        return _description("x" if node > 2 else f"h{node}", train=10 * node)

    left_out = []
    sites = final.describe_sites(
        FakeGrid([1, 2, 3, 4], handler),
        [1, 2, 3, 4],
        timeout=5,
        on_left_out=lambda who, reason: left_out.append((who, reason)),
    )
    assert sites[2].name == "h2" and sites[2].counts["train-images"] == 20
    assert sorted(sites) == [1, 2]  # the run goes on without the two claiming "x"
    assert left_out == [
        ("node-3", "another node also calls itself x"),
        ("node-4", "another node also calls itself x"),
    ]


def test_with_a_registry_a_node_is_its_registered_name_and_an_unregistered_one_is_left_out():
    left_out = []
    sites = final.describe_sites(
        FakeGrid([7, 8, 9], lambda node, message: _description("site-a")),
        [7, 8, 9],
        timeout=5,
        registry={7: "site-a", 8: "site-b"},
        on_left_out=lambda who, reason: left_out.append((who, reason)),
    )
    assert {node: s.name for node, s in sites.items()} == {7: "site-a", 8: "site-b"}
    assert left_out == [("node-9", "not registered (radfl coordinator add-site)")]


def test_the_registry_file_is_read_and_a_bad_one_names_the_file(tmp_path):
    path = tmp_path / "registered.json"
    path.write_text('{"site-a": {"node-id": 12, "key": "site-a.pub"}, "site-b": {"node-id": 5}}')
    assert final.load_registry(path) == {12: "site-a", 5: "site-b"}
    path.write_text('{"site-a": {"node-id": 1e300}}')
    with pytest.raises(final.ConfigError, match="registered.json: entry 'site-a': node-id"):
        final.load_registry(path)
    with pytest.raises(final.ConfigError, match="site-registry file not found: .*missing.json"):
        final.load_registry(tmp_path / "missing.json")


def test_waiting_for_sites_fails_within_the_deadline_naming_the_counts():
    grid = FakeGrid([7], lambda node, message: None)
    with pytest.raises(final.QuorumError, match=r"1 site\(s\) connected .* needs 3"):
        final.wait_for_sites(grid, minimum=3, deadline_s=0.2)
    assert final.wait_for_sites(grid, minimum=1, deadline_s=0.2) == [7]


def test_left_out_sites_get_no_training_message():
    from common.config import ServerConfig, default_run_config, from_run_config
    from server.strategies import build_strategy

    config = from_run_config(ServerConfig, {**default_run_config(), "min-sites": 3})
    strategy = build_strategy(config, node_names={1: "a", 2: "b", 3: "c"})
    final.exclude_from_training(strategy, {2})
    grid = FakeGrid([1, 2, 3], lambda node, message: None)
    messages = strategy.configure_train(
        1, ArrayRecord({"w": torch.zeros(1)}), ConfigRecord({}), grid
    )
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 3]
    evaluated = strategy.configure_evaluate(
        1, ArrayRecord({"w": torch.zeros(1)}), ConfigRecord({}), grid
    )
    assert sorted(m.metadata.dst_node_id for m in evaluated) == [1, 2, 3]


def test_report_metrics_are_valid_mlflow_keys():
    from mlflow.utils.validation import _validate_metric_name

    splits, _ = final.final_evaluation(
        FakeGrid([1, 2], lambda node, m: _final_reply(f"s{node}", node)),
        _sites("a", "b"),
        {"w": torch.zeros(1)},
        2,
        timeout=5,
        min_cell_size=10,
        task=TASK,
    )
    splits["test"].cells["age=>=65"] = splits["test"].cells["sex=F"]
    splits["test"].patients["age=>=65"] = splits["test"].patients["sex=F"]
    states = EvaluationStates(
        splits, [], {}, {"num_rounds": 2}, {"subgroups": "sex,age,site", "min_cell_size": 10}
    )
    metrics = final.report_metrics(build_report(states))
    assert "test/auc" in metrics and "test/auc-low" in metrics
    assert "test/subgroup/age/ge65/auc" in metrics and "test/subgroup/sex/F/auc" in metrics
    for key in metrics:
        _validate_metric_name(key)
    assert not any("sex/O" in key for key in metrics)  # suppressed: no number at all
    assert isinstance(pd.DataFrame([metrics]), pd.DataFrame)


def test_the_server_drops_cells_below_k_with_every_cell_of_their_attribute(caplog):
    def handler(node, message):
        reply = _final_reply(f"s{node}", node)
        if node == 2:  # a site sending a cell of 4 patients next to the others
            reply["test/sex=O"] = MetricRecord({"patients": 4, **_states(5, 9).to_record()})
            reply["test/sex=M"] = MetricRecord({"patients": 25, **_states(25, 8).to_record()})
        return reply

    splits, failed = final.final_evaluation(
        FakeGrid([1, 2], handler),
        _sites("a", "b"),
        {"w": torch.zeros(1)},
        2,
        timeout=5,
        min_cell_size=10,
        task=TASK,
    )
    assert failed == {}
    test = splits["test"]
    # F and M of site b go too: overall minus F minus M would give O back.
    assert sorted(test.cells["sex=F"]) == ["a"] and "sex=M" not in test.cells
    assert "sex=O" not in test.cells
    assert sorted(test.suppressed["sex=O"]) == ["a", "b"] and test.suppressed["sex=M"] == ["b"]
    assert sorted(splits["validation"].cells["sex=F"]) == ["a", "b"]  # b's other split is fine
    assert "site b sent test/sex=O with 4 patients, below min-cell-size 10" in caplog.text


def test_refused_subgroup_attributes_are_logged_with_the_site_reason(caplog):
    def handler(node, message):
        reply = _final_reply(f"s{node}", node)
        reply["refused"] = ConfigRecord({"patient_id": "an identifier is never reported"})
        return reply

    final.final_evaluation(
        FakeGrid([1], handler),
        _sites("a"),
        {"w": torch.zeros(1)},
        2,
        timeout=5,
        min_cell_size=10,
        task=TASK,
    )
    assert "site a refused subgroup attribute patient_id: an identifier" in caplog.text
