"""``radfl site check DIR``: decode every image of a site and report each problem by row and file.

The check reads the manifest (``common.manifest``) and decodes every image's pixel data, and
every mask's, with the loader's own readers (``client.data.decode_image``), so a site that passes
also loads. It never stops at the first problem and never crashes on a bad file: each problem
becomes a ``Problem`` with its CSV line (header = line 1) and file. It reports

* missing values in required columns, paths that leave the site folder, missing files;
* files that are not what their extension says, from their first bytes: ``DICM`` at byte 128
  (DICOM), the PNG and JPEG signatures, the gzip magic of ``.nii.gz`` and the NIfTI header size
  (348 or 540) inside, the ``.npy`` magic;
* unreadable, corrupt or truncated files: DICOM pixel data shorter than its header promises, a
  DICOM without pixel data, and anything the reader raises while decoding;
* wrong dimensionality (2D image for a 3D task and vice versa, single-slice volumes for a 3D
  task), wrong channel count (colour images, 4D volumes), modalities the loader does not
  normalise (``client.data.SUPPORTED_MODALITIES``; SR, PR...), and a manifest modality that
  contradicts the DICOM tag;
* NaN or infinite voxels;
* labels that are not integers in ``[0, num_classes)`` (or, multi-label, not one 0/1 flag per
  finding), blank labels (an unlabelled study: usable only with pseudo-labelling), sex values
  other than F/M/O, ages that are not numbers; segmentation mask values outside
  ``[0, num_classes)``; detection boxes that are not ``[x0, y0, (z0,) x1, y1, (z1,) class]``
  inside the image;
* masks (``mask``, ``instance_mask`` columns, whenever present, whatever the task) whose shape
  differs from their image's;
* duplicate rows (every cell equal, or the same image listed twice; the first stays usable);
* patients whose rows disagree on sex, and studies whose rows disagree on age: every row of
  such a patient or study is reported, since the check cannot tell which one is right.

Subgroup values empty in the manifest come from the DICOM header (``fill_subgroups_from_dicom``).
Class and subgroup counts are over usable rows (rows without a problem).

``load_checked_site`` is what training calls: it refuses a site whose check fails, with the same
messages, unless the site opted into skipping bad rows; it never returns zero rows. Its result is
stored under the site's cache folder, keyed by the manifest, every named file's stamp (size,
modification time, inode, status-change time: ``data.file_stamp``) and the settings, so later
rounds neither check nor decode again.

The parts live by role: ``client.check_report`` (the report model), ``client.check_rows`` (one
row), ``client.check_formats`` (byte-level sniffing), ``client.check_tables`` (rows against rows,
counts); this module runs them, stores the result for training and holds the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import Progress as ProgressBar

from client import data
from client.check_formats import sniff_format
from client.check_report import (
    _CHECK_VERSION,
    REPORT_NAME,
    CheckReport,
    Problem,
    Progress,
    _short,
    _site_message,
)
from client.check_rows import UNLABELLED, _RowChecker, age_band
from client.check_tables import (
    _class_counts,
    _conflict_problems,
    _duplicate_problems,
    _subgroup_counts,
)
from client.data import SiteDataError
from common import manifest as mf
from common.tasks import list_tasks

log = logging.getLogger(__name__)

__all__ = [
    "REPORT_NAME",
    "CheckReport",
    "Problem",
    "Progress",
    "add_arguments",
    "age_band",
    "check_site",
    "load_checked_site",
    "site_check",
    "sniff_format",
]


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


def check_site(
    root: Path,
    *,
    task: str,
    spatial_dims: int,
    num_classes: int,
    progress: Progress | None = None,
) -> CheckReport:
    """Check every row of the site at ``root``; decode every image and mask.

    Parameters
    ----------
    progress
        Called as ``progress(done, total)`` after each row (the CLI prints every 10 %).

    Raises
    ------
    SiteDataError
        Only for bad arguments (unknown task, ``spatial_dims`` not 2 or 3, ``num_classes`` < 1)
        or a ``root`` that is not a folder; problems of the site's data are reported instead.
    """
    root = Path(root)
    _check_arguments(root, task, spatial_dims, num_classes)
    report = CheckReport(
        root=str(root), task=task, spatial_dims=spatial_dims, num_classes=num_classes, rows=0
    )
    try:
        raw = data.read_manifest(root, task)
    except SiteDataError as exc:
        report.problems.append(Problem(None, mf.MANIFEST_NAME, "manifest", _site_message(exc)))
        return report
    report.rows = len(raw)
    if raw.empty:
        report.problems.append(
            Problem(None, mf.MANIFEST_NAME, "manifest", "the manifest has no data rows")
        )
        return report
    table = data.fill_subgroups_from_dicom(raw, root)
    checker = _RowChecker(root, task, spatial_dims, num_classes)
    for done, (line, row) in enumerate(table.iterrows(), start=1):
        line = int(line)
        manifest_modality = raw.at[line, mf.MODALITY] if mf.MODALITY in raw.columns else ""
        try:
            report.problems += checker.check(line, row, manifest_modality)
        except Exception as exc:  # a check must report, never crash on a bad file
            report.problems.append(
                Problem(line, row[mf.IMAGE] or None, "error", f"check failed: {_short(exc)}")
            )
        if progress is not None:
            progress(done, len(table))
    report.problems += _duplicate_problems(table)
    report.problems += _conflict_problems(table)
    report.problems.sort(key=lambda p: (p.line is not None, p.line or 0))
    usable = table.drop(index=list(report.bad_lines))
    report.class_counts = _class_counts(usable, task, num_classes)
    report.subgroup_counts = _subgroup_counts(usable)
    return report


def _check_arguments(root: Path, task: str, spatial_dims: int, num_classes: int) -> None:
    data.site_task(task)
    if spatial_dims not in (2, 3):
        raise SiteDataError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if num_classes < 1:
        raise SiteDataError(f"num_classes must be at least 1, got {num_classes}")
    if not root.is_dir():
        raise SiteDataError(f"{root}: the site folder does not exist")


# --------------------------------------------------------------------------------------------
# Training's entry point
# --------------------------------------------------------------------------------------------


def load_checked_site(
    root: Path,
    *,
    task: str,
    spatial_dims: int,
    num_classes: int,
    image_size: int,
    skip_bad_rows: bool,
    cache_dir: Path | None = None,
    ct_window_hu: tuple[float, float] = data.DEFAULT_CT_WINDOW_HU,
    spacing_mm: Sequence[float] | None = None,
    progress: Progress | None = None,
    unlabelled_ok: bool = False,
) -> tuple[pd.DataFrame, CheckReport]:
    """The rows training may use, and the check report; refuse a site whose check fails.

    The first call checks the site and preprocesses every usable row into
    the loader's cache (``SiteDataset``), so preprocessing failures are reported by row too and
    the first epoch reads the cache. The report is stored under ``cache_dir`` (default
    ``ROOT/.radfl-cache``), keyed by the manifest, the stamp of every file it names (size,
    modification time, inode, status-change time) and the settings; later calls with an
    unchanged site reuse it without decoding.

    With ``unlabelled_ok`` (pseudo-labelling on), a row whose only problem is a blank target
    (an unlabelled study) is usable and returned with its blank target; without it such a row
    is a problem like any other.

    Returns
    -------
    rows, report
        The usable manifest rows (indexed by CSV line, subgroups filled from DICOM) and the
        report, whose ``problems`` name the rows left out when ``skip_bad_rows`` is true.

    Raises
    ------
    SiteDataError
        If the check found problems and ``skip_bad_rows`` is false (the message holds every
        problem line), if the site as a whole is unusable (manifest missing or malformed), or if
        no usable row remains.
    """
    root = Path(root)
    _check_arguments(root, task, spatial_dims, num_classes)
    cache_root = Path(cache_dir) if cache_dir is not None else root / data.CACHE_FOLDER
    try:
        table = data.read_manifest(root, task)
    except SiteDataError as exc:
        raise SiteDataError(f"site check of {root} failed: {exc}") from exc
    settings = {
        "check": _CHECK_VERSION,
        "task": task,
        "spatial_dims": spatial_dims,
        "num_classes": num_classes,
        "preprocessing": data.preprocessing_key(spatial_dims, image_size, ct_window_hu, spacing_mm),
    }
    stored = cache_root / "checks" / f"{_site_fingerprint(root, table, settings)}.json"
    table = data.fill_subgroups_from_dicom(table, root)
    report = _stored_report(stored)
    if report is not None:
        log.info("site %s: reusing the check stored in %s", root, stored)
    else:
        report = check_site(
            root, task=task, spatial_dims=spatial_dims, num_classes=num_classes, progress=progress
        )
        if not report.site_problems:
            _warm_cache(
                report,
                table,
                root,
                task,
                spatial_dims,
                image_size,
                cache_root,
                ct_window_hu,
                spacing_mm,
            )
        report.write_json(stored)
    if unlabelled_ok:
        report = dataclasses.replace(
            report, problems=[p for p in report.problems if p.kind != UNLABELLED]
        )

    if report.site_problems or (report.problems and not skip_bad_rows):
        hint = (
            ""
            if report.site_problems
            else ("\nfix these rows, or let the site skip bad rows (they are then reported)")
        )
        raise SiteDataError(
            f"site check of {root} failed with {len(report.problems)} problem(s):\n"
            + "\n".join(report.problem_lines())
            + hint,
            problems=len(report.problems),
        )
    usable = table.drop(index=[line for line in report.bad_lines if line in table.index])
    if usable.empty:
        raise SiteDataError(
            f"site {root} has no usable samples: every one of its {report.rows} rows has a "
            "problem:\n" + "\n".join(report.problem_lines()),
            problems=len(report.problems),
        )
    if report.problems:
        log.warning(
            "site %s: skipping %d of %d rows with problems:\n%s",
            root,
            len(report.bad_lines),
            report.rows,
            "\n".join(report.problem_lines()),
        )
    return usable, report


def _stored_report(path: Path) -> CheckReport | None:
    try:
        return CheckReport.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the unreadable stored check %s: %s", path, exc)
        return None


def _warm_cache(
    report: CheckReport,
    table: pd.DataFrame,
    root: Path,
    task: str,
    spatial_dims: int,
    image_size: int,
    cache_root: Path,
    ct_window_hu: tuple[float, float],
    spacing_mm: Sequence[float] | None,
) -> None:
    """Preprocess every usable row into the loader's cache; report the rows that fail."""
    usable = table.drop(index=list(report.bad_lines))
    if usable.empty:
        return
    dataset = data.SiteDataset(
        usable,
        root,
        task=task,
        spatial_dims=spatial_dims,
        image_size=image_size,
        cache_dir=cache_root,
        ct_window_hu=ct_window_hu,
        spacing_mm=spacing_mm,
    )
    failed = []
    for index in range(len(dataset)):
        try:
            dataset[index]
        except SiteDataError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            failed.append(
                Problem(
                    dataset.lines[index],
                    dataset.files[index],
                    "preprocess",
                    f"preprocessing failed: {_short(cause)}",
                )
            )
    if failed:
        report.problems = sorted(
            report.problems + failed, key=lambda p: (p.line is not None, p.line or 0)
        )
        failed_lines = {p.line for p in failed}
        still_usable = usable.drop(index=list(failed_lines))
        report.class_counts = _class_counts(still_usable, task, report.num_classes)
        report.subgroup_counts = _subgroup_counts(still_usable)


