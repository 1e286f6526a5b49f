"""A model trained with DP has GroupNorm where the registered network has BatchNorm: its
metadata says so, and everything that rebuilds the network from metadata (radfl predict's
referral entropy and Grad-CAM, ensemble folders) builds that network."""

import pytest
import torch

from client.predict_explain import explained_network, referral_entropy
from common import ensemble
from common.config import ClientConfig, ServerConfig, default_run_config, from_run_config
from common.errors import ConfigError
from common.privacy import private_model
from common.tasks import get_task
from common.tasks.base import ModelConfig
from server.tracking import model_metadata

BASE = {**default_run_config(), "model": "small-cnn", "image-size": 32}
DP_SGD = {"dp-noise-multiplier": 1.0, "dp-max-grad-norm": 1.0}
UPDATE_DP = {"dp-update-noise-multiplier": 1.0, "dp-update-clip-norm": 1.0}


def _trained_network(run_config: dict) -> tuple[torch.nn.Module, dict]:
    """The network a run with ``run_config`` delivers, as the server builds it, and the
    metadata its logged model carries."""
    server = from_run_config(ServerConfig, {**BASE, **run_config})
    network = get_task(server.model_config).build_model()
    if server.private_network:
        network = private_model(network)
    with torch.no_grad():  # weights that are not the fresh network's
        for parameter in network.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return network.eval(), model_metadata(server, threshold=0.5)


@pytest.mark.parametrize(
    ("run_config", "normalisation"), [({}, "batch"), (DP_SGD, "group"), (UPDATE_DP, "group")]
)
def test_a_logged_models_metadata_names_the_normalisation_both_sides_trained(
    run_config, normalisation
):
    network, metadata = _trained_network(run_config)
    assert metadata["normalisation"] == normalisation
    site = from_run_config(ClientConfig, {**BASE, **run_config})
    assert site.model_config.normalisation == normalisation
    rebuilt = get_task(ModelConfig.of_model(metadata)).build_model()
    assert rebuilt.state_dict().keys() == network.state_dict().keys()
    has_group_norm = any(isinstance(m, torch.nn.GroupNorm) for m in rebuilt.modules())
    assert has_group_norm == (normalisation == "group")


def test_predict_explains_a_dp_trained_model_with_the_same_outputs():
    # Before the metadata named the normalisation, this rebuilt a BatchNorm network and
    # radfl predict stopped with a RuntimeError on every study of a DP-trained model.
    network, metadata = _trained_network(DP_SGD)
    image = torch.randn(1, 1, 32, 32)
    plain = explained_network(network, metadata)
    assert torch.allclose(plain(image), network(image), atol=1e-6)
    entropy = referral_entropy(network, {**metadata, "uncertainty": "entropy"}, "m", image)
    assert 0.0 <= entropy <= 1.0


def test_weights_that_do_not_fit_the_described_network_are_refused_by_message():
    network, metadata = _trained_network(DP_SGD)
    older = {k: v for k, v in metadata.items() if k != "normalisation"}  # logged before the key
    refusal = "do not fit a small-cnn network with batch normalisation"
    with pytest.raises(ConfigError, match=refusal):
        explained_network(network, older)
    with pytest.raises(ConfigError, match="normalisation 'layer' is not one of batch, group"):
        ModelConfig.of_model({**metadata, "normalisation": "layer"})


def test_an_ensemble_folder_of_dp_trained_members_loads_and_averages(tmp_path):
    first, metadata = _trained_network(DP_SGD)
    second, _ = _trained_network({**DP_SGD, "seed": 1})
    states = {"a": first.state_dict(), "b": second.state_dict()}
    folder = ensemble.write_folder(tmp_path / "ens", metadata, states)
    averaged, read = ensemble.read_folder(folder)
    assert read["normalisation"] == "group"
    image = torch.randn(2, 1, 32, 32)
    expected = (torch.softmax(first(image), 1) + torch.softmax(second(image), 1)) / 2
    assert torch.allclose(torch.softmax(averaged(image), 1), expected, atol=1e-5)
