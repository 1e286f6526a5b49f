"""The dataset types a site's trainer reads: in-memory samples, pooled sites, augmentation.

Below both ``client.site`` (which builds a site's splits from them) and ``client.trainer``
(which trains on them), so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import pandas as pd
import torch
from torch.utils.data import ConcatDataset, Dataset


class LabelledDataset(Protocol):
    """A dataset of ``{"image", "label"}`` samples whose labels are known without decoding.

    ``attributes``, when not ``None``, is a table aligned with the samples holding
    ``patient_id`` and the subgroup columns (sex, age, manufacturer, ...) for the bias report.
    """

    labels: torch.Tensor
    attributes: pd.DataFrame | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class SampleDataset(Dataset[dict[str, Any]]):
    """Images and labels held in memory (synthetic sites, tests).

    ``labels`` are image-level classes (for class weights and balanced sampling); a sample's
    ``"label"`` is ``targets[i]`` when targets are given (segmentation masks), else
    ``labels[i]``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        attributes: pd.DataFrame | None = None,
        targets: torch.Tensor | Sequence[Any] | None = None,
        lesions: torch.Tensor | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if attributes is not None and len(attributes) != len(labels):
            raise ValueError(f"{len(labels)} samples but {len(attributes)} attribute rows")
        if targets is not None and len(targets) != len(labels):
            raise ValueError(f"{len(labels)} samples but {len(targets)} targets")
        self.images = images
        self.labels = labels
        self.attributes = None if attributes is None else attributes.reset_index(drop=True)
        self.targets = targets
        #: Lesion masks for the final evaluation's attention (``Task.lesion_masks``).
        self.lesions = lesions

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        target = self.labels[index] if self.targets is None else self.targets[index]
        item = {"image": self.images[index], "label": target}
        if self.lesions is not None:
            item["lesion"] = self.lesions[index]
        return item


class ConcatLabelled(ConcatDataset[dict[str, Any]]):
    """Several labelled datasets as one, for training: pooled sites (centralized training) or a
    site's labelled and pseudo-labelled studies. Keys only the final evaluation reads
    (``EVALUATION_ONLY``) are dropped: one part may carry them and another not (a site with
    lesion masks beside one without, pseudo-labelled studies), and a batch mixing both would
    not collate."""

    EVALUATION_ONLY = frozenset({"lesion"})

    def __init__(self, datasets: list[LabelledDataset]) -> None:
        super().__init__(datasets)  # type: ignore[arg-type]
        self.labels = torch.cat([d.labels for d in datasets])
        tables = [d.attributes for d in datasets]
        self.attributes = (
            None if any(t is None for t in tables) else pd.concat(tables, ignore_index=True)  # type: ignore[arg-type]
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        return {k: v for k, v in sample.items() if k not in self.EVALUATION_ONLY}


class Augmented(Dataset[dict[str, Any]]):
    """A dataset whose samples pass through random MONAI transforms (training only)."""

    def __init__(self, base: LabelledDataset, transform: Any) -> None:
        self.base = base
        self.labels = base.labels
        self.attributes = base.attributes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.transform(dict(self.base[index]))
        # MONAI returns MetaTensors; the model and collation need plain tensors.
        for key, value in sample.items():
            if hasattr(value, "as_tensor"):
                sample[key] = value.as_tensor()
        sample["image"] = sample["image"].float()
        return sample


class Splits(Protocol):
    """A site's training and validation parts (``client.site.SiteSplits``)."""

    @property
    def train(self) -> LabelledDataset: ...

    @property
    def validation(self) -> LabelledDataset: ...
