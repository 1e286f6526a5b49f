"""The registered model as an MLflow pyfunc: ``mlflow models serve`` and
``mlflow.pyfunc.load_model`` answer with the fields of ``radfl predict``.

The coordinator logs the model with this module as its ``python_function`` loader
(``server/tracking.py``; the ``pytorch`` flavour stays for ``mlflow.pytorch.load_model``). A
request holds, per study, one of:

- ``path``: a file or DICOM series folder the serving machine can read;
- ``content``: the file's bytes, base64-encoded, with ``name`` giving its suffix (``.dcm`` when
  absent), e.g. a DICOM posted over HTTP;
- or the whole input is an array: one raw image (or a batch of them, first axis), preprocessed
  as a NumPy file would be.

The answer has one row per study: ``input``, ``modality``, the task's fields (classification:
``p_<class>``, ``label``, ``uncertainty``; segmentation: ``foreground_voxels`` and ``mask`` as
nested lists on the input's grid; detection and instance segmentation: ``num_boxes``,
``max_score`` and ``boxes``, the list ``radfl predict`` writes as JSON, with the instance map
as ``mask`` for instances) and ``error`` (empty, or why that study failed).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client import predict


class ServedModel:
    """What MLflow's pyfunc wrapper calls ``predict`` on."""

    def __init__(self, model: predict.LoadedModel) -> None:
        self.model = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        with tempfile.TemporaryDirectory(prefix="radfl-serve-") as folder:
            work = Path(folder)
            studies, failed = _studies(model_input, work, self.model.task)
            table, failed_now = predict.predict(self.model, studies, work / "out", progress=False)
            # An upload's reason names it as sent, not by the temporary file it was saved to.
            uploads = {str(study.path): study.name for study in studies}
            failed_now = [(name, _renamed(reason, uploads)) for name, reason in failed_now]
            if "mask" in table.columns:
                table["mask"] = [_mask_lists(Path(p)) for p in table["mask"]]
            if "boxes" in table.columns:
                table["boxes"] = [json.loads(Path(p).read_text())["boxes"] for p in table["boxes"]]
            # Files in the temporary folder mean nothing to the caller.
            table = table.drop(columns=["dicom_seg", "overlay"], errors="ignore")
        errors = pd.DataFrame(
            [{"input": name, "error": reason} for name, reason in failed + failed_now]
        )
        table["error"] = ""
        return pd.concat([table, errors], ignore_index=True).fillna({"error": ""})


def _mask_lists(path: Path) -> list[Any]:
    """A written NIfTI mask as nested lists (the answer is JSON)."""
    import nibabel as nib

    image = nib.load(str(path))
    if not isinstance(image, nib.Nifti1Image):
        raise TypeError(f"{path}: not a NIfTI-1 mask")
    return np.asarray(image.dataobj, dtype=np.uint8).tolist()  # type: ignore[no-any-return]


def _studies(
    model_input: Any, work: Path, task: str
) -> tuple[list[predict.Study], list[tuple[str, str]]]:
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        arrays = np.asarray(model_input, dtype=np.float32)
        arrays = arrays if arrays.ndim > 2 else arrays[None]
        paths = []
        for index, array in enumerate(arrays):
            paths.append(work / f"array-{index}.npy")
            np.save(paths[-1], np.squeeze(array))
        found, bad = predict.collect_studies(paths, task)
        return [predict.Study(s.path, s.path.stem, s.modality) for s in found], bad
    studies: list[predict.Study] = []
    failed: list[tuple[str, str]] = []
    for index, record in enumerate(model_input.to_dict("records")):
        row = {key: _given(value) for key, value in record.items()}
        if row.get("path"):
            found, bad = predict.collect_studies([Path(row["path"])], task)
        elif row.get("content"):
            name = row.get("name") or f"study-{index}.dcm"
            suffix = "".join(Path(name).suffixes) or ".dcm"
            path = work / f"upload-{index}{suffix}"
            try:
                path.write_bytes(base64.b64decode(row["content"], validate=True))
            except (binascii.Error, ValueError) as exc:
                failed.append((name, f"content is not base64: {exc}"))
                continue
            found, bad = predict.collect_studies([path], task)
            found = [predict.Study(s.path, name, s.modality) for s in found]
            bad = [(name, reason) for _, reason in bad]
        else:
            found, bad = [], [(f"row {index}", "neither 'path' nor 'content' given")]
        studies += found
        failed += bad
    return studies, failed


def _renamed(reason: str, names: dict[str, str]) -> str:
    for path, name in names.items():
        reason = reason.replace(path, name)
    return reason


def _given(value: Any) -> str:
    """A request cell as text; empty where absent (a table fills missing cells with NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _load_pyfunc(data_path: str, model_config: Any = None) -> ServedModel:
    """MLflow's entry point: ``data_path`` is the model's ``data`` folder, beside ``MLmodel``."""
    return ServedModel(predict.load_model(str(Path(data_path).parent)))
