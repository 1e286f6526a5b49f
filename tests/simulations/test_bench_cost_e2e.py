"""`radfl bench --profile quick --parts comm,overhead,scale`: what federated learning costs
(bytes sent, wall time against a bare loop, round time and memory with more sites), each from
real runs traceable to MLflow. The quality part is test_bench_e2e.py's."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.simulations.test_bench_e2e import assert_traceable, run_bench

pytestmark = pytest.mark.slow


def test_quick_comm_overhead_and_scale_write_their_tables_with_traceable_runs(tmp_path: Path):
    out, _, client = run_bench(tmp_path, ["comm", "overhead", "scale"])
    comm = pd.read_csv(out / "comm.csv").set_index("compression")
    assert comm.loc["int8", "bytes_per_site_round"] < 0.5 * comm.loc["none", "bytes_per_site_round"]
    assert comm.loc["none", "x_fp32"] == pytest.approx(1.0, abs=0.05)
    assert_traceable(client, comm["run_id"])

    overhead = pd.read_csv(out / "overhead.csv")
    # One repeat: the whole run and one round against the bare loop, then fp32 and bf16 epochs.
    assert len(overhead) == 4 and (overhead["ratio"] > 0).all()
    one_round = overhead[overhead["measure"].str.startswith("one round")]
    assert len(one_round) == 1 and one_round["radfl_s"].iloc[0] > 0
    assert_traceable(client, overhead["run_id"].dropna())
    scale = pd.read_csv(out / "scale.csv")
    assert list(scale["sites"]) == [2, 4] and (scale["peak_memory_mb"] > 0).all()
    assert_traceable(client, scale["run_id"])
