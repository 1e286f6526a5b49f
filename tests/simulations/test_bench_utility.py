"""The privacy-utility bench's modes: each one dict of run-config overrides for its epsilon."""

import pytest

from common.config import known_keys
from common.privacy import UpdateAccountant
from simulations.bench.runner import PROFILES
from simulations.bench.utility import SECAGG_KEY, failure_note, modes


def test_every_mode_is_run_config_overrides_and_each_dp_mode_reaches_its_epsilon():
    profile = PROFILES["quick"]
    found = modes(profile, "classification", profile.classification_model)
    assert list(found) == [
        "none",
        "dp-sgd-eps1",
        "dp-sgd-eps3",
        "dp-sgd-eps8",
        "update-dp-eps1",
        "update-dp-eps3",
        "update-dp-eps8",
        "secagg",
    ]
    for name, settings in found.items():
        if name != "secagg":
            assert set(settings) <= known_keys(), name
    assert found["secagg"] == {SECAGG_KEY: True}
    sigmas = [found[f"dp-sgd-eps{e}"]["dp-noise-multiplier"] for e in (1, 3, 8)]
    assert sigmas == sorted(sigmas, reverse=True)  # more noise for a smaller epsilon
    for epsilon in (1, 3, 8):
        settings = found[f"update-dp-eps{epsilon}"]
        assert settings["dp-update-epsilon"] == epsilon
        accountant = UpdateAccountant(settings["dp-update-noise-multiplier"], 1.0, 1e-5)
        # Within the budget the run enforces, and close to it.
        assert accountant.epsilon(profile.rounds) <= epsilon
        assert accountant.epsilon(profile.rounds) == pytest.approx(epsilon, rel=0.01)


def test_a_failed_cells_note_keeps_the_command_and_the_error_that_ended_it():
    """A failed cell's note names its command and why it failed (the first line alone, which
    the table showed before, ended in "exited with 2:" and lost the cause)."""
    error = (
        "`radfl simulate --seed 0` exited with 2:\n[radfl] round 1\n"
        "radfl: error: run-config key 'x' is unknown\nWall time: 3 s\n"
    )
    note = failure_note(error)
    assert (
        note
        == "`radfl simulate --seed 0` exited with 2: radfl: error: run-config key 'x' is unknown"
    )
    assert (
        failure_note("`radfl simulate` exited with 1:\nKilled")
        == "`radfl simulate` exited with 1: Killed"
    )
    assert failure_note("") == "no output"
