"""``radfl bench --parts privacy``: the attacks of ``simulations.attacks`` on RadFL's models.

- Membership inference on the final global model of a real ``radfl simulate --in-memory`` run
  (its ``weights/final.pt`` read back from MLflow): members are the training patients of every
  site, non-members the validation and test patients of the same sites, rebuilt in this process
  from the run's seed exactly as the simulated sites built them.
- Gradient inversion of one site's single-round update of the round-1 global model (one SGD
  step on a batch of 1, and of 4), and of the sum of the first ``secagg_sites`` sites' updates.

Protections are columns: ``none``; ``secagg`` (the server holds only the sum of the sites'
updates; the released model is the same as without it); ``dp eps=E``: for the inversion,
update-level DP over 1 round with the noise added at the site; for membership inference,
sample-level DP-SGD in the sites' training when this tree's run config has
``dp-noise-multiplier``, else the row says it was not run.

Writes ``privacy.csv`` (long), ``privacy_summary.csv`` (protections as columns),
``privacy_inversion_batch{B}.png`` and ``privacy_membership.png`` to ``--out``.
"""

from __future__ import annotations

import importlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from client.site import SiteSplits, synthetic_site  # noqa: E402
from common.config import ClientConfig, default_run_config, from_run_config  # noqa: E402
from common.tasks import get_task  # noqa: E402
from simulations import attacks  # noqa: E402

if TYPE_CHECKING:
    from simulations.bench.runner import Profile, Runner

NONE, SECAGG = "none", "secagg"
#: The inversion's reading for an image that carries no information (its random start).
CHANCE = "chance (random start)"


def dp_column(epsilon: float) -> str:
    return f"dp eps={epsilon:g}"


def privacy(profile: Profile, runner: Runner) -> pd.DataFrame:
    rows = membership(profile, runner) + inversion(profile, runner.out)
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per attack, setting and metric; one column per protection."""
    order = list(dict.fromkeys(rows["protection"]))
    table = rows.pivot_table(
        index=["attack", "setting", "metric"], columns="protection", values="value", sort=False
    )
    return table.reindex(columns=[c for c in order if c in table.columns]).reset_index()


def _config(profile: Profile, image_size: int, samples: int, seed: int) -> ClientConfig:
    values = {
        **default_run_config(),
        **profile.run_config(),
        "model": profile.privacy_model,
        "image-size": image_size,
        "synthetic-samples-per-site": samples,
        "seed": seed,
    }
    return from_run_config(ClientConfig, values)


def _images(split: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return split.images, split.labels


def _pool(sites: list[SiteSplits], *names: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_images(getattr(site, name)) for site in sites for name in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ----------------------------------------------------------------- membership inference
def membership(profile: Profile, runner: Runner) -> list[dict[str, Any]]:
    seed = profile.seeds[0]
    config = _config(profile, profile.image_size, profile.samples_per_site, seed)
    sites = [synthetic_site(i, profile.sites, config) for i in range(profile.sites)]
    members = _pool(sites, "train")
    non_members = _pool(sites, "validation", "test")
    task = get_task(config.model_config)
    reference = task.build_model()  # the round-0 global model the server sent
    source = (
        f"radfl simulate --in-memory, {profile.sites} sites x ~{profile.samples_per_site} "
        f"images at {profile.image_size} px, {profile.rounds} rounds x {profile.local_epochs} "
        f"epochs, {profile.privacy_model}; weights/final.pt of the MLflow run"
    )
    runs: list[tuple[str, dict[str, Any], str]] = [(NONE, {}, source)]
    dp_available = "dp-noise-multiplier" in default_run_config()
    for epsilon in profile.privacy_epsilons:
        if dp_available:
            sigma = _dp_sgd_noise(epsilon, sites, config, profile)
            settings = {"dp-noise-multiplier": sigma, "dp-delta": attacks.DELTA}
            runs.append((dp_column(epsilon), settings, f"{source}; DP-SGD, noise {sigma:.3g}"))
        else:
            runs.append((dp_column(epsilon), {}, ""))
    rows: list[dict[str, Any]] = []
    histograms: dict[str, attacks.MembershipResult] = {}
    for protection, settings, note in runs:
        if not note:
            rows += _membership_rows(protection, None, "", "not run: this tree has no DP-SGD "
                                     "(run config dp-noise-multiplier)")  # fmt: skip
            continue
        run = runner.run(
            "simulate",
            task="classification",
            model=profile.privacy_model,
            sites=profile.sites,
            rounds=profile.rounds,
            seed=seed,
            settings={**profile.run_config(), **settings},
            options=["--in-memory"],
        )
        dp_sgd = "dp-noise-multiplier" in settings
        model = _network(task, dp_sgd)
        local = run.client.download_artifacts(run.run_id, "weights/final.pt")
        model.load_state_dict(torch.load(local, weights_only=True))
        start = _network(task, dp_sgd) if dp_sgd else reference
        result = attacks.membership_inference(model, members, non_members, start)
        histograms[protection] = result
        spent = [v for k, v in run.metrics.items() if k.endswith("/dp-epsilon")]
        if spent:  # what the sites' own accountant says they spent (last round, MLflow)
            note = f"{note}; epsilon the sites report spent: at most {max(spent):.3g}"
        rows += _membership_rows(protection, result, run.run_id, note)
        if protection == NONE:  # SecAgg changes what the server sees, not the model released
            rows += _membership_rows(
                SECAGG, result, run.run_id, "the same final model as none: SecAgg hides the "
                "updates, not the released model",
            )  # fmt: skip
    _plot_membership(histograms, runner.out / "privacy_membership.png")
    return rows


def _network(task: Any, dp_sgd: bool) -> torch.nn.Module:
    """The run's initial global network; with DP-SGD the sites' and server's variant of it
    (``common.privacy.private_model``: GroupNorm for BatchNorm). Imported by name: that module
    comes with site DP-SGD, and this part runs without it."""
    model = task.build_model()
    if not dp_sgd:
        return model  # type: ignore[no-any-return]
    private_model = importlib.import_module("common.privacy").private_model
    return private_model(model)  # type: ignore[no-any-return]


def _dp_sgd_noise(
    epsilon: float, sites: list[SiteSplits], config: ClientConfig, profile: Profile
) -> float:
    """The DP-SGD noise multiplier for ``epsilon`` at every site: the smallest site samples the
    largest share of its data per step, so its accounting bounds the others'."""
    from opacus.accountants.utils import get_noise_multiplier

    batch = config.batch_size or 32  # 0: the classification task's own
    smallest = min(len(site.train) for site in sites)
    sample_rate = min(1.0, batch / smallest)
    steps = profile.rounds * profile.local_epochs * math.ceil(smallest / batch)
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=attacks.DELTA, sample_rate=sample_rate,
            steps=steps, alphas=attacks.RDP_ORDERS,
        )
    )  # fmt: skip


