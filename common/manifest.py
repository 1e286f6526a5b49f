"""The site data manifest: one CSV row per image or study, paths relative to the site root.

A site folder holds ``manifest.csv`` and the images it names. Columns:

=================  ========  ===============================================================
column             required  meaning
=================  ========  ===============================================================
``image``          yes       path relative to the site root: a DICOM file, a folder holding
                             one DICOM series, a NIfTI file (``.nii``/``.nii.gz``), a PNG or
                             JPEG, or a NumPy ``.npy`` array
``patient_id``     yes       pseudonymous patient identifier; splits never divide a patient
``study_id``       yes       study identifier (a patient may have several studies)
``label``          class.    integer class, 0 = no finding (classification)
``labels``         multi.    one 0/1 flag per finding, ``;``-separated in the run's finding
                             order, e.g. ``0;1`` (multilabel); blank: an unlabelled study
``mask``           seg.      path of the label mask, same grid as the image (segmentation)
``boxes``          det.      JSON list of boxes ``[[x0, y0, x1, y1, class], ...]`` (2D) or
                             ``[[x0, y0, z0, x1, y1, z1, class], ...]`` (3D), voxel indices
                             of the image as loaded (detection)
``instance_mask``  inst.     path of a mask whose voxel value k > 0 marks instance k
                             (instance segmentation)
``modality``       no        ``CT``, ``MR``, ``CR``/``DX`` (X-ray), ``US``, ``OT``; read from
                             the DICOM tag when empty
``sex``            no        ``F``, ``M`` or ``O``; from DICOM PatientSex when empty
``age``            no        years; from DICOM PatientAge (e.g. ``063Y``) when empty
``manufacturer``   no        scanner manufacturer; from DICOM Manufacturer when empty
=================  ========  ===============================================================

Any other column is kept as a subgroup attribute (for the bias report). Which label columns are
required depends on the task: its ``required_columns`` (``common.tasks``).
"""

from __future__ import annotations

MANIFEST_NAME = "manifest.csv"

IMAGE = "image"
PATIENT_ID = "patient_id"
STUDY_ID = "study_id"
LABEL = "label"
LABELS = "labels"
MASK = "mask"
BOXES = "boxes"
INSTANCE_MASK = "instance_mask"
MODALITY = "modality"
SEX = "sex"
AGE = "age"
MANUFACTURER = "manufacturer"

REQUIRED_COLUMNS = (IMAGE, PATIENT_ID, STUDY_ID)
PATH_COLUMNS = (IMAGE, MASK, INSTANCE_MASK)
SUBGROUP_COLUMNS = (SEX, AGE, MANUFACTURER, MODALITY)

# DICOM attributes that fill empty subgroup columns.
DICOM_SUBGROUP_TAGS: dict[str, str] = {
    SEX: "PatientSex",
    AGE: "PatientAge",
    MANUFACTURER: "Manufacturer",
    MODALITY: "Modality",
}

IMAGE_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".npy")
