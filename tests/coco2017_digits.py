"""The demo's digit scenes in COCO 2017 form (docs/results.md, "The digits in COCO 2017 form"):

    .venv/bin/python -m tests.coco2017_digits /data/digits2017

writes train2017/ and val2017/ (%012d.jpg), annotations/captions_{train,val}2017.json (with each image's
"digits" and "digit_boxes") and dataset_coco.json (a Karpathy split: 1200 train, 100 val, 100 test, the last
two in val2017). Each image's five references are five different phrasings, none of them the demo's. Layout
and rendering come from pipeline.digits.demo; digit samples from the demo pools of [demo] seed 1797 (the digits
encoder pretrains on that train pool only, so val and test digits stay unseen), scenes from another seed.
Point a config at it with `[dataset] source = coco`, the two caption files, the two image folders and
`karpathy_split` (docs/results.md has the config)."""
import json
import os
import re
import sys

import numpy as np
from PIL import Image

from pipeline.digits import demo

NUM = demo.NUMBER_WORDS


def forms(w):
    """The five references of an image showing the number words `w`, left to right."""
    n = len(w)
    plural = n > 1
    return [
        f"{n} digit{'s' if plural else ''}: {' '.join(w)}",
        f"handwritten {', '.join(w)}",
        f"a scan of the number {' '.join(w)}",
        (f"there are {demo.COUNT_WORDS[n]} digits, {' then '.join(w)}, left to right" if plural
         else f"there is one digit, a {w[0]}"),
        f"{' '.join(w)} in pen on paper",
    ]


def main(out):
    counts = {"train": 1200, "val": 100, "test": 100}
    pools = demo.sample_pools(np.random.default_rng(1797), len(demo.load_digits().target))
    rng = np.random.default_rng(2026)
    digits = demo.load_digits()
    ids = iter(np.sort(rng.choice(999_999, size=sum(counts.values()), replace=False) + 1).tolist())
    os.makedirs(f"{out}/annotations", exist_ok=True)
    coco = {"train2017": {"images": [], "annotations": []}, "val2017": {"images": [], "annotations": []}}
    karpathy, ann_id = [], 1
    for split, n in counts.items():
        folder = "train2017" if split == "train" else "val2017"
        os.makedirs(f"{out}/{folder}", exist_ok=True)
        for _ in range(n):
            image_id = next(ids)
            samples = rng.choice(pools[split], size=int(rng.integers(1, 5))).tolist()
            pixels, boxes = demo.render_scene(rng, digits.images, samples)
            name = f"{image_id:012d}.jpg"
            Image.fromarray(pixels, "RGB").save(f"{out}/{folder}/{name}", "JPEG", quality=90)
            labels = [int(digits.target[k]) for k in samples]
            caps = forms([NUM[d] for d in labels])
            coco[folder]["images"].append({"id": image_id, "file_name": name, "width": pixels.shape[1],
                                           "height": pixels.shape[0], "digits": labels,
                                           "digit_boxes": [list(b) for b in boxes]})
            sents = []
            for c in caps:
                coco[folder]["annotations"].append({"id": ann_id, "image_id": image_id, "caption": c})
                sents.append({"raw": c, "tokens": re.findall(r"[a-z0-9]+", c.lower()), "sentid": ann_id})
                ann_id += 1
            karpathy.append({"cocoid": image_id, "filepath": folder, "filename": name, "split": split,
                             "sentences": sents})
    for folder, data in coco.items():
        json.dump({"info": {}, "licenses": [], **data}, open(f"{out}/annotations/captions_{folder}.json", "w"))
    json.dump({"dataset": "coco", "images": karpathy}, open(f"{out}/dataset_coco.json", "w"))
    print({s: n for s, n in counts.items()}, ann_id - 1, "captions")


if __name__ == "__main__":
    main(sys.argv[1])
