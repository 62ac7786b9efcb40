"""`captioner export`: the SavedModel gives the pipeline's captions for the same images, loaded in a fresh process
by the graph-mode loader TF Serving uses (`saved_model_cli run`) and by eager `tf.saved_model.load`."""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from pipeline import export as export_lib, images as images_lib
from cli import main as cli
from tests.conftest import copy_workspace, run_luigi

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
SAVED_MODEL_CLI = Path(sys.executable).with_name("saved_model_cli")   # a console script of tensorflow
EAGER = """
import json, sys
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = serve(images=tf.constant(np.load(sys.argv[2], allow_pickle=True)))
assert not {"pipeline", "tasks", "storage"} & set(sys.modules)       # no project code was needed
print(json.dumps({"captions": [c.decode() for c in out["captions"].numpy()], "scores": out["scores"].numpy().tolist()}))
"""


def encoded(array, fmt, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


def upright_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, features_template):
    """A tiny model trained by the real pipeline (configs/test.cfg, random:0 encoder) on features already
    extracted, GenerateCaptions' captions of its test split, its export, and the images to serve: the test
    split's JPEGs, then new images the pipeline captions with `captioner caption` (EXIF-rotated, RGBA PNG, large
    JPEG, tall PNG)."""
    workdir = copy_workspace(features_template, tmp_path_factory.mktemp("w") / "w")
    run = run_luigi("GenerateCaptions", "--split", "test", workdir=workdir)
    assert run.returncode == 0, run.output
    model_dir, = workdir.glob("models/[!.]*")
    by_id = {r["image_id"]: r["caption"] for r in json.loads(next(workdir.glob("captions/*/test.json")).read_text())}
    split = sorted(workdir.glob("demo/*/test/*.jpg"))
    expected = [by_id[int(re.search(r"(\d+)\.jpg$", p.name).group(1))] for p in split]

    new = tmp_path_factory.mktemp("new")
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in split[:4]]
    (new / "rotated.jpg").write_bytes(encoded(pixels[0].transpose(1, 0, 2)[::-1], "JPEG", exif=upright_exif(6)))
    alpha = np.linspace(0, 255, pixels[1].shape[1]).astype(np.uint8)[None, :, None].repeat(pixels[1].shape[0], 0)
    (new / "alpha.png").write_bytes(encoded(np.concatenate([pixels[1], alpha], -1), "PNG"))
    (new / "large.jpg").write_bytes(encoded(np.asarray(Image.fromarray(pixels[2]).resize((1800, 1300))), "JPEG"))
    (new / "tall.png").write_bytes(encoded(np.asarray(Image.fromarray(pixels[3]).resize((260, 700))), "PNG"))
    others = sorted(new.iterdir())
    runner = CliRunner()
    listed = runner.invoke(cli, ["caption", *map(str, split + others), "--model", str(model_dir), "--json"])
    assert listed.exit_code == 0, listed.output
    pipeline_side = json.loads(listed.stdout)
    expected += [r["caption"] for r in pipeline_side[len(split):]]

    out = tmp_path_factory.mktemp("exports") / "captioner" / "1"
    result = runner.invoke(cli, ["export", str(model_dir), str(out)])
    assert result.exit_code == 0, result.output
    inputs = out.parent.parent / "in.npy"
    np.save(inputs, np.array([p.read_bytes() for p in split + others], dtype=object), allow_pickle=True)
    return {"model": model_dir, "export": out, "inputs": inputs, "captions": expected,
            "scores": [r["score"] for r in pipeline_side], "split": len(split)}


def test_session_loader_serves_the_pipelines_captions(exported, tmp_path):
    """`saved_model_cli run` restores the variables through the graph's saver and runs the signature in a
    tf.compat.v1.Session, as TF Serving does: every variable must be restored, and every caption equal."""
    run = subprocess.run([str(SAVED_MODEL_CLI), "run", "--dir", str(exported["export"]),
                          "--tag_set", "serve", "--signature_def", "serving_default",
                          "--inputs", f"images={exported['inputs']}", "--outdir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    captions = [c.decode() for c in np.load(tmp_path / "out" / "captions.npy", allow_pickle=True)]
    assert captions == exported["captions"]                                      # all of them
    assert len(captions) == exported["split"] + 4
    scores = np.load(tmp_path / "out" / "scores.npy")
    np.testing.assert_allclose(scores, exported["scores"], atol=2e-5)           # `caption` rounds to 5 places
    attention = np.load(tmp_path / "out" / "attention.npy")
    assert attention.dtype == np.float32 and attention.shape == (len(captions), 20, 64)
    words = attention.sum(-1)
    assert np.allclose(words[words > 0], 1, atol=1e-4)                           # a distribution per word


def test_eager_loader_serves_the_same_captions_with_no_project_code(exported, tmp_path):
    run = subprocess.run([sys.executable, "-I", "-c", EAGER, str(exported["export"]), str(exported["inputs"])],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["captions"] == exported["captions"]
    np.testing.assert_allclose(out["scores"], exported["scores"], atol=2e-5)


def test_export_records_what_it_holds_and_never_overwrites(exported):
    about = json.loads((exported["export"] / "assets.extra" / "captioner.json").read_text())
    assert about["model"] == str(exported["model"]) and about["decoding"]["beam_size"] == 3
    assert about["preprocessing"]["resampling"] in export_lib.PASS_ORDERS
    assert about["variables"] == len(tf.train.list_variables(str(exported["export"] / "variables" / "variables"))) - 1
    again = CliRunner().invoke(cli, ["export", str(exported["model"]), str(exported["export"])])
    assert again.exit_code != 0 and "not empty" in again.output


def test_preprocessing_computes_the_pipelines_pixels(tmp_path):
    """pixels() against pipeline.images.load_image: both resampling pass orders, Pillow's reduced-size JPEG
    decoding, every EXIF orientation in both byte orders, alpha, 16-bit and grayscale PNGs, GIF, BMP."""
    size, order = 47, export_lib.pass_order()
    assert order is not None
    rng = np.random.default_rng(0)
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)).resize((180, 120),
                                                                                                Image.BICUBIC))
    cases = {f"{w}x{h}.{fmt}": encoded(np.asarray(Image.fromarray(base).resize((w, h))), fmt)
             for w, h in ((46, 48), (48, 46), (50, 60), (50, 53), (50, 54), (47, 47), (600, 400), (1, 90))
             for fmt in ("JPEG", "PNG")}
    for orientation in range(1, 9):
        for endian in "<>":
            exif = Image.Exif()
            exif[0x0112], exif.endian = orientation, endian
            cases[f"exif{orientation}{endian}.jpg"] = encoded(base, "JPEG", exif=exif.tobytes())
    rgba = np.concatenate([base, rng.integers(0, 256, (120, 180, 1), dtype=np.uint8)], -1)
    cases.update({"rgba.png": encoded(rgba, "PNG"), "gray.jpg": encoded(base[..., 0], "JPEG"),
                  "la.png": encoded(rgba[..., ::2], "PNG"), "bmp": encoded(base, "BMP"),
                  "16bit.png": tf.io.encode_png(tf.constant(base.astype(np.uint16) * 257 + 99)).numpy(),
                  "gif": encoded(base, "GIF")})
    compute = tf.function(lambda data: export_lib.pixels(data, size, order))
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        np.testing.assert_array_equal(compute(tf.constant(data)).numpy(),
                                      images_lib.load_image(tmp_path / name, size), err_msg=name)

