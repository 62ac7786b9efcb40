"""Tests for pipeline/images.py on the tests/badimages.py corpus."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from pipeline import images
from pipeline.images import DEFAULT_MAX_PIXELS, ImageError, iter_batches, load_image
from tests.badimages import REASON_KEYWORDS, gradient, make_bad_images, marker_image, write_gray16

S = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_bad_images(tmp_path_factory.mktemp("badimages"))


def _good(corpus):
    return {name: path for name, (path, ok) in corpus.items() if ok}


def _bad(corpus):
    return {name: path for name, (path, ok) in corpus.items() if not ok}


def test_every_good_file_loads(corpus):
    for name, path in _good(corpus).items():
        array = load_image(path, S)
        assert array.shape == (S, S, 3), name
        assert array.dtype == np.uint8, name
        assert array.any(), f"{name} loaded as all zeros"


def test_every_bad_file_raises_with_reason(corpus):
    for name, path in _bad(corpus).items():
        with pytest.raises(ImageError) as caught:
            load_image(path, S)
        assert REASON_KEYWORDS[name] in str(caught.value).lower(), (name, str(caught.value))


def test_exact_reasons(corpus):
    def reason(name):
        with pytest.raises(ImageError) as caught:
            load_image(corpus[name][0], S)
        return str(caught.value)

    assert reason("zero_byte_jpg") == "zero-byte file"
    assert reason("missing_jpg") == "file not found"
    assert reason("directory_jpg") == "is a directory"
    assert reason("truncated_jpeg") == "truncated JPEG"
    assert reason("text_named_jpg") == "not an image (cannot identify format)"
    assert reason("bomb_png") == f"too large: 10000x10000 pixels > limit {DEFAULT_MAX_PIXELS}"
    assert reason("corrupt_jpeg").startswith("corrupt JPEG")


def test_bombs_rejected_without_warnings(corpus):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("bomb_png", "bomb_huge_png"):
            with pytest.raises(ImageError, match="too large"):
                load_image(corpus[name][0], S)
    assert not caught, [str(w.message) for w in caught]


def test_max_pixels_checked_before_decoding(corpus):
    path = corpus["rgb_jpeg"][0]  # 40 x 30 = 1200 pixels
    with pytest.raises(ImageError, match=r"too large: 40x30 pixels > limit 1199"):
        load_image(path, S, max_pixels=1199)
    assert load_image(path, S, max_pixels=1200).shape == (S, S, 3)


def test_content_decides_format_not_extension(corpus):
    reference = load_image(corpus["palette_png"][0], S)
    assert load_image(corpus["png_named_jpg"][0], S).mean() == pytest.approx(reference.mean(), abs=4)
    assert load_image(corpus["gif_named_jpg"][0], S).shape == (S, S, 3)


def test_fully_transparent_rgba_is_white(corpus):
    array = load_image(corpus["rgba_transparent_png"][0], S)
    assert array.min() >= 250


def test_alpha_composited_on_white(corpus):
    # alpha ramps 0 → 255 left → right: the left edge must be white, the right edge the opaque colour
    for name in ("rgba_png", "la_png"):
        array = load_image(corpus[name][0], 40).astype(int)
        assert array[:, 0].min() >= 240, name
        assert array[:, -1].mean() < 200, name
    trns = load_image(corpus["palette_transparent_png"][0], S)
    assert (trns == 255).all(axis=-1).any()  # palette index 0 became white, not black


@pytest.mark.parametrize("value, expected", [(65535, 255), (32768, 128), (256, 1)])
def test_16_bit_scaled_not_clipped(tmp_path, value, expected):
    path = tmp_path / "gray16.png"
    write_gray16(path, value)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    array = load_image(path, S)
    assert np.abs(array.astype(int) - expected).max() <= 1


def test_16_bit_ramp_and_mode_i(corpus):
    png = load_image(corpus["gray16_png"][0], S).astype(int)
    tif = load_image(corpus["gray32_tiff"][0], S).astype(int)
    assert png[0, 0, 0] < 10 and png[-1, -1, 0] > 245  # the full range survives, not clipped at 255
    assert np.array_equal(png, tif)
    rgb48 = load_image(corpus["rgb48_png"][0], 40).astype(int)
    assert np.abs(rgb48[..., 2] - 96).max() <= 1


def test_cmyk_red_is_red(corpus):
    array = load_image(corpus["cmyk_red_jpeg"][0], S).astype(int)
    assert np.abs(array - [255, 0, 0]).max() <= 10
    cmyk = load_image(corpus["cmyk_jpeg"][0], S).astype(int)
    rgb = load_image(corpus["rgb_jpeg"][0], S).astype(int)
    assert np.abs(cmyk - rgb).mean() < 6  # same gradient, not inverted


def test_animated_gif_first_frame(corpus):
    array = load_image(corpus["animated_gif"][0], S).astype(int)
    assert np.abs(array - [255, 0, 0]).max() <= 2


def test_exif_orientation_applied(corpus):
    # stored: 40 x 30, red top-left quadrant; Orientation 6 = rotate 90° clockwise → red top-right
    array = load_image(corpus["exif_rotated_jpeg"][0], 40).astype(int)
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    assert np.abs(array[3, -4] - red).max() < 40
    assert np.abs(array[3, 3] - blue).max() < 40
    assert np.abs(array[-4, -4] - blue).max() < 40
    # and it matches the upright content rotated and resized the same way
    upright = Image.fromarray(np.rot90(marker_image(), k=-1).copy()).resize((40, 40), Image.Resampling.BILINEAR)
    assert np.abs(array - np.asarray(upright, dtype=int)).mean() < 8


def test_jpeg_draft_close_to_full_decode(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(gradient(1600, 1200)).save(path, quality=95)
    array = load_image(path, 64).astype(int)
    full = Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
    assert np.abs(array - np.asarray(full, dtype=int)).mean() < 3


def _mixed_items(corpus):
    order = ["rgb_jpeg", "zero_byte_jpg", "gray_jpeg", "cmyk_jpeg", "truncated_jpeg", "palette_png",
             "missing_jpg", "rgba_png", "animated_gif", "text_named_jpg", "bomb_png", "exif_rotated_jpeg",
             "directory_jpg", "gray16_png"]
    return [(name, corpus[name][0]) for name in order]


def test_iter_batches_order_failures_and_contents(corpus):
    items = _mixed_items(corpus)
    batches = list(iter_batches(items, S, batch_size=4, workers=2, prefetch=1))
    assert len(batches) == 4  # ceil(14 / 4)
    good_keys, bad_keys = [], []
    for index, (keys, batch, failures) in enumerate(batches):
        chunk = items[4 * index: 4 * index + 4]
        assert keys == [key for key, _ in chunk if corpus[key][1]]
        assert [key for key, _, _ in failures] == [key for key, _ in chunk if not corpus[key][1]]
        assert batch.dtype == np.uint8 and batch.shape == (len(keys), S, S, 3)
        for key, row in zip(keys, batch):
            assert np.array_equal(row, load_image(corpus[key][0], S))
        for key, path, reason in failures:
            assert path == corpus[key][0]
            assert REASON_KEYWORDS[key] in reason.lower()
        good_keys += keys
        bad_keys += [key for key, _, _ in failures]
    expected_good = [key for key, _ in items if corpus[key][1]]
    assert good_keys == expected_good
    assert sorted(bad_keys) == sorted(key for key, _ in items if not corpus[key][1])
    assert sum(len(b[0]) for b in batches) == sum(b[1].shape[0] for b in batches) == len(expected_good)


def test_iter_batches_all_failed_batch_and_empty_input(corpus):
    bad = [(name, path) for name, path in _bad(corpus).items()][:3]
    [(keys, batch, failures)] = list(iter_batches(bad, S, batch_size=4, workers=1))
    assert keys == [] and batch.shape == (0, S, S, 3) and len(failures) == 3
    assert list(iter_batches([], S, batch_size=4)) == []


def test_iter_batches_bounded_lookahead_and_early_stop(corpus):
    pulled = []
    path = corpus["rgb_jpeg"][0]

    def endless():
        for i in range(10_000):
            pulled.append(i)
            yield i, path

    generator = iter_batches(endless(), S, batch_size=4, workers=2, prefetch=2)
    keys, batch, _ = next(generator)
    assert keys == [0, 1, 2, 3] and batch.shape == (4, S, S, 3)
    assert len(pulled) <= 4 * (2 + 2)  # the yielded batch + `prefetch` in flight (+ one being read)
    generator.close()  # must not hang or leak threads


def test_iter_batches_unexpected_errors_reach_consumer(corpus, monkeypatch):
    def broken(path, image_size, max_pixels):
        raise RuntimeError("bug")

    monkeypatch.setattr(images, "load_image", broken)
    with pytest.raises(RuntimeError, match="bug"):
        list(iter_batches([("a", corpus["rgb_jpeg"][0])], S, batch_size=2, workers=1))


def test_a_folder_lists_tiff_and_jfif_images_and_logs_the_files_it_leaves_out(tmp_path):
    from pipeline.folders import list_images
    from tests.conftest import captioner_log
    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "b.tif", "sub/c.TIFF", "d.jfif"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name, format="TIFF" if "tif" in name.lower()
                                                     else "JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "captions.csv").write_text("x")
    with captioner_log() as lines:
        assert list(list_images(tmp_path)) == ["a.jpg", "b.tif", "d.jfif", "sub/c.TIFF"]
    assert lines == [f"{tmp_path}: 2 files left out, not images by their names (1 × .txt, 1 × .csv); images: "
                     ".bmp .gif .jfif .jpeg .jpg .png .tif .tiff .webp"]