def _membership_rows(
    protection: str, result: attacks.MembershipResult | None, run_id: str, note: str
) -> list[dict[str, Any]]:
    rows = []
    for setting in ("loss threshold (Yeom 2018)", "calibrated by the initial model"):
        auc = None
        if result is not None:
            auc = result.loss_threshold if setting.startswith("loss") else result.calibrated
        rows.append(
            {
                "attack": "membership inference",
                "setting": setting,
                "protection": protection,
                "metric": "auc",
                "value": auc.auc if auc else float("nan"),
                "low": auc.low if auc else float("nan"),
                "high": auc.high if auc else float("nan"),
                "samples": f"{auc.members} members, {auc.non_members} non-members" if auc else "",
                "note": note,
                "run_id": run_id,
            }
        )
    return rows


def _plot_membership(results: dict[str, attacks.MembershipResult], path: Path) -> None:
    if not results:
        return
    figure, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3), squeeze=False)
    for axis, (protection, result) in zip(axes[0], results.items(), strict=True):
        losses = np.concatenate([result.member_loss, result.non_member_loss])
        low, high = np.quantile(losses, [0.0, 0.99])
        bins = np.linspace(float(low), max(float(high), float(low) + 1e-6), 30)
        axis.hist(result.member_loss, bins=bins, alpha=0.6, density=True, label="members (train)")
        axis.hist(result.non_member_loss, bins=bins, alpha=0.6, density=True,
                  label="non-members (validation, test)")  # fmt: skip
        axis.set_title(f"{protection}: attack AUC {result.loss_threshold.auc:.3f}")
        axis.set_xlabel("cross-entropy loss of the final model")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------- gradient inversion
