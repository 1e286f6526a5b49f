import pytest
import torch

from common.synthetic import (
    HARDER_SUBGROUP,
    MAX_LESIONS,
    make_site,
    native_image_size,
    site_profiles,
)


def test_profiles_differ_between_sites_and_repeat_for_a_seed():
    profiles = site_profiles(4, 100, seed=3)
    assert profiles == site_profiles(4, 100, seed=3)
    assert len({p.num_samples for p in profiles}) > 1
    assert len({p.intensity_scale for p in profiles}) == 4
    assert profiles[0].prevalence < profiles[-1].prevalence


def test_site_is_deterministic_with_lesions_in_positive_images():
    profile = site_profiles(2, 40, seed=1)[1]
    a = make_site(profile, index=1, image_size=32, spatial_dims=2, num_classes=2, seed=1)
    b = make_site(profile, index=1, image_size=32, spatial_dims=2, num_classes=2, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (profile.num_samples, 1, 32, 32)
    assert set(a.labels.tolist()) == {0, 1}
    assert torch.isfinite(a.images).all()
    assert len(set(a.patient_ids)) == profile.num_samples


def test_3d_multiclass_site():
    profile = site_profiles(1, 30, seed=0)[0]
    site = make_site(profile, index=0, image_size=16, spatial_dims=3, num_classes=4, seed=0)
    assert site.images.shape == (profile.num_samples, 1, 16, 16, 16)
    assert site.labels.max() < 4


def test_lesion_raises_local_intensity():
    # Same seed and profile without noise or blur: positives hold a bright blob.
    profile = site_profiles(1, 200, seed=0)[0]
    clean = type(profile)(**{**profile.__dict__, "noise_std": 0.0, "blur_sigma": 0.0})
    site = make_site(clean, index=0, image_size=32, spatial_dims=2, num_classes=2, seed=0)
    peak = site.images.amax(dim=(1, 2, 3))
    assert peak[site.labels == 1].mean() > peak[site.labels == 0].mean()


def _positive_site(spatial_dims=2, image_size=32, num_samples=120, follow_up_studies=True, **kw):
    profile = site_profiles(3, 100, seed=2)[2]
    profile = type(profile)(**{**profile.__dict__, "num_samples": num_samples, **kw})
    return make_site(
        profile,
        index=2,
        image_size=image_size,
        spatial_dims=spatial_dims,
        num_classes=3,
        seed=2,
        follow_up_studies=follow_up_studies,
    )


def test_profiles_vary_resolution_and_manufacturer():
    profiles = site_profiles(6, 100, seed=0)
    scales = [p.resolution_scale for p in profiles]
    assert all(0.75 <= s <= 1.25 for s in scales) and len(set(scales)) == 6
    assert len({p.manufacturer for p in profiles}) == 6
    sizes = {native_image_size(p, 64) for p in profiles}
    assert len(sizes) > 1 and all(48 <= s <= 80 for s in sizes)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_lesions_masks_instances_and_boxes_agree(spatial_dims):
    site = _positive_site(spatial_dims, image_size=32 if spatial_dims == 2 else 16)
    n = len(site.labels)
    assert site.masks.shape == site.instances.shape == site.images.shape
    counts = torch.tensor([len(b) for b in site.boxes])
    assert (counts[site.labels == 0] == 0).all()
    assert counts[site.labels > 0].min() >= 1 and counts.max() <= MAX_LESIONS
    assert len(set(counts[site.labels > 0].tolist())) > 1  # several lesions happen
    for i in range(n):
        mask, instances = site.masks[i, 0], site.instances[i, 0]
        assert torch.equal(mask > 0, instances > 0)
        assert set(mask.unique().tolist()) <= {0, int(site.labels[i])}
        assert instances.max() == len(site.boxes[i])
        for k, box in enumerate(site.boxes[i], start=1):
            *corners, cls = box
            start, end = corners[:spatial_dims], corners[spatial_dims:]
            assert cls == site.labels[i]
            assert all(0 <= a < b <= s for a, b, s in zip(start, end, mask.shape, strict=True))
            region = tuple(slice(a, b) for a, b in zip(start, end, strict=True))
            inside = (instances == k).sum()
            assert inside > 0 and (instances[region] == k).sum() == inside
            # The box is tight: every face touches the instance.
            for axis in range(spatial_dims):
                member = (instances == k).movedim(axis, 0)
                assert member[start[axis]].any() and member[end[axis] - 1].any()


def test_3d_lesions_at_half_the_matrix_span_as_many_voxels_as_2d_lesions():
    # 3D volumes are organ crops: lesions twice as large relative to the field of view, so a
    # 32-voxel volume shows lesions as wide as a 64-px image does (LESION_SCALE).
    def median_width(site):
        dims = site.images.dim() - 2
        widths = [b[dims + a] - b[a] for boxes in site.boxes for b in boxes for a in range(dims)]
        return float(torch.tensor(widths, dtype=torch.float).median())

    flat = median_width(_positive_site(2, image_size=64, num_samples=60))
    volume = median_width(_positive_site(3, image_size=32, num_samples=60))
    assert volume == pytest.approx(flat, abs=1.0)
    assert volume >= 4


def test_follow_up_studies_share_patient_attributes():
    site = _positive_site(num_samples=200)
    patients = {}
    for pid, sex, age, label in zip(
        site.patient_ids, site.sex, site.age, site.labels.tolist(), strict=True
    ):
        patients.setdefault(pid, []).append((sex, age, label))
    multi = [studies for studies in patients.values() if len(studies) > 1]
    assert 0.2 < len(multi) / len(patients) < 0.5
    assert max(len(s) for s in multi) == 3
    assert all(len({(sex, age) for sex, age, _ in s}) == 1 for s in multi)
    same_label = sum(s[0][2] == f[2] for s in multi for f in s[1:])
    assert same_label / sum(len(s) - 1 for s in multi) > 0.7
    assert len(set(site.study_ids)) == len(site.study_ids)
    assert set(site.sex) == {"F", "M"} and min(site.age) >= 30 and max(site.age) <= 85
    single = _positive_site(num_samples=50, follow_up_studies=False)
    assert len(set(single.patient_ids)) == 50 and set(single.visits) == {0}


def test_harder_subgroup_has_smaller_fainter_lesions():
    assert HARDER_SUBGROUP == ("sex", "F")
    site = _positive_site(num_samples=300, noise_std=0.0, blur_sigma=0.0, prevalence=1.0)
    scale = site.profile.intensity_scale
    areas = {"F": [], "M": []}
    contrasts = {"F": [], "M": []}
    for i in range(len(site.labels)):
        instances, image = site.instances[i, 0], site.images[i, 0] / scale
        for k in range(1, int(instances.max()) + 1):
            lesion = instances == k
            ring = torch.nn.functional.max_pool2d(lesion[None, None].float(), 7, 1, 3)[0, 0] > 0
            ring &= instances == 0
            areas[site.sex[i]].append(lesion.sum().item())
            contrasts[site.sex[i]].append((image[lesion].mean() - image[ring].mean()).item())
    mean = {g: sum(v) / len(v) for g, v in areas.items()}
    contrast = {g: sum(v) / len(v) for g, v in contrasts.items()}
    assert mean["F"] < 0.75 * mean["M"]
    assert contrast["F"] < 0.8 * contrast["M"]