def _site_fingerprint(root: Path, table: pd.DataFrame, settings: Mapping[str, Any]) -> str:
    """A hash of the manifest, the stamp of every file it names, and ``settings``."""
    digest = hashlib.sha256()
    digest.update((root / mf.MANIFEST_NAME).read_bytes())
    digest.update(json.dumps(dict(settings), sort_keys=True).encode())
    for column in mf.PATH_COLUMNS:
        if column not in table.columns:
            continue
        for relative in table[column]:
            if not relative:
                continue
            try:
                stamp = data.file_stamp(data.resolve_path(root, relative))
            except (OSError, SiteDataError):
                stamp = "missing"
            digest.update(f"{column}:{relative}={stamp}\n".encode())
    return digest.hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``radfl site check``."""
    parser.add_argument("dir", type=Path, metavar="DIR", help="the site folder (manifest.csv)")
    parser.add_argument("--task", default="classification", choices=list_tasks(), help="the task")
    parser.add_argument(
        "--dims", type=int, default=2, choices=(2, 3), help="spatial dimensions of the task"
    )
    parser.add_argument("--num-classes", type=int, default=2, help="number of classes")
    parser.add_argument(
        "--report", type=Path, default=None, help=f"JSON report path (default DIR/{REPORT_NAME})"
    )


def site_check(args: argparse.Namespace) -> int:
    """Run the check, print the report, write the JSON; 0 when clean, 1 when problems."""
    root = Path(args.dir)
    # rich (a dependency, Flower's too) draws the progress on stderr.
    with ProgressBar(console=Console(stderr=True), transient=True) as bar:
        images = bar.add_task("checking images", total=None)
        report = check_site(
            root,
            task=args.task,
            spatial_dims=args.dims,
            num_classes=args.num_classes,
            progress=lambda done, total: bar.update(images, completed=done, total=total),
        )
    print(report.format_text())
    path = Path(args.report) if args.report is not None else root / REPORT_NAME
    report.write_json(path)
    print(f"report written to {path}")
    return 0 if report.ok else 1
