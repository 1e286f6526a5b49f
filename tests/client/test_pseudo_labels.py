"""Unlabelled studies: refused without pseudo-labelling, pseudo-labelled and trained on with it,
their count sent only when it reaches k; bad multi-label values refused by file, row, column."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from client import app
from client import site as site_module
from client.check import load_checked_site
from client.data import SiteDataError
from client.pseudo_labels import disclosed_count, training_set
from client.site import load_site
from common import manifest as mf
from common.config import ClientConfig, default_run_config, from_run_config
from common.tasks import get_task
from simulations.synth import FederationSpec, write_federation
from tests.client.test_data import rng, write_manifest, write_png

RUN_CONFIG = {
    **default_run_config(),
    "model": "small-cnn",
    "image-size": 16,
    "local-epochs": 1,
    "batch-size": 8,
    "augment": False,
}
PSEUDO = {"pseudo-label-threshold": 0.9, "pseudo-label-start-round": 2}


@pytest.fixture(scope="module")
def hidden_site(tmp_path_factory) -> Path:
    """One synthetic hospital whose training split has 80 % of its patients unlabelled."""
    (folder,) = write_federation(
        tmp_path_factory.mktemp("hidden"),
        FederationSpec(
            sites=1,
            task="classification",
            dims=2,
            seed=1,
            samples_per_site=60,
            image_size=16,
            num_classes=2,
            hidden_label_fraction=0.8,
        ),
    )
    return folder


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(site_module, "_CACHE", {})


def _config(**overrides) -> ClientConfig:
    return from_run_config(ClientConfig, {**RUN_CONFIG, **overrides})


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / mf.MANIFEST_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_without_pseudo_labelling_a_site_with_unlabelled_rows_refuses_naming_them(
    hidden_site, tmp_path
):
    rows = _rows(hidden_site)
    blank = [i for i, row in enumerate(rows) if not row[mf.LABEL]]
    assert 0 < len(blank) < len(rows)
    node_config = {"data-path": str(hidden_site), "cache-path": str(tmp_path)}
    with pytest.raises(SiteDataError) as refused:
        load_site(node_config, _config())
    first = rows[blank[0]]
    assert f"line {blank[0] + 2}: {first[mf.IMAGE]}: empty label: an unlabelled study" in str(
        refused.value
    )


def test_with_pseudo_labelling_the_training_splits_unlabelled_rows_are_kept_apart(
    hidden_site, tmp_path
):
    node_config = {"data-path": str(hidden_site), "cache-path": str(tmp_path)}
    splits = load_site(node_config, _config(**PSEUDO))
    rows = _rows(hidden_site)
    blank = sum(1 for row in rows if not row[mf.LABEL])
    assert splits.unlabelled is not None and len(splits.unlabelled) == blank
    test = len(splits.test) if splits.test is not None else 0
    assert len(splits.train) + len(splits.validation) + test + blank == len(rows)
    # The hidden rows are the training split's only: 80 % of its patients.
    assert 0.6 < blank / (blank + len(splits.train)) < 0.95


def _confident_model(positive_logit: float) -> dict[str, torch.Tensor]:
    """A global model whose every prediction is class 1 with probability sigmoid(logit)."""
    model = get_task(_config().model_config).build_model()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, positive_logit]))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(folder: Path, server_round: int, site_k: int, tmp_path: Path) -> dict:
    node_config = {
        "data-path": str(folder),
        "cache-path": str(tmp_path / "cache"),
        "min-cell-size": site_k,
    }
    context = Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=RecordDict(),
        run_config={**RUN_CONFIG, **PSEUDO, "min-cell-size": 2},
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(_confident_model(8.0)),
            "config": ConfigRecord({"server-round": server_round, "num-rounds": 3}),
        }
    )
    reply = app.train(Message(content=content, dst_node_id=7, message_type="train"), context)
    assert not reply.has_error()
    return dict(reply.content["metrics"])


def test_confident_unlabelled_studies_are_trained_on_and_counted_only_from_k(hidden_site, tmp_path):
    splits = load_site(
        {"data-path": str(hidden_site), "cache-path": str(tmp_path / "cache")}, _config(**PSEUDO)
    )
    assert splits.unlabelled is not None
    unlabelled, labelled = len(splits.unlabelled), len(splits.train)

    config = _config(**PSEUDO)
    task = get_task(config.model_config)
    model = task.build_model()
    model.load_state_dict(_confident_model(8.0))
    cpu = torch.device("cpu")
    before_start = training_set(task, model, splits.train, splits.unlabelled, config, 1, cpu)
    assert before_start == (splits.train, None)
    with_pseudo, count = training_set(task, model, splits.train, splits.unlabelled, config, 2, cpu)
    assert count == unlabelled and len(with_pseudo) == labelled + unlabelled

    # Every unlabelled study is predicted class 1 at p = 0.9997 >= 0.9: all are pseudo-labelled.
    counted = _train(hidden_site, 2, unlabelled, tmp_path)
    assert counted["pseudo-labels"] == unlabelled
    # num-examples stays the labelled count, so the pseudo-labelled one cannot be subtracted.
    assert counted["num-examples"] == labelled

    # The site's k is one above the count: the count stays at the site.
    withheld = _train(hidden_site, 2, unlabelled + 1, tmp_path)
    assert math.isnan(withheld["pseudo-labels"]) and withheld["num-examples"] == labelled
    # Every site of a pseudo-labelling run sends the key (Flower needs the same keys).
    assert math.isnan(disclosed_count(None, 1, True)["pseudo-labels"])
    assert math.isnan(disclosed_count(0, 1, True)["pseudo-labels"])
    assert disclosed_count(5, 5, True) == {"pseudo-labels": 5.0}
    assert disclosed_count(5, 5, False) == {}


def test_unsure_predictions_are_not_pseudo_labelled(hidden_site, tmp_path):
    from client.pseudo_labels import pseudo_label

    config = _config(**PSEUDO)
    splits = load_site({"data-path": str(hidden_site), "cache-path": str(tmp_path)}, config)
    task = get_task(config.model_config)
    model = task.build_model()
    model.load_state_dict(_confident_model(1.0))  # p = 0.73 < 0.9 everywhere
    assert splits.unlabelled is not None
    labelled = pseudo_label(
        task, model, splits.unlabelled, 0.9, batch_size=16, device=torch.device("cpu")
    )
    assert len(labelled) == 0
    model.load_state_dict(_confident_model(3.0))  # p = 0.95
    labelled = pseudo_label(
        task, model, splits.unlabelled, 0.9, batch_size=16, device=torch.device("cpu")
    )
    assert len(labelled) == len(splits.unlabelled) and set(labelled.labels.tolist()) == {1}
    assert labelled[0]["label"] == 1 and labelled[0]["image"].shape == (1, 16, 16)


def test_bad_multilabel_values_are_refused_by_file_row_and_column(tmp_path):
    for i in range(4):
        write_png(tmp_path / f"{i}.png", rng(i).integers(0, 255, size=(16, 16)))
    write_manifest(
        tmp_path,
        "image,patient_id,study_id,labels",
        "0.png,p0,s0,0;1",
        "1.png,p1,s1,0;2",  # line 3: not a flag
        "2.png,p2,s2,1",  # line 4: one flag for two findings
        "3.png,p3,s3,",  # line 5: unlabelled
    )
    with pytest.raises(SiteDataError) as refused:
        load_checked_site(
            tmp_path,
            task="multilabel",
            spatial_dims=2,
            num_classes=2,
            image_size=8,
            skip_bad_rows=False,
        )
    message = str(refused.value)
    assert f"site check of {tmp_path} failed" in message
    assert "line 3: 1.png: column labels '0;2': '2' is not a 0/1 flag" in message
    assert "line 4: 2.png: column labels '1' holds 1 flag(s); the run has 2 finding(s)" in message
    assert "line 5: 3.png: empty labels: an unlabelled study" in message

    rows, report = load_checked_site(
        tmp_path,
        task="multilabel",
        spatial_dims=2,
        num_classes=2,
        image_size=8,
        skip_bad_rows=True,
        unlabelled_ok=True,
    )
    assert list(rows.index) == [2, 5]  # the good row and the unlabelled one
    assert report.class_counts == {"0": 0, "1": 1}  # positives per finding, labelled rows


def test_the_server_takes_a_withheld_count_as_nan_and_refuses_a_bad_one_by_key():
    from flwr.app import MetricRecord

    from server import boundary

    def reply(count: float) -> RecordDict:
        metrics = {"num-examples": 10, "train-loss": 0.5, "pseudo-labels": count}
        return RecordDict({"metrics": MetricRecord(metrics)})

    assert boundary.check_train_metrics(reply(12), 100)["pseudo-labels"] == 12
    assert math.isnan(boundary.check_train_metrics(reply(math.nan), 100)["pseudo-labels"])
    for bad in (-3, 2.5, math.inf):
        with pytest.raises(boundary.BadReplyError, match="pseudo-labels"):
            boundary.check_train_metrics(reply(bad), 100)


def test_pseudo_label_keys_are_checked_by_name():
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="pseudo-label-threshold must be 0"):
        _config(**{"pseudo-label-threshold": 0.4})
    with pytest.raises(ConfigError, match="pseudo-label-start-round must be positive"):
        _config(**{"pseudo-label-start-round": 0})
    with pytest.raises(ConfigError, match="task segmentation has none"):
        _config(**PSEUDO, task="segmentation", model="unet")
