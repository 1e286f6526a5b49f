"""Synthetic hospitals: sites whose scanners, case mix and size differ, generated in memory.

Each image is an anatomical-looking background (an elliptical body with soft internal structure
and low-frequency texture) with or without lesion-like objects (small blobs brighter than their
surroundings, placed inside the body). A negative image has no lesion, a positive one 1 to
``MAX_LESIONS``. For more than two classes, class ``k >= 1`` is a lesion of kind ``k``: kinds
differ in size, contrast and elongation, and all lesions of one image share its kind.

Every lesion has a ground-truth mask (the voxels where its blob, before blur and noise, reaches
half of its sampled peak), so a site also carries a semantic mask, an instance map and boxes.

Sites differ the way real scanners and referral patterns do: intensity scale and offset, noise,
blur, native resolution (``native_image_size``), manufacturer, prevalence of findings and number
of cases. Every patient has a sex (``F``/``M``) and an age (30 to 85); with
``follow_up_studies=True`` about a third of patients have 2 or 3 studies, which share the
patient's sex and age and mostly the label. One subgroup is systematically harder
(``HARDER_SUBGROUP``): its lesions are smaller and have lower contrast, so a per-subgroup report
has a real gap to find.

With ``second_finding=True`` (the multi-label task) an image may also carry a second finding,
drawn independently of the first with its own prevalence (``SECOND_FINDING_PREVALENCE`` times
the site's): one elongated, fainter lesion (``SECOND_LESION_*``) planted on top, so images with
none, either or both findings occur. ``findings`` then holds each image's two flags. The second
lesion is in no mask, instance map or box (only image-level flags use it), and it comes from
its own random stream: every other array is the same with or without it.

The generator is deterministic in ``(seed, site index)`` so every process that asks for site
``i`` builds the same data without any of it being sent anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from monai.networks.layers import GaussianFilter

from common.errors import ConfigError

# Patients in this subgroup get smaller, lower-contrast lesions (attribute, value).
HARDER_SUBGROUP = ("sex", "F")
HARDER_LESION_SIZE_FACTOR = 0.55  # lesion radius, relative to the other patients
HARDER_LESION_CONTRAST_FACTOR = 0.45  # lesion contrast, relative to the other patients
# Lesion radius relative to the field of view, by spatial dims. A 3D volume is a crop around
# the organ, about half as wide as a 2D radiograph's field of view, so its lesions are twice as
# large relative to it: at 32 voxels they span as many voxels as 2D lesions do at 64 px.
LESION_SCALE = {2: 1.0, 3: 2.0}

MAX_LESIONS = 3
# Probability of 1, 2, ... MAX_LESIONS lesions in a positive image.
LESION_COUNT_PROBABILITIES = (0.6, 0.25, 0.15)
# Studies per patient with follow-ups: about a third of patients have 2 or 3.
STUDIES_PER_PATIENT_PROBABILITIES = (0.67, 0.22, 0.11)
# Probability that a follow-up study keeps the patient's first label (else drawn afresh).
FOLLOW_UP_SAME_LABEL = 0.8
AGE_RANGE_YEARS = (30, 85)
# A site's native matrix is ``image_size`` times a factor in this range (same field of view).
RESOLUTION_SCALE_RANGE = (0.75, 1.25)
MANUFACTURERS = (
    "Siemens Healthineers",
    "GE HealthCare",
    "Philips",
    "Canon Medical Systems",
    "Fujifilm",
    "Agfa",
)

# The second finding (multi-label): its prevalence relative to the site's first finding, and
# its lesion's shape: elongated along axis 0, wider and fainter than a first-finding lesion.
SECOND_FINDING_PREVALENCE = 0.8
SECOND_LESION_STRETCH = 2.5
SECOND_LESION_RADIUS = (0.05, 0.08)
SECOND_LESION_STRENGTH = (0.12, 0.2)

# Voxels generated at once: bounds memory for large 3D volumes.
_VOXELS_PER_CHUNK = 1 << 21


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital's scanner and case mix look."""

    name: str
    num_samples: int
    prevalence: float
    intensity_scale: float
    intensity_offset: float
    noise_std: float
    blur_sigma: float
    resolution_scale: float = 1.0
    manufacturer: str = MANUFACTURERS[0]


