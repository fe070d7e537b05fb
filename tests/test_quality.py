"""imaging/quality.py: the protocol every score in upscaled uses, checked against scikit-image."""

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from imaging import quality


def _pair(seed=0, h=57, w=70):
    r = np.random.default_rng(seed)
    a = r.integers(0, 256, (h, w, 3)).astype(np.uint8)
    b = np.clip(a + r.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_and_ssim_agree_with_scikit_image_on_y(seed):
    a, b = _pair(seed)
    ya, yb = quality.rgb_to_y(a), quality.rgb_to_y(b)
    ref_ssim = structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert quality.ssim(ya, yb) == pytest.approx(ref_ssim, abs=1e-12)
    assert quality.psnr(ya, yb) == pytest.approx(peak_signal_noise_ratio(ya, yb, data_range=255), abs=1e-10)
    # psnr_ssim_y shaves `scale` pixels and then measures the same way
    p, s = quality.psnr_ssim_y(b, a, 4)
    ya4, yb4 = ya[4:-4, 4:-4], yb[4:-4, 4:-4]
    assert p == pytest.approx(peak_signal_noise_ratio(ya4, yb4, data_range=255), abs=1e-10)
    assert s == pytest.approx(structural_similarity(ya4, yb4, gaussian_weights=True, sigma=1.5,
                                                    use_sample_covariance=False, data_range=255), abs=1e-12)


def test_y_is_bt601_studio_range():
    assert quality.rgb_to_y(np.array([[[0, 0, 0]]], np.uint8))[0, 0] == pytest.approx(16)
    assert quality.rgb_to_y(np.array([[[255, 255, 255]]], np.uint8))[0, 0] == pytest.approx(235)


def test_downscale_crops_to_a_multiple_and_is_pillow_bicubic():
    a, _ = _pair(2, 51, 66)
    lr = quality.downscale(a, 4)
    assert lr.shape == (12, 16, 3)
    ref = np.asarray(Image.fromarray(a[:48, :64]).resize((16, 12), Image.Resampling.BICUBIC))
    assert np.array_equal(lr, ref)
    # float input in [0, 1] is rounded to 8 bits first
    assert np.array_equal(quality.downscale(a.astype(np.float32) / 255, 4), ref)


def test_evaluate_images_reports_model_and_baselines():
    r = np.random.default_rng(3)
    hr = np.asarray(Image.fromarray(r.integers(0, 256, (16, 16, 3)).astype(np.uint8)).resize((64, 64), Image.Resampling.BICUBIC))
    perfect = lambda lr: hr
    rep = quality.evaluate_images(perfect, [("a", hr)], 4)
    assert rep.mean_psnr_y["model"] == float("inf") and rep.mean_ssim_y["model"] == pytest.approx(1.0)
    assert 15 < rep.mean_psnr_y["bicubic"] < 60 and 15 < rep.mean_psnr_y["lanczos"] < 60
    assert rep.metrics()["count"] == 1 and rep.images[0].size == (64, 64)


def test_fingerprint_changes_with_content_and_names(tmp_path):
    (tmp_path / "a.png").write_bytes(b"one")
    (tmp_path / "b.png").write_bytes(b"two")
    f1 = quality.fingerprint([tmp_path / "a.png", tmp_path / "b.png"], tmp_path)
    assert f1 == quality.fingerprint([tmp_path / "b.png", tmp_path / "a.png"], tmp_path)
    assert f1 != quality.fingerprint([tmp_path / "a.png", tmp_path / "b.png"], tmp_path, scale=2)
    (tmp_path / "b.png").write_bytes(b"changed")
    assert f1 != quality.fingerprint([tmp_path / "a.png", tmp_path / "b.png"], tmp_path)


def test_colour_shift_and_detail_measure_what_they_say():
    rng = np.random.default_rng(3)
    img = (rng.random((64, 64, 3)) * 200 + 20).astype(np.uint8)
    assert quality.colour_shift(img, img) == 0.0
    brighter = np.clip(img.astype(np.float64) * 1.02, 0, 255).round().astype(np.uint8)
    assert 0.006 < quality.colour_shift(brighter, img) < 0.012  # ~2.4 levels of 255
    tinted = img.copy()
    tinted[..., 2] = np.clip(tinted[..., 2].astype(int) + 5, 0, 255)  # blue only
    assert quality.colour_shift(tinted, img) == pytest.approx(5 / 255, abs=0.002)
    blurred = np.asarray(Image.fromarray(img).resize((16, 16), Image.BICUBIC).resize((64, 64), Image.BICUBIC))
    assert quality.detail(blurred) < 0.5 * quality.detail(img)