def inversion(profile: Profile, out: Path) -> list[dict[str, Any]]:
    seed = profile.seeds[0]
    size = profile.inversion_image_size
    config = _config(profile, size, 16, seed)
    sites = [synthetic_site(i, profile.secagg_sites, config) for i in range(profile.secagg_sites)]
    task = get_task(config.model_config)
    model = task.build_model()  # the round-1 global model
    settings = attacks.InversionSettings(iterations=profile.inversion_iterations, seed=seed)
    base_note = (
        f"{profile.privacy_model} at {size} px, untrained (round 1), one SGD step per site, "
        f"batch norm with frozen statistics; Adam {settings.iterations} iterations, "
        f"TV weight {settings.tv_weight}"
    )
    rows: list[dict[str, Any]] = []
    for batch in profile.inversion_batch_sizes:
        started = time.monotonic()
        batches = [_images(site.train) for site in sites]
        batches = [(images[:batch], labels[:batch]) for images, labels in batches]
        true_images, true_labels = batches[0]
        update = attacks.site_update(model, true_images, true_labels, config.learning_rate)
        clip_norm = attacks.update_norm(update)
        generator = torch.Generator().manual_seed(seed)
        observed: dict[str, tuple[list[torch.Tensor], int, str]] = {
            NONE: (update, 1, "one site's update"),
        }
        for epsilon in profile.privacy_epsilons:
            sigma = attacks.noise_multiplier(epsilon, rounds=1)
            noisy = attacks.clip_and_noise(
                update, clip_norm=clip_norm, noise_multiplier=sigma, generator=generator
            )
            observed[dp_column(epsilon)] = (
                noisy, 1, f"update-level DP, 1 round, noise {sigma:.3g} x clip norm added at "
                "the site (clip norm = this update's norm: any smaller clip gives the same "
                "signal-to-noise ratio)",
            )  # fmt: skip
        summed = attacks.secure_sum(
            [attacks.site_update(model, x, y, config.learning_rate) for x, y in batches]
        )
        observed[SECAGG] = (
            summed, len(sites), f"sum of {len(sites)} sites' updates (batch {batch} each), "
            f"attacked as {len(sites) * batch} images; best match to site 0's images",
        )  # fmt: skip
        reconstructions = {}
        shape = tuple(true_images.shape[1:])
        # What SSIM and PSNR read for no information at all: the attacker's random start.
        start = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))
        rows += _inversion_rows(
            batch, CHANCE, attacks.best_matches(start, true_images),
            f"the attack's random starting image, before any iteration; {base_note}",
        )  # fmt: skip
        for protection, (seen, groups, note) in observed.items():
            if groups == 1 and batch == 1:
                labels = torch.tensor([attacks.infer_label(model, seen)])
                label_note = "label inferred (iDLG)" + (
                    "" if int(labels[0]) == int(true_labels[0]) else ", wrongly"
                )
            else:
                labels = torch.cat([y for _, y in batches[:groups]])
                label_note = "labels known"
            reconstructed = attacks.invert_gradients(model, seen, labels, shape, batch, settings)
            matches = attacks.best_matches(reconstructed, true_images)
            reconstructions[protection] = (reconstructed, matches)
            rows += _inversion_rows(
                batch, protection, matches, f"{note}; {label_note}; {base_note}"
            )
        print(f"[radfl] privacy: inversion batch {batch} ({time.monotonic() - started:.0f} s)",
              flush=True)  # fmt: skip
        _plot_inversion(true_images, reconstructions, out / f"privacy_inversion_batch{batch}.png")
    return rows


def _inversion_rows(
    batch: int, protection: str, matches: list[attacks.Similarity], note: str
) -> list[dict[str, Any]]:
    """Mean SSIM and PSNR over the true images (low and high: the worst and best image)."""
    rows = []
    for metric in ("ssim", "psnr"):
        values = [getattr(m, metric) for m in matches]
        rows.append(
            {
                "attack": "gradient inversion (Geiping 2020)",
                "setting": f"batch {batch}",
                "protection": protection,
                "metric": metric,
                "value": float(np.mean(values)),
                "low": float(np.min(values)),
                "high": float(np.max(values)),
                "samples": f"{len(values)} true images",
                "note": note,
                "run_id": "",
            }
        )
    return rows


def _plot_inversion(
    true_images: torch.Tensor,
    reconstructions: dict[str, tuple[torch.Tensor, list[attacks.Similarity]]],
    path: Path,
) -> None:
    """Site 0's true images (top row) and, per protection, the reconstruction best matching
    each of them, shown on the true image's grey scale."""
    columns = len(true_images)
    rows = 1 + len(reconstructions)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows), squeeze=False)
    for column, image in enumerate(true_images):
        low, high = float(image.min()), float(image.max())
        axes[0][column].imshow(image[0], cmap="gray", vmin=low, vmax=high)
        axes[0][column].set_title("true", fontsize=8)
        for row, (protection, (images, matches)) in enumerate(reconstructions.items(), start=1):
            best = max(
                range(len(images)),
                key=lambda k: attacks.image_similarity(images[k], image).ssim,
            )
            axes[row][column].imshow(images[best][0], cmap="gray", vmin=low, vmax=high)
            axes[row][column].set_title(
                f"{protection}\nSSIM {matches[column].ssim:.2f}", fontsize=8
            )
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
