"""How often the exported SavedModel's captions equal the pipeline's (not run by pytest), through both loaders:
eager `tf.saved_model.load`, and the graph-mode one TF Serving and `saved_model_cli run` use
(`tf.compat.v1.saved_model.loader.load`, variables restored by the graph's saver). Imports only TensorFlow.

    python tests/benchmarks/export_agreement.py EXPORT_DIR work/captions/<fp>/test.json "work/demo/*/test/*.jpg"

EXPORT_DIR: from `captioner export work/models/<fp> EXPORT_DIR`; the captions file: GenerateCaptions' output for
the same model; the glob: the split's images (demo file names end in the image id).
"""
import glob
import json
import re
import sys
import time

import tensorflow as tf

BATCH = 16


def eager(export_dir, batches):
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    for batch in batches:
        yield serve(images=tf.constant(batch))["captions"].numpy()


def graph_mode(export_dir, batches):
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        signature = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export_dir).signature_def["serving_default"]
        images, captions = signature.inputs["images"].name, signature.outputs["captions"].name
        for batch in batches:
            yield sess.run(captions, {images: batch})


def main(export_dir, captions_file, pattern):
    want = {c["image_id"]: c["caption"] for c in json.load(open(captions_file))}
    paths = sorted(glob.glob(pattern))
    ids = [int(re.search(r"(\d+)\.\w+$", path).group(1)) for path in paths]
    batches = [[open(p, "rb").read() for p in paths[k:k + BATCH]] for k in range(0, len(paths), BATCH)]
    for name, run in (("eager tf.saved_model.load", eager), ("graph-mode loader (TF Serving's)", graph_mode)):
        start = time.time()
        got = dict(zip(ids, (c.decode() for out in run(export_dir, batches) for c in out)))
        same = sum(got.get(i) == c for i, c in want.items())
        print(f"{name}: {same}/{len(want)} captions agree; {len(got)} images loaded and served in "
              f"{time.time() - start:.1f} s")


if __name__ == "__main__":
    main(*sys.argv[1:4])
