"""``radfl site check``: every problem reported by CSV line and file, counts, exit status.

The sites are tiny and written to ``tmp_path``; real broken files come from pydicom's wheel
(``MR_truncated.dcm``, the SR document ``reportsi.dcm``) and nibabel's test data (a 4D volume).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from client import check
from client.check import (
    CheckReport,
    Problem,
    add_arguments,
    check_site,
    load_checked_site,
    site_check,
    sniff_format,
)
from client.data import SiteDataError
from tests.client.test_data import (
    NIBABEL_DATA,
    bundled_dicom,
    replace_keeping_size_and_mtime,
    rng,
    write_dicom,
    write_manifest,
    write_nifti,
    write_png,
    write_series,
)

HEADER = "image,patient_id,study_id,label,sex,mask"


def _volume(seed: int, shape: tuple[int, ...] = (16, 16, 16)) -> np.ndarray:
    return rng(seed).normal(size=shape).astype(np.float32)


def _broken_site(root: Path) -> None:
    """One of each problem the issue names, on lines 3 to 8 (line 2 is clean)."""
    write_nifti(root / "ok.nii.gz", _volume(0))
    ct = bundled_dicom("CT_small.dcm").read_bytes()
    (root / "truncated.dcm").write_bytes(ct[: len(ct) - 16000])  # cut inside the pixel data
    (root / "notes.dcm").write_text("radiologist notes, not an image\n")
    nan_volume = _volume(1)
    nan_volume[3, 4, 5] = np.nan
    write_nifti(root / "nan.nii.gz", nan_volume)
    write_nifti(root / "masked.nii.gz", _volume(2))
    write_nifti(root / "masked_mask.nii.gz", np.zeros((16, 16, 12), np.uint8))
    write_nifti(root / "second.nii.gz", _volume(3))
    # The mask column is optional in classification; the check still compares mask shapes.
    write_manifest(
        root,
        HEADER,
        "ok.nii.gz,p1,s1,0,F,",  # line 2
        "truncated.dcm,p2,s2,1,M,",  # line 3
        "notes.dcm,p3,s3,0,F,",  # line 4
        "missing.nii.gz,p4,s4,1,M,",  # line 5
        "nan.nii.gz,p5,s5,0,F,",  # line 6
        "masked.nii.gz,p6,s6,1,M,masked_mask.nii.gz",  # line 7
        "second.nii.gz,p1,s7,1,M,",  # line 8: p1 was F on line 2
    )


def _clean_site(root: Path) -> None:
    write_series(root / "series", rng(0).integers(900, 1200, size=(16, 16, 16)), sex="F")
    write_nifti(root / "b.nii.gz", _volume(1))
    write_nifti(root / "c.nii", _volume(2))
    np.save(root / "d.npy", _volume(3))
    write_manifest(
        root,
        "image,patient_id,study_id,label,sex,age,scanner_room",
        "series,p1,s1,1,,,A",  # sex, age (063Y), manufacturer and modality from DICOM tags
        "b.nii.gz,p2,s2,0,M,35,A",
        "c.nii,p3,s3,1,F,45,B",
        "d.npy,p4,s4,0,M,,B",
    )


def _args(root: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(root), *extra])


def _by_line(report: CheckReport) -> dict[int | None, list[Problem]]:
    found: dict[int | None, list[Problem]] = {}
    for problem in report.problems:
        found.setdefault(problem.line, []).append(problem)
    return found


def test_every_problem_is_reported_by_line_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _broken_site(tmp_path)
    report_path = tmp_path / "out" / "report.json"
    status = site_check(_args(tmp_path, "--dims", "3", "--report", str(report_path)))
    out = capsys.readouterr().out
    assert status == 1

    expected = [
        "line 3: truncated.dcm: truncated DICOM pixel data (expected 32768 bytes, found 16906)",
        "line 4: notes.dcm: not a DICOM file despite its extension (looks like text)",
        "line 5: missing.nii.gz: file not found",
        "line 6: nan.nii.gz: 1 NaN and 0 infinite voxels",
        "line 7: masked_mask.nii.gz: mask shape 16×16×12 differs from the image's 16×16×16",
        "line 2: ok.nii.gz: patient p1 has conflicting sex: F on line(s) 2; M on line(s) 8",
        "line 8: second.nii.gz: patient p1 has conflicting sex: F on line(s) 2; M on line(s) 8",
    ]
    for line in expected:
        assert line in out
    assert f"report written to {report_path}" in out
    assert "7 rows, 0 usable" in out

    saved = json.loads(report_path.read_text())
    assert saved["ok"] is False
    kinds = {(p["line"], p["file"], p["kind"]) for p in saved["problems"]}
    assert kinds == {
        (2, "ok.nii.gz", "conflicting-subgroup"),
        (3, "truncated.dcm", "truncated"),
        (4, "notes.dcm", "wrong-format"),
        (5, "missing.nii.gz", "missing-file"),
        (6, "nan.nii.gz", "non-finite"),
        (7, "masked_mask.nii.gz", "mask-shape"),
        (8, "second.nii.gz", "conflicting-subgroup"),
    }
    assert CheckReport.from_json(report_path.read_text()) == check_site(
        tmp_path, task="classification", spatial_dims=3, num_classes=2
    )


def test_clean_site_exits_zero_with_class_and_subgroup_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _clean_site(tmp_path)
    assert site_check(_args(tmp_path, "--dims", "3")) == 0
    out = capsys.readouterr().out
    assert "4 rows, 4 usable, 0 problem(s)" in out
    assert "class counts (usable rows):" in out
    assert "  class 0  2" in out and "  class 1  2" in out
    assert "subgroup counts (usable rows):" in out
    assert "sex           F 2, M 2" in out
    assert "age           <40 1, 40-59 1, 60+ 1, unknown 1" in out
    assert "manufacturer  ACME 1, unknown 3" in out
    assert "modality      CT 1, unknown 3" in out
    assert "scanner_room  A 2, B 2" in out

    saved = json.loads((tmp_path / "radfl-check.json").read_text())
    assert saved["ok"] is True and saved["problems"] == []
    assert saved["class_counts"] == {"0": 2, "1": 2}
    assert saved["subgroup_counts"]["sex"] == {"F": 2, "M": 2}


def test_progress_is_reported(tmp_path: Path) -> None:
    _clean_site(tmp_path)
    calls: list[tuple[int, int]] = []
    check_site(
        tmp_path,
        task="classification",
        spatial_dims=3,
        num_classes=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def _single_problem(root: Path, line: str, *, dims: int = 2, num_classes: int = 2) -> Problem:
    write_manifest(root, "image,patient_id,study_id,label,modality", line)
    report = check_site(root, task="classification", spatial_dims=dims, num_classes=num_classes)
    assert len(report.problems) == 1, report.format_text()
    assert report.problems[0].line == 2
    return report.problems[0]


def test_real_truncated_dicom_from_pydicom(tmp_path: Path) -> None:
    shutil.copy(bundled_dicom("MR_truncated.dcm"), tmp_path / "mr.dcm")
    problem = _single_problem(tmp_path, "mr.dcm,p1,s1,0,")
    assert problem.kind == "truncated"
    assert problem.message == "truncated DICOM pixel data (expected 8192 bytes, found 8130)"


def test_dicom_cut_before_its_pixel_data(tmp_path: Path) -> None:
    (tmp_path / "cut.dcm").write_bytes(bundled_dicom("CT_small.dcm").read_bytes()[:600])
    problem = _single_problem(tmp_path, "cut.dcm,p1,s1,0,")
    assert problem.kind == "no-pixel-data"
    assert "truncated file" in problem.message


def test_structured_report_is_an_unsupported_modality(tmp_path: Path) -> None:
    shutil.copy(bundled_dicom("reportsi.dcm"), tmp_path / "sr.dcm")
    write_manifest(tmp_path, "image,patient_id,study_id,label", "sr.dcm,p1,s1,0")
    report = check_site(tmp_path, task="classification", spatial_dims=2, num_classes=2)
    kinds = {p.kind: p.message for p in report.problems}
    assert kinds["modality"].startswith("modality SR is not supported")
    assert "no-pixel-data" in kinds
    assert {p.line for p in report.problems} == {2}


def test_manifest_modality_contradicting_the_dicom_tag(tmp_path: Path) -> None:
    shutil.copy(bundled_dicom("CT_small.dcm"), tmp_path / "ct.dcm")
    problem = _single_problem(tmp_path, "ct.dcm,p1,s1,0,MR")
    assert problem.message == "manifest modality MR contradicts the DICOM tag CT"


@pytest.mark.parametrize(
    ("name", "dims", "kind", "message"),
    [
        ("png_as_nifti", 3, "wrong-format", "not a gzipped NIfTI file despite its extension"),
        ("volume_for_2d", 2, "dimensionality", "3D image (16×16×16) for a 2D task"),
        ("image_for_3d", 3, "dimensionality", "2D image (16×16) for a 3D task"),
        ("single_slice", 3, "dimensionality", "single-slice volume (16×16×1) for a 3D task"),
        ("colour_png", 2, "channels", "colour image; the networks take one grey channel"),
        ("inf_npy", 2, "non-finite", "0 NaN and 2 infinite voxels"),
        ("empty_png", 2, "wrong-format", "(looks like an empty file)"),
    ],
)
def test_image_problems(tmp_path: Path, name: str, dims: int, kind: str, message: str) -> None:
    file = {
        "png_as_nifti": "x.nii.gz",
        "volume_for_2d": "x.nii.gz",
        "image_for_3d": "x.png",
        "single_slice": "x.nii.gz",
        "colour_png": "x.png",
        "inf_npy": "x.npy",
        "empty_png": "x.png",
    }[name]
    path = tmp_path / file
    if name == "png_as_nifti":
        write_png(tmp_path / "real.png", np.zeros((8, 8)))
        shutil.copy(tmp_path / "real.png", path)
    elif name == "volume_for_2d":
        write_nifti(path, _volume(0))
    elif name == "image_for_3d":
        write_png(path, rng().integers(0, 255, size=(16, 16)))
    elif name == "single_slice":
        write_nifti(path, _volume(0, (16, 16, 1)))
    elif name == "colour_png":
        write_png(path, rng().integers(0, 255, size=(16, 16, 3)))
    elif name == "inf_npy":
        array = _volume(0, (16, 16))
        array[0, :2] = np.inf
        np.save(path, array)
    elif name == "empty_png":
        path.write_bytes(b"")
    problem = _single_problem(tmp_path, f"{file},p1,s1,0,", dims=dims)
    assert (problem.file, problem.kind) == (file, kind)
    assert message in problem.message


def test_nibabel_4d_volume_has_too_many_channels(tmp_path: Path) -> None:
    shutil.copy(NIBABEL_DATA / "example4d.nii.gz", tmp_path / "fmri.nii.gz")
    problem = _single_problem(tmp_path, "fmri.nii.gz,p1,s1,0,MR", dims=3)
    assert problem.kind == "channels"
    assert problem.message.startswith("2 channels")


def test_label_duplicate_and_value_problems(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / f"{i}.png", rng(i).integers(0, 255, size=(16, 16)))
    write_manifest(
        tmp_path,
        "image,patient_id,study_id,label,sex,age",
        "0.png,p1,s1,0,F,50",  # line 2
        "0.png,p1,s1,0,F,50",  # line 3: same row
        "0.png,p2,s2,1,M,50",  # line 4: same image
        "1.png,p3,s3,2,M,50",  # line 5: label out of range
        "2.png,p4,s4,0.5,male,old",  # line 6: label, sex and age
        ",p5,s5,1,F,50",  # line 7: no image
    )
    report = check_site(tmp_path, task="classification", spatial_dims=2, num_classes=2)
    messages = {(p.line, p.message) for p in report.problems}
    assert messages == {
        (3, "duplicate of line 2 (every cell equal)"),
        (4, "image also listed on line 2"),
        (5, "label 2 outside [0, 2)"),
        (6, "label '0.5' is not an integer"),
        (6, "sex 'male' is not one of F, M, O"),
        (6, "age 'old' is not a number of years"),
        (7, "empty image"),
    }
    assert report.class_counts == {"0": 1, "1": 0}  # usable rows only: line 2


def test_segmentation_mask_values_and_conflicting_age(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", _volume(0))
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[2, 2, 2] = 3
    write_nifti(tmp_path / "a_mask.nii.gz", mask)
    write_nifti(tmp_path / "b_mask.nii.gz", np.ones((16, 16, 16), np.uint8))
    write_manifest(
        tmp_path,
        "image,patient_id,study_id,mask,age",
        "a.nii.gz,p1,s1,a_mask.nii.gz,60",
        "a.nii.gz,p1,s1,b_mask.nii.gz,61",
    )
    report = check_site(tmp_path, task="segmentation", spatial_dims=3, num_classes=2)
    lines = [p.format() for p in report.problems]
    assert "line 2: a_mask.nii.gz: mask values 3 outside [0, 2)" in lines
    assert "line 3: a.nii.gz: image also listed on line 2" in lines
    conflict = "study s1 has conflicting age: 60 on line(s) 2; 61 on line(s) 3"
    assert f"line 2: a.nii.gz: {conflict}" in lines
    assert f"line 3: a.nii.gz: {conflict}" in lines


def test_missing_manifest_or_columns_fail_the_whole_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert site_check(_args(tmp_path)) == 1
    assert "manifest.csv: site manifest not found" in capsys.readouterr().out
    write_manifest(tmp_path, "image,patient_id", "a.png,p1")
    report = check_site(tmp_path, task="classification", spatial_dims=2, num_classes=2)
    assert [p.line for p in report.problems] == [None]
    assert "missing column(s) study_id, label" in report.problems[0].message
    with pytest.raises(SiteDataError, match="does not exist"):
        check_site(tmp_path / "nowhere", task="classification", spatial_dims=2, num_classes=2)


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"\x00" * 128 + b"DICM", "dicom"),
        (b"\x89PNG\r\n\x1a\n....", "png"),
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"\x93NUMPY\x01\x00", "npy"),
        ((348).to_bytes(4, "little") + b"\x00" * 340 + b"n+1\x00", "nifti"),
        (b"\x1f\x8b\x08\x00garbage", "gzip"),
        (b"patient,label\n", "text"),
        (b"\x00\x01\x02\xff", "unknown"),
    ],
)
def test_sniff_format(tmp_path: Path, content: bytes, kind: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(content)
    assert sniff_format(path) == kind


# ---------------------------------------------------------------------------------------------
# Training's entry point
# ---------------------------------------------------------------------------------------------


def _png_site(root: Path, *, bad: int = 0) -> None:
    rows = []
    for i in range(4):
        write_png(root / f"{i}.png", rng(i).integers(0, 255, size=(16, 16)))
        rows.append(f"{i}.png,p{i},s{i},{i % 2}")
    for i in range(bad):
        (root / f"bad{i}.png").write_text("oops")
        rows.append(f"bad{i}.png,q{i},t{i},0")
    write_manifest(root, "image,patient_id,study_id,label", *rows)


def _load(root: Path, *, skip_bad_rows: bool) -> tuple[pd.DataFrame, CheckReport]:
    return load_checked_site(
        root,
        task="classification",
        spatial_dims=2,
        num_classes=2,
        image_size=8,
        skip_bad_rows=skip_bad_rows,
    )


def test_training_refuses_a_failing_site_with_the_same_messages(tmp_path: Path) -> None:
    _png_site(tmp_path, bad=1)
    line = "line 6: bad0.png: not a PNG file despite its extension (looks like text)"
    with pytest.raises(SiteDataError, match="skip bad rows") as refused:
        _load(tmp_path, skip_bad_rows=False)
    assert line in str(refused.value)

    rows, report = _load(tmp_path, skip_bad_rows=True)
    assert list(rows.index) == [2, 3, 4, 5]
    assert [p.format() for p in report.problems] == [line]
    assert rows["modality"].tolist() == [""] * 4  # subgroup columns are always present


def test_a_site_without_usable_rows_is_refused(tmp_path: Path) -> None:
    write_manifest(tmp_path, "image,patient_id,study_id,label", "gone.png,p1,s1,0")
    with pytest.raises(SiteDataError, match="no usable samples"):
        _load(tmp_path, skip_bad_rows=True)
    write_manifest(tmp_path, "image,patient_id,study_id,label")
    with pytest.raises(SiteDataError, match="the manifest has no data rows"):
        _load(tmp_path, skip_bad_rows=True)


def test_later_rounds_reuse_the_check_and_the_preprocessed_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.data import SiteDataset

    _png_site(tmp_path)
    rows, first = _load(tmp_path, skip_bad_rows=False)
    assert first.ok
    dataset = SiteDataset(rows, tmp_path, task="classification", spatial_dims=2, image_size=8)
    _ = [dataset[i] for i in range(len(dataset))]
    assert dataset.decode_count == 0  # the check filled the cache

    def no_check(*args: object, **kwargs: object) -> CheckReport:
        raise AssertionError("the site was checked again")

    monkeypatch.setattr(check, "check_site", no_check)
    again, second = _load(tmp_path, skip_bad_rows=False)
    assert second == first and list(again.index) == list(rows.index)

    # A changed image invalidates the stored check.
    (tmp_path / "0.png").write_text("overwritten")
    with pytest.raises(AssertionError, match="checked again"):
        _load(tmp_path, skip_bad_rows=False)


def test_preprocessing_failures_are_reported_by_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client import data

    _png_site(tmp_path)
    original = data._ByModality.__call__

    def fail_on_one(self: data._ByModality, item: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if str(item["image"]).endswith("1.png"):
            raise ValueError("resampling exploded")
        return original(self, item)

    monkeypatch.setattr(data._ByModality, "__call__", fail_on_one)
    rows, report = _load(tmp_path, skip_bad_rows=True)
    assert list(rows.index) == [2, 4, 5]
    assert [p.format() for p in report.problems] == [
        "line 3: 1.png: preprocessing failed: ValueError: resampling exploded"
    ]
    assert report.class_counts == {"0": 2, "1": 1}


def test_dicom_header_fills_subgroups_in_the_check(tmp_path: Path) -> None:
    write_dicom(tmp_path / "a.dcm", rng().integers(900, 1100, size=(16, 16)), sex="M", age="045Y")
    shutil.copy(bundled_dicom("CT_small.dcm"), tmp_path / "b.dcm")
    write_manifest(tmp_path, "image,patient_id,study_id,label", "a.dcm,p1,s1,0", "b.dcm,p2,s2,1")
    report = check_site(tmp_path, task="classification", spatial_dims=2, num_classes=2)
    assert report.ok, report.format_text()
    assert report.subgroup_counts == {
        "sex": {"M": 1, "O": 1},
        "age": {"<40": 1, "40-59": 1},
        "manufacturer": {"ACME": 1, "GE MEDICAL SYSTEMS": 1},
        "modality": {"CT": 2},
    }


def test_a_file_replaced_with_size_and_mtime_kept_is_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    for i in range(2):
        np.save(site / f"{i}.npy", _volume(i, (20, 20)))
    write_manifest(site, "image,patient_id,study_id,label", "0.npy,p0,s0,0", "1.npy,p1,s1,1")
    _load(site, skip_bad_rows=False)
    replacement = tmp_path / "other.npy"
    np.save(replacement, _volume(9, (20, 20)))
    replace_keeping_size_and_mtime(site / "0.npy", replacement.read_bytes(), in_place=False)

    def no_check(*args: object, **kwargs: object) -> CheckReport:
        raise AssertionError("the site was checked again")

    monkeypatch.setattr(check, "check_site", no_check)
    with pytest.raises(AssertionError, match="checked again"):
        _load(site, skip_bad_rows=False)