@dataclass(frozen=True)
class SiteData:
    """A site's images, labels and, per image, its patient, study, subgroup and lesions.

    ``images`` is ``(N, 1, *spatial)`` float32 and ``labels`` ``(N,)`` long. ``masks`` is
    ``(N, 1, *spatial)`` uint8 holding the lesion kind (the label) inside lesions; ``instances``
    the same shape with value ``k`` on lesion ``k`` (1, 2, ...). ``boxes[i]`` lists image
    ``i``'s lesions as ``[a0, b0, ..., a1, b1, ..., class]``: for each spatial axis the first
    voxel index and one past the last, then the lesion kind (so ``image[a0:a1, b0:b1]`` holds
    the lesion). Spatial axis 0 is x, 1 is y, 2 is z. ``body`` (uint8, same shape as
    ``images``) is how much of each voxel the body fills, 0 (air) to 255, before blur and noise:
    writers use it to map intensities to physical units such as Hounsfield units.
    """

    profile: SiteProfile
    images: torch.Tensor
    labels: torch.Tensor
    patient_ids: list[str]
    study_ids: list[str] = field(default_factory=list)
    visits: list[int] = field(default_factory=list)  # 0 for a patient's first study
    sex: list[str] = field(default_factory=list)
    age: list[int] = field(default_factory=list)
    masks: torch.Tensor | None = None
    instances: torch.Tensor | None = None
    boxes: list[list[list[int]]] = field(default_factory=list)
    body: torch.Tensor | None = None
    #: ``(N, 2)`` long with ``second_finding``: [a first-kind lesion, the second finding].
    findings: torch.Tensor | None = None


def site_profiles(num_sites: int, samples_per_site: int, seed: int) -> list[SiteProfile]:
    """Profiles of ``num_sites`` hospitals, deterministic in ``seed``.

    Sizes range from about half to one and a half times ``samples_per_site``; prevalence from
    0.2 to 0.6; scanners differ in gain, offset, noise, blur, native resolution (a factor in
    ``RESOLUTION_SCALE_RANGE``) and manufacturer.
    """
    if num_sites < 1:
        raise ConfigError(f"num_sites must be >= 1, got {num_sites}")
    if samples_per_site < 8:
        raise ConfigError(f"samples_per_site must be >= 8, got {samples_per_site}")
    rng = np.random.default_rng([seed, 7919])
    # A second stream for attributes added later, so the original ones keep their values.
    scanner_rng = np.random.default_rng([seed, 7927])
    manufacturer_order = scanner_rng.permutation(len(MANUFACTURERS))
    profiles = []
    for index in range(num_sites):
        spread = index / max(num_sites - 1, 1)
        profiles.append(
            SiteProfile(
                name=f"site-{index}",
                num_samples=max(8, int(round(samples_per_site * (0.6 + 0.8 * rng.random())))),
                prevalence=float(0.2 + 0.4 * spread),
                intensity_scale=float(rng.uniform(0.7, 1.4)),
                intensity_offset=float(rng.uniform(-0.2, 0.2)),
                noise_std=float(rng.uniform(0.04, 0.12)),
                blur_sigma=float(rng.uniform(0.0, 1.2)),
                resolution_scale=float(scanner_rng.uniform(*RESOLUTION_SCALE_RANGE)),
                manufacturer=MANUFACTURERS[manufacturer_order[index % len(MANUFACTURERS)]],
            )
        )
    return profiles


def native_image_size(profile: SiteProfile, image_size: int) -> int:
    """The site's own matrix size for a nominal ``image_size`` (same field of view)."""
    return max(16, int(round(image_size * profile.resolution_scale)))


