"""Fault injection (``simulations.faults``): spec parsing, each fault kind, and that only the
simulation ClientApp reads ``RADFL_FAULTS``: the production ``client.app:app`` never does."""

import importlib

import numpy as np
import pytest

import client.app
from client import app
from common.errors import ConfigError
from simulations import faults
from tests.client.test_app import _context, _global_model, _train_message


def test_fault_strings_parse_and_bad_ones_name_the_item():
    parsed = faults.parse_faults("site-1:crash@2, site-3:nan")
    assert parsed == [faults.Fault("site-1", "crash", 2), faults.Fault("site-3", "nan", None)]
    with pytest.raises(ConfigError, match="site-1:explode"):
        faults.parse_faults("site-1:explode")


@pytest.mark.parametrize("kind", ["nan", "scale", "inflate", "shape", "crash"])
def test_injected_faults_change_the_reply_as_named(kind):
    model = _global_model()
    context = _context("fedavg")
    mod = faults.fault_mod([faults.Fault("site-0", kind, 1)])
    message = _train_message(model.state_dict())
    honest = app.train(message, context)
    if kind == "crash":
        with pytest.raises(RuntimeError, match="injected crash at site-0"):
            mod(message, context, app.train)
        return
    reply = mod(message, context, lambda m, c: honest)
    arrays = reply.content["arrays"]
    sent = message.content["arrays"]
    good = honest.content["arrays"]
    key = next(k for k in good if np.issubdtype(good[k].numpy().dtype, np.floating))
    if kind == "nan":
        assert np.isnan(arrays[key].numpy()).all()
    elif kind == "scale":
        np.testing.assert_allclose(
            arrays[key].numpy() - sent[key].numpy(),
            100 * (good[key].numpy() - sent[key].numpy()),
            rtol=1e-3,
            atol=1e-5,
        )
    elif kind == "inflate":
        assert (
            reply.content["metrics"]["num-examples"]
            == 1000 * honest.content["metrics"]["num-examples"]
        )
    elif kind == "shape":
        assert any(arrays[k].numpy().shape != good[k].numpy().shape for k in good)
    # Another round, or another site: untouched.
    later = _train_message(model.state_dict(), server_round=2)
    assert mod(later, context, lambda m, c: honest) is honest


def test_radfl_faults_has_no_effect_on_the_production_clientapp(monkeypatch):
    monkeypatch.setenv(faults.ENV, "site-0:nan")
    try:
        production = importlib.reload(client.app).app  # built with the variable set
        simulation = importlib.reload(faults).app
        message = _train_message(_global_model().state_dict())

        honest = production(message, _context("fedavg"))
        faulty = simulation(message, _context("fedavg"))
    finally:
        monkeypatch.delenv(faults.ENV)
        importlib.reload(faults)

    def floats(reply):
        arrays = reply.content["arrays"]
        return [arrays[k].numpy() for k in arrays if arrays[k].numpy().dtype.kind == "f"]

    assert all(np.isfinite(value).all() for value in floats(honest))
    assert all(np.isnan(value).all() for value in floats(faulty))  # the same variable, read


def test_an_injected_crash_reaches_the_coordinator_as_a_real_crash_would():
    simulation = faults.build_app(mods=[faults.fault_mod([faults.Fault("site-0", "crash", 1)])])
    reply = simulation(_train_message(_global_model().state_dict()), _context("fedavg"))
    assert reply.has_error()
    assert reply.error.reason == "site app failed (E-INTERNAL): RuntimeError, see the site's log"
