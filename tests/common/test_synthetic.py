import torch

from common.synthetic import make_site, site_profiles


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