def make_site(
    profile: SiteProfile,
    *,
    index: int,
    image_size: int,
    spatial_dims: int,
    num_classes: int,
    seed: int,
    follow_up_studies: bool = False,
    second_finding: bool = False,
) -> SiteData:
    """Generate one site's images, labels, lesion masks and boxes, and patient attributes.

    Parameters
    ----------
    profile, index, seed
        The site; its data is deterministic in ``(seed, index)``.
    image_size, spatial_dims
        Matrix size along each of the ``spatial_dims`` (2 or 3) axes.
    num_classes
        Image classes: 0 is no finding, ``1..num_classes-1`` lesion kinds.
    follow_up_studies
        If true, about a third of patients have 2 or 3 studies; else each image is one patient.
    second_finding
        If true, plant the second finding (module docstring) and fill ``findings``.
    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if image_size < 16:
        raise ConfigError(f"image_size must be >= 16, got {image_size}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    n = profile.num_samples
    rng = np.random.default_rng([seed, index, 65537])
    cohort = _cohort(profile, rng, num_classes, follow_up_studies)
    harder = np.asarray(cohort[HARDER_SUBGROUP[0]]) == HARDER_SUBGROUP[1]
    params = _draw_parameters(rng, cohort["labels"], harder, spatial_dims)

    grid = torch.stack(
        torch.meshgrid(*[torch.linspace(-1, 1, image_size)] * spatial_dims, indexing="ij")
    )  # (D, *shape)
    chunk = max(1, _VOXELS_PER_CHUNK // image_size**spatial_dims)
    images, instances, bodies = [], [], []
    for start in range(0, n, chunk):
        part = {k: torch.from_numpy(v[start : start + chunk]) for k, v in params.items()}
        image, instance, body = _render(grid, part)
        images.append(image)
        instances.append(instance)
        bodies.append(body)
    image_batch = torch.cat(images).unsqueeze(1)
    instance_map = torch.cat(instances).unsqueeze(1)
    second = np.zeros(n, dtype=bool)
    if second_finding:
        second_rng = np.random.default_rng([seed, index, 65539])
        second = second_rng.random(n) < SECOND_FINDING_PREVALENCE * profile.prevalence
        image_batch += _second_lesions(grid, params, second, harder, second_rng).unsqueeze(1)

    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
    if profile.blur_sigma > 0:
        blur = GaussianFilter(spatial_dims, sigma=profile.blur_sigma * image_size / 64)
        image_batch = blur(image_batch)
    image_batch = image_batch * profile.intensity_scale + profile.intensity_offset
    image_batch += profile.noise_std * torch.randn(image_batch.shape, generator=generator)

    labels = torch.from_numpy(cohort["labels"]).long()
    masks = ((instance_map > 0) * labels.view(n, *[1] * (spatial_dims + 1))).to(torch.uint8)
    return SiteData(
        profile=profile,
        images=image_batch.float(),
        labels=labels,
        patient_ids=cohort["patient_ids"],
        study_ids=cohort["study_ids"],
        visits=cohort["visits"],
        sex=cohort["sex"],
        age=cohort["age"],
        masks=masks,
        instances=instance_map,
        boxes=_boxes(instance_map[:, 0], cohort["labels"]),
        body=torch.cat(bodies).unsqueeze(1),
        findings=(
            torch.from_numpy(np.stack([cohort["labels"] > 0, second], axis=1)).long()
            if second_finding
            else None
        ),
    )


def _second_lesions(
    grid: torch.Tensor,
    params: dict[str, np.ndarray],
    present: np.ndarray,
    harder: np.ndarray,
    rng: np.random.Generator,
) -> torch.Tensor:
    """``(n, *spatial)``: one elongated lesion inside the body of each image in ``present``
    (the harder subgroup's smaller and fainter, as for the first finding)."""
    n, dims = len(present), grid.shape[0]
    theta = 2 * math.pi * rng.random(n)
    direction = np.zeros((n, dims))
    direction[:, 0], direction[:, 1] = np.cos(theta), np.sin(theta)
    rho = 0.2 + 0.3 * rng.random((n, 1))
    center = params["body_center"] + params["body_radii"] * rho * direction
    size = np.where(harder, HARDER_LESION_SIZE_FACTOR, 1.0)
    contrast = np.where(harder, HARDER_LESION_CONTRAST_FACTOR, 1.0)
    radius = rng.uniform(*SECOND_LESION_RADIUS, n) * size * LESION_SCALE[dims]
    strength = rng.uniform(*SECOND_LESION_STRENGTH, n) * contrast * present
    stretch = np.ones(dims)
    stretch[0] = SECOND_LESION_STRETCH
    ones = [1] * dims
    scale = torch.from_numpy(stretch).float().view(1, dims, *ones)
    centers = torch.from_numpy(center).float()
    radii = torch.from_numpy(radius).float()
    strengths = torch.from_numpy(strength).float()
    chunk = max(1, _VOXELS_PER_CHUNK // grid[0].numel())
    parts = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        offset = (grid.unsqueeze(0) - centers[start:stop].view(-1, dims, *ones)) / scale
        r = radii[start:stop].view(-1, *ones)
        blob = torch.exp(-(offset**2).sum(1) / (2 * r**2))
        parts.append(strengths[start:stop].view(-1, *ones) * blob)
    return torch.cat(parts)


def _cohort(
    profile: SiteProfile, rng: np.random.Generator, num_classes: int, follow_up_studies: bool
) -> dict:
    """Per-image patient, study, sex, age and label."""
    n = profile.num_samples
    if follow_up_studies:
        studies = rng.choice(
            np.arange(1, len(STUDIES_PER_PATIENT_PROBABILITIES) + 1),
            size=n,
            p=STUDIES_PER_PATIENT_PROBABILITIES,
        )
    else:
        studies = np.ones(n, dtype=np.int64)
    patient = np.repeat(np.arange(n), studies)[:n]
    first = np.searchsorted(patient, patient)  # index of each patient's first image
    visits = np.arange(n) - first
    num_patients = int(patient[-1]) + 1
    is_female = rng.random(num_patients) < 0.5
    ages = rng.integers(AGE_RANGE_YEARS[0], AGE_RANGE_YEARS[1] + 1, num_patients)

    finding = rng.random(n) < profile.prevalence
    kinds = rng.integers(1, num_classes, n)
    drawn = np.where(finding, kinds, 0)
    keep = rng.random(n) < FOLLOW_UP_SAME_LABEL
    labels = np.where(keep | (visits == 0), drawn[first], drawn)

    patient_ids = [f"{profile.name}-p{p:05d}" for p in patient]
    return {
        "patient_ids": patient_ids,
        "study_ids": [f"{pid}-s{v}" for pid, v in zip(patient_ids, visits, strict=True)],
        "visits": visits.tolist(),
        "sex": ["F" if is_female[p] else "M" for p in patient],
        "age": ages[patient].tolist(),
        "labels": labels.astype(np.int64),
    }


def _draw_parameters(
    rng: np.random.Generator, labels: np.ndarray, harder: np.ndarray, dims: int
) -> dict[str, np.ndarray]:
    """Body and lesion parameters of every image, as float32 arrays with leading axis N."""
    n, slots = len(labels), MAX_LESIONS
    body_center = 0.08 * (rng.random((n, dims)) - 0.5)
    body_radii = 0.65 + 0.2 * rng.random((n, dims))
    organ_center = 0.8 * (rng.random((n, 2, dims)) - 0.5)
    organ_sigma = 0.15 + 0.2 * rng.random((n, 2))
    phase = 2 * math.pi * rng.random((n, dims))

    counts = rng.choice(np.arange(1, slots + 1), size=n, p=LESION_COUNT_PROBABILITIES)
    counts = np.where(labels > 0, counts, 0)
    # Lesions sit in different sectors of the body so they rarely overlap.
    theta = (
        2 * math.pi * rng.random((n, 1))
        + 2 * math.pi / slots * np.arange(slots)
        + 0.4 * (rng.random((n, slots)) - 0.5)
    )
    direction = np.zeros((n, slots, dims))
    direction[..., 0], direction[..., 1] = np.cos(theta), np.sin(theta)
    if dims == 3:
        direction[..., 2] = 1.2 * (rng.random((n, slots)) - 0.5)
    rho = 0.25 + 0.35 * rng.random((n, slots, 1))
    center = body_center[:, None] + body_radii[:, None] * rho * direction
    kind = labels.astype(np.float64)[:, None]
    size = np.where(harder, HARDER_LESION_SIZE_FACTOR, 1.0)[:, None]
    contrast = np.where(harder, HARDER_LESION_CONTRAST_FACTOR, 1.0)[:, None]
    radius = (0.06 + 0.02 * kind + 0.04 * rng.random((n, slots))) * size * LESION_SCALE[dims]
    strength = (0.15 + 0.1 * rng.random((n, slots))) * contrast
    stretch = np.ones((n, dims))
    stretch[:, 0] = 1.0 + 0.6 * np.clip(labels - 1, 0, None)
    active = np.arange(slots) < counts[:, None]
    values = {
        "body_center": body_center,
        "body_radii": body_radii,
        "organ_center": organ_center,
        "organ_sigma": organ_sigma,
        "phase": phase,
        "lesion_center": center,
        "lesion_radius": radius,
        "lesion_strength": strength * active,
        "lesion_stretch": stretch,
        "lesion_active": active,
    }
    return {k: v.astype(np.float32) for k, v in values.items()}


def _render(
    grid: torch.Tensor, p: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``(n, *spatial)``, instance maps (lesions numbered from 1), body occupancy."""
    dims = grid.shape[0]
    g = grid.unsqueeze(0)  # (1, D, *shape)
    n = p["body_center"].shape[0]

    def per_image(values: torch.Tensor) -> torch.Tensor:  # (n, k) -> (n, k, 1, ...)
        return values.view(*values.shape, *[1] * dims)

    center, radii = per_image(p["body_center"]), per_image(p["body_radii"])
    occupancy = torch.sigmoid((1 - (((g - center) / radii) ** 2).sum(1)) * 12)
    body = occupancy * 0.5
    inside = body > 0.05
    for organ in range(2):
        d2 = ((g - per_image(p["organ_center"][:, organ])) ** 2).sum(1)
        s = p["organ_sigma"][:, organ].view(n, *[1] * dims)
        body = body + 0.15 * torch.exp(-d2 / (2 * s**2)) * inside
    texture = torch.sin(3 * g + per_image(p["phase"])).mean(1)
    image = body + 0.05 * texture * body

    stretch = per_image(p["lesion_stretch"])
    scores = []
    for slot in range(MAX_LESIONS):
        d2 = (((g - per_image(p["lesion_center"][:, slot])) / stretch) ** 2).sum(1)
        r = p["lesion_radius"][:, slot].view(n, *[1] * dims)
        blob = torch.exp(-d2 / (2 * r**2))
        image = image + p["lesion_strength"][:, slot].view_as(r) * blob
        # Half of the sampled peak: even a lesion smaller than a voxel keeps its peak voxel.
        peak = blob.flatten(1).amax(1).view_as(r)
        active = p["lesion_active"][:, slot].view_as(r) > 0
        scores.append(blob * ((blob >= 0.5 * peak) & active))
    score = torch.stack(scores, 1)
    best, winner = score.max(1)
    slot_map = torch.where(best > 0, winner + 1, 0)
    # A lesion hidden under a neighbour has no voxels: number the visible ones 1, 2, ...
    visible = torch.stack([(slot_map == s + 1).flatten(1).any(1) for s in range(MAX_LESIONS)], 1)
    renumber = torch.cat(
        [torch.zeros(n, 1, dtype=torch.long), visible.long().cumsum(1) * visible], 1
    )
    instances = renumber.gather(1, slot_map.flatten(1)).view_as(slot_map)
    return image, instances.to(torch.uint8), (occupancy * 255).round().to(torch.uint8)


def _boxes(instances: torch.Tensor, labels: np.ndarray) -> list[list[list[int]]]:
    """Per image, ``[a0, b0, ..., a1, b1, ..., class]`` of each instance (end exclusive)."""
    n, shape = instances.shape[0], instances.shape[1:]
    dims = len(shape)
    boxes: list[list[list[int]]] = [[] for _ in range(n)]
    for k in range(1, MAX_LESIONS + 1):
        member = instances == k
        present = member.flatten(1).any(1).tolist()
        if not any(present):
            continue
        starts, ends = [], []
        for axis in range(dims):
            others = tuple(a + 1 for a in range(dims) if a != axis)
            projection = member.any(dim=others) if others else member  # (n, size)
            starts.append(projection.int().argmax(1))
            ends.append(shape[axis] - projection.flip(1).int().argmax(1))
        corners = torch.stack(starts + ends, 1).tolist()
        for i in range(n):
            if present[i]:
                boxes[i].append([*corners[i], int(labels[i])])
    return boxes


# -- A planted shortcut (issue 19): a corner marker that goes with the label ---------------
#: Share of positive images that carry the marker; negatives carry it at one minus this.
SHORTCUT_STRENGTH = 0.9
#: The marker's side, relative to the image's.
SHORTCUT_SIZE = 1 / 6


def plant_shortcut(data: SiteData, seed: int, strength: float = SHORTCUT_STRENGTH) -> SiteData:
    """``data`` with a bright square in one corner of ``strength`` of its positive images and
    ``1 - strength`` of its negatives (as a scanner's laterality marker or a department's
    burned-in label can go with the finding): a model may learn the marker instead of the
    lesion, and the report's attention inside the lesion shows it. Lesion masks are unchanged
    (the marker is no lesion)."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"shortcut strength must lie in [0, 1], got {strength}")
    generator = torch.Generator().manual_seed(int(seed) * 7_919 + 17)
    draw = torch.rand(len(data.labels), generator=generator)
    marked = torch.where(data.labels > 0, draw < strength, draw >= strength)
    side = max(2, int(round(data.images.shape[-1] * SHORTCUT_SIZE)))
    corner = (slice(None), slice(None)) + (slice(0, side),) * (data.images.ndim - 2)
    images = data.images.clone()
    bright = images.flatten(1).quantile(0.999, dim=1) + 1.0
    # The marker is a dense object, not air: where the body map exists (CT numbers are drawn
    # from it, ``simulations.synth``) it fills the corner, or a CT site would store the marker
    # as air-dark numbers below every soft-tissue window and the model would never see it.
    body = None if data.body is None else data.body.clone()
    for i in torch.nonzero(marked).flatten().tolist():
        images[i][corner[1:]] = bright[i]
        if body is not None:
            body[i][corner[1:]] = 255
    return replace(data, images=images, body=body)
