"""How often the exported SavedModel's captions equal the pipeline's (not run by pytest). Imports only TensorFlow.

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

serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
want = {c["image_id"]: c["caption"] for c in json.load(open(sys.argv[2]))}
paths = sorted(glob.glob(sys.argv[3]))
got, start = {}, time.time()
for k in range(0, len(paths), 16):
    batch = paths[k:k + 16]
    out = serve(images=tf.constant([open(p, "rb").read() for p in batch]))
    for path, caption in zip(batch, out["captions"].numpy()):
        got[int(re.search(r"(\d+)\.\w+$", path).group(1))] = caption.decode()
same = sum(got.get(i) == c for i, c in want.items())
print(f"{same}/{len(want)} captions agree; {len(got)} images served in {time.time() - start:.1f} s")
