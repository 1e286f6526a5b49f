"""The trust states (calibration, selective prediction, attention) against references: NLL
against torch, ECE against a direct computation on the raw probabilities (torchmetrics is not
installed), the selective curve's AUC against scikit-learn on the kept cases, and each state
summed over fake sites equal to the whole."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from common import attention as att
from common import calibration as cal
from common import selective as sel
from common import uncertainty as unc
from common.metrics import ClassificationStates
from common.models import build_model


def _overconfident(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a binary model that is right 75% of the time but scaled as if it were sure."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 2, (n,), generator=generator)
    margin = 1.0 + torch.rand(n, generator=generator)
    right = torch.rand(n, generator=generator) < 0.75
    sign = torch.where(right, 1.0, -1.0) * torch.where(target == 1, 1.0, -1.0)
    difference = 4.0 * sign * margin
    return torch.stack([-difference / 2, difference / 2], dim=1), target


def _final(logits: torch.Tensor, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    probs = torch.softmax(logits, dim=1)
    return {"probs": probs, "logits": logits, "entropy": sel.normalised_entropy(probs), **extra}


def _direct_ece(probs: np.ndarray, target: np.ndarray, bins: int = 10) -> float:
    confidence = probs[:, 1]
    index = np.clip((confidence * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            total += chosen.sum() * abs(target[chosen].mean() - confidence[chosen].mean())
    return total / len(target)


def test_nll_per_temperature_equals_torch_cross_entropy():
    logits, target = _overconfident(50)
    nll = cal.nll_by_temperature(logits, target)
    for index in (0, cal.UNIT_INDEX, 20, 32):
        scaled = logits.double() / cal.TEMPERATURES[index]
        expected = torch.nn.functional.cross_entropy(scaled, target, reduction="sum")
        assert nll[index] == pytest.approx(float(expected), rel=1e-10)
    assert cal.TEMPERATURES[cal.UNIT_INDEX] == 1.0


def test_ece_before_and_after_equals_a_direct_computation_and_scaling_lowers_it():
    logits, target = _overconfident()
    states = ClassificationStates(2)
    states.update(_final(logits), target)
    temperature = states.fitted_temperature()
    assert temperature > 1.5  # the logits are scaled up: the fit must cool them down
    summary = states.trust("pooled", temperature, 0.5, 0.95)
    assert summary is not None
    before = _direct_ece(torch.softmax(logits.double(), 1).numpy(), target.numpy())
    after = _direct_ece(torch.softmax(logits.double() / temperature, 1).numpy(), target.numpy())
    assert summary.ece_before == pytest.approx(before, abs=1e-12)
    assert summary.ece_after == pytest.approx(after, abs=1e-12)
    assert summary.ece_after < summary.ece_before
    # The fitted temperature is the grid's NLL minimum, as torch computes it.
    losses = [
        float(torch.nn.functional.cross_entropy(logits.double() / t, target))
        for t in cal.TEMPERATURES
    ]
    assert temperature == cal.TEMPERATURES[int(np.argmin(losses))]


def test_ece_by_hand_on_four_cases():
    # Two cases at p = 0.95 (one positive), two at p = 0.15 (none positive): bins 9 and 1.
    p = torch.tensor([0.95, 0.95, 0.15, 0.15], dtype=torch.float64)
    logits = torch.stack([torch.zeros(4), torch.log(p / (1 - p))], 1)
    counts, sums = cal.reliability_by_temperature(logits, torch.tensor([1, 0, 0, 0]))
    # |0.5 - 0.95| * 2/4 + |0 - 0.15| * 2/4 = 0.3
    assert cal.expected_calibration_error(counts[cal.UNIT_INDEX], sums[cal.UNIT_INDEX]) == (
        pytest.approx(0.3)
    )


def test_trust_states_summed_over_sites_equal_the_whole():
    logits, target = _overconfident(300)
    attention = torch.rand(300, dtype=torch.float64)
    attention[::3] = math.nan  # cases without a lesion mask
    whole = ClassificationStates(2)
    whole.update(_final(logits, attention=attention), target)
    sites = [ClassificationStates(2) for _ in range(3)]
    for k, states in enumerate(sites):
        rows = slice(100 * k, 100 * (k + 1))
        states.update(_final(logits[rows], attention=attention[rows]), target[rows])
    pooled = ClassificationStates(2)
    for states in sites:
        pooled.add_record(states.to_record())
    pooled.check_totals()
    for name, array in whole.arrays.items():
        np.testing.assert_allclose(pooled.arrays[name], array, rtol=1e-12, err_msg=name)
    assert pooled.fitted_temperature() == whole.fitted_temperature()


def test_selective_curve_auc_equals_scikit_learn_on_the_kept_cases():
    rng = np.random.default_rng(3)
    n = 500
    target = rng.integers(0, 2, n)
    # Scores at score-bin centres, so that the histogram's ties are the raw scores' ties.
    score_bin = np.clip(rng.normal(40 + 25 * target, 18).astype(int), 0, sel.SCORE_BINS - 1)
    score = (score_bin + 0.5) / sel.SCORE_BINS
    entropy = rng.uniform(0, 1, n)
    probs = torch.tensor(np.stack([1 - score, score], 1))
    histogram = sel.selective_histogram(
        probs, torch.tensor(target), torch.tensor(entropy, dtype=torch.float64)
    )
    curve = sel.selective_curve(histogram, 0.5, binary=True)
    assert curve[0]["referred_share"] == 0.0 and curve[0]["kept"] == n
    for row in curve:
        kept = entropy < row["entropy_below"]
        assert row["kept"] == kept.sum()
        assert row["referred_share"] == pytest.approx(1 - kept.mean())
        if len(set(target[kept])) == 2:
            assert row["auc"] == pytest.approx(roc_auc_score(target[kept], score[kept]), abs=1e-12)
            positives = target[kept] == 1
            predicted = score[kept] >= 0.5
            assert row["sensitivity"] == pytest.approx(predicted[positives].mean())
            assert row["specificity"] == pytest.approx((~predicted[~positives]).mean())


def test_normalised_entropy_is_zero_when_certain_and_one_when_uniform():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert sel.normalised_entropy(probs).tolist() == pytest.approx([0.0, 1.0])


def test_attention_share_by_hand_and_its_interval():
    maps = torch.tensor([[[[1.0, 3.0], [0.0, 4.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    masks = torch.tensor([[[[0, 1], [0, 1]]], [[[0, 0], [0, 0]]]])
    share = att.share_inside(maps, masks)
    assert share[0] == pytest.approx(7 / 8) and math.isnan(share[1])  # no lesion: no share
    values = np.array([0.2, 0.4, 0.9])
    summary = att.attention_summary(np.array([3, values.sum(), (values**2).sum()]), 0.05)
    half = 1.959964 * values.std(ddof=1) / math.sqrt(3)
    assert summary.value == pytest.approx(values.mean())
    assert (summary.low, summary.high) == pytest.approx(
        (values.mean() - half, values.mean() + half), abs=1e-5
    )


def test_grad_cam_maps_of_a_small_cnn_cover_the_image():
    torch.manual_seed(0)
    model = build_model("small-cnn", spatial_dims=2, in_channels=1, out_channels=2).eval()
    maps = att.grad_cam(model, torch.randn(16, 1, 32, 32))
    assert maps.shape == (16, 1, 32, 32) and torch.isfinite(maps).all()
    assert (maps >= 0).all() and maps.flatten(1).sum(1).gt(0).any()
    assert not model.training
    resnet = build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=2).eval()
    assert att.cam_layer(resnet, torch.randn(1, 1, 64, 64)).startswith("layer3.")


def test_mc_dropout_samples_the_head_and_keeps_the_deterministic_logits():
    torch.manual_seed(0)
    model = build_model("small-cnn", spatial_dims=2, in_channels=1, out_channels=2).eval()
    images = torch.randn(6, 1, 32, 32)
    logits, sampled = unc.predictive_probabilities(model, images, "mc-dropout")
    with torch.no_grad():
        assert torch.allclose(logits, model(images))
    assert torch.allclose(sampled.sum(1), torch.ones(6, dtype=sampled.dtype))
    plain = unc.predictive_probabilities(model, images, "entropy")[1]
    assert not torch.allclose(sampled, plain)
    again = unc.predictive_probabilities(model, images, "mc-dropout")[1]
    assert torch.equal(sampled, again)  # seeded: the same evaluation gives the same states
    with pytest.raises(ValueError, match="uncertainty method 'ensemble'"):
        unc.predictive_probabilities(model, images, "ensemble")  # type: ignore[arg-type]


def test_a_record_whose_trust_states_disagree_with_its_count_is_refused():
    logits, target = _overconfident(40)
    states = ClassificationStates(2)
    states.update(_final(logits), target)
    record = states.to_record()
    record["state.attention"] = [41.0, 1.0, 1.0]  # more attention cases than cases
    forged = ClassificationStates(2)
    forged.add_record(record)
    with pytest.raises(ValueError, match="trust states disagree with count 40"):
        forged.check_totals()


def test_calibrated_threshold_keeps_every_decision():
    logits, _ = _overconfident(200)
    for threshold in (0.2, 0.5, 0.731):
        for temperature in (0.5, 1.0, 2.83):
            moved = cal.calibrated_threshold(threshold, temperature)
            before = torch.softmax(logits.double(), 1)[:, 1] >= threshold
            after = torch.softmax(logits.double() / temperature, 1)[:, 1] >= moved
            assert torch.equal(before, after)


def test_the_report_fits_the_temperature_on_validation_and_writes_the_trust_files(tmp_path):
    from common.report import EvaluationStates, SplitStates, build_report
    from common.report_files import write_report
    from server.publish import report_metrics
    from server.tracking import model_metadata

    splits = {name: SplitStates(2) for name in ("validation", "test")}
    for k, site in enumerate(("a", "b")):
        for split in splits:
            logits, target = _overconfident(200, seed=10 * k + len(split))
            states = ClassificationStates(2)
            attention = torch.full((200,), 0.6, dtype=torch.float64)
            states.update(_final(logits, attention=attention), target)
            cell = ClassificationStates(2)
            cell.update(_final(logits[:50], attention=attention[:50]), target[:50])
            splits[split].add_site(
                site, states.to_record(), {"sex=F": cell.to_record()}, {"sex=F": 50}, []
            )
    report = build_report(EvaluationStates(splits, [], {}, {"run_id": "x"}, {"subgroups": "sex"}))
    assert report.temperature == splits["validation"].pooled().fitted_temperature() > 1.5
    labels = [t.label for t in report.trust]
    assert labels == ["pooled", "a", "b", "sex=F"]
    pooled = report.trust[0]
    assert pooled.ece_after < pooled.ece_before
    assert pooled.attention.value == pytest.approx(0.6) and pooled.attention.n == 400
    names = {p.name for p in write_report(report, tmp_path)}
    assert {"trust.csv", "selective.csv", "selective.png", "calibration_before_after.png"} <= names
    assert "ECE" in (tmp_path / "model_card.md").read_text()
    metrics = report_metrics(report)
    assert metrics["test/temperature"] == report.temperature
    assert metrics["test/ece-after"] == pytest.approx(pooled.ece_after)
    # The registered model applies T, with the threshold moved to keep its decisions.
    from common.config import ServerConfig, default_run_config, from_run_config

    config = from_run_config(ServerConfig, default_run_config())
    metadata = model_metadata(config, report.threshold, report.temperature)
    assert metadata["temperature"] == report.temperature
    assert metadata["threshold"] == pytest.approx(
        cal.calibrated_threshold(report.threshold, report.temperature)
    )


def test_a_planted_shortcut_marks_most_positives_few_negatives_and_leaves_the_masks():
    from common.errors import ConfigError
    from common.synthetic import make_site, plant_shortcut, site_profiles

    data = make_site(
        site_profiles(1, 200, 0)[0],
        index=0,
        image_size=24,
        spatial_dims=2,
        num_classes=2,
        seed=0,
    )
    planted = plant_shortcut(data, seed=0)
    corner = planted.images[:, 0, :4, :4]
    marked = (corner == corner[:, :1, :1]).flatten(1).all(1) & (
        corner[:, 0, 0] > data.images.flatten(1).max(1).values
    )
    positives = data.labels > 0
    assert marked[positives].float().mean() > 0.75 and marked[~positives].float().mean() < 0.25
    assert torch.equal(planted.masks, data.masks)
    assert torch.equal(planted.images[~marked], data.images[~marked])
    with pytest.raises(ConfigError, match="shortcut strength must lie in"):
        plant_shortcut(data, seed=0, strength=1.5)


def test_a_classification_site_folder_hands_its_lesion_masks_to_the_final_evaluation(tmp_path):
    from client.data import SiteDataset, read_manifest
    from simulations.synth import FederationSpec, write_federation

    spec = FederationSpec(
        sites=2,
        task="classification",
        dims=2,
        seed=0,
        samples_per_site=12,
        image_size=16,
        num_classes=2,
        shortcut_site=1,
    )
    for folder in write_federation(tmp_path, spec):
        rows = read_manifest(folder, "classification")
        dataset = SiteDataset(rows, folder, task="classification", spatial_dims=2, image_size=16)
        items = [dataset[i] for i in range(len(dataset))]
        assert all(item["lesion"].shape == (1, 16, 16) for item in items)
        # Lesion voxels only where the label says there is a lesion (a tiny one may vanish
        # when the mask is resampled to 16 px).
        with_lesion = [bool(item["lesion"].any()) for item in items]
        labels = [bool(item["label"] > 0) for item in items]
        assert not any(w and not lab for w, lab in zip(with_lesion, labels, strict=True))
        assert any(with_lesion)


def test_the_simulation_overlay_of_a_classifier_outlines_its_grad_cam_against_the_lesion():
    from common.tasks import get_task
    from common.tasks.base import ModelConfig

    task = get_task(ModelConfig("classification", "small-cnn", 2, 32, 2, 0))
    model = task.build_model().eval()
    lesion = torch.zeros(1, 32, 32, dtype=torch.uint8)
    lesion[0, 10:14, 10:14] = 1
    sample = {"image": torch.randn(1, 32, 32), "label": torch.tensor(1), "lesion": lesion}
    overlay = task.overlay(model, sample)
    assert overlay is not None and np.array_equal(overlay.truth, lesion[0].numpy())
    assert overlay.predicted.shape == (32, 32) and set(np.unique(overlay.predicted)) <= {0, 1}
    assert task.overlay(model, {"image": sample["image"], "label": sample["label"]}) is None


@pytest.mark.parametrize("site", [0, 1, 2], ids=["dicom-ct", "nifti-mr", "png-dx"])
def test_a_planted_shortcut_survives_each_site_formats_preprocessing(tmp_path, site):
    """The marker must reach the model: a CT site stores it as CT numbers, and a marker drawn
    as air-dark numbers vanished under the soft-tissue window (it did, at first: the default
    run with the shortcut trained on the same pixels as without)."""
    from client.data import SiteDataset, read_manifest
    from simulations.synth import FederationSpec, write_federation

    def items(shortcut_site: int, out: Path) -> list[dict]:
        spec = FederationSpec(
            sites=site + 1,
            task="classification",
            dims=2,
            seed=0,
            samples_per_site=40,
            image_size=32,
            num_classes=2,
            shortcut_site=shortcut_site,
        )
        folder = write_federation(out, spec)[site]
        rows = read_manifest(folder, "classification")
        dataset = SiteDataset(rows, folder, task="classification", spatial_dims=2, image_size=32)
        return [dataset[i] for i in range(len(dataset))]

    plain, planted = items(-1, tmp_path / "plain"), items(site, tmp_path / "planted")
    positives = [i for i, item in enumerate(plain) if item["label"] > 0]
    changed = [i for i in positives if not torch.equal(plain[i]["image"], planted[i]["image"])]
    assert len(changed) >= 0.75 * len(positives), (len(changed), len(positives))
    for i in changed:
        corner = (slice(None), slice(0, 3), slice(0, 3))
        assert planted[i]["image"][corner].mean() > plain[i]["image"][corner].mean() + 0.5
