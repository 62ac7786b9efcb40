"""CaptionImages' throughput against its parts measured alone, side by side in one process (not run by pytest).

    python tests/benchmarks/bench_caption_images.py [--model work/models/<fp>] [--images 96] [--runs 3]

Times, each run on a fresh feature store, sides alternating, both warmed first (encoder built and traced,
decoder compiled):
  parts    pipeline.features.extract_shard over the folder's images, then pipeline.decode.caption_rows over
           their features (batched beam search): the ceiling, with nothing else;
  ours     pipeline.folders.caption_folder: list and hash the folder, extract, decode, write captions.jsonl,
           .csv, attention.h5, listing and report — what `luigi --module tasks CaptionImages` runs.
Prints images/s of each (median and spread over the runs) and ours/parts (goal ≥ 0.8).
Needs a trained model (the Quick start makes one); its encoder must be the digits or random one.
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import decode, features, folders  # noqa: E402
from pipeline.digits.demo import write_demo_dataset  # noqa: E402
from pipeline.inputs import shard_rows  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from storage import shards  # noqa: E402
from storage.contents import ContentCache  # noqa: E402
from storage.workspace import file_sha256, resolve  # noqa: E402


def encoder_of(model_dir: Path) -> dict:
    _, _, provenance = load_model(model_dir)
    recorded = provenance["encoder"]
    if recorded["weights"] == "random":
        return {"weights": "random", "seed": recorded["seed"], "init": "he_normal"}
    path = resolve(provenance["weights_path"], model_dir.parents[1])
    assert file_sha256(path) == (recorded.get("sha256") or provenance.get("weights_sha256"))
    return {"weights": "file", "path": str(path), "sha256": file_sha256(path)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    model_dir = args.model or max(Path("work/models").glob("[!.]*"), key=lambda d: d.stat().st_mtime)
    identity = encoder_of(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix="bench-caption-images-"))
    write_demo_dataset(tmp / "demo", args.images, 1, 1, seed=23)
    folder = tmp / "demo" / "train"
    listing = folders.list_images(folder)
    extract = lambda path, images: features.extract_shard(path, images, identity, 299, args.batch, {"split": "folder"})
    rows = lambda index, store: decode.caption_rows(model_dir, shard_rows(store, index), 3, 20, 1.0, True, 64)

    def parts(store):
        items = [[str(k), k, str(folder), path] for k, path in enumerate(listing)]
        extract(store / "shard-parts-00000.h5", items)
        found, _, _ = shards.store_contents(store)
        rows({"images": {int(k): place for k, place in found.items()}}, store)

    def ours(store):
        out = tmp / f"out-{time.monotonic_ns()}"
        out.mkdir()
        with ContentCache(store / "contents.sqlite") as cache:   # a new cache: every file is hashed, as on a first run
            folders.caption_folder(out, folder, listing, None, store, cache, extract,
                                   lambda index: rows(index, store), 250, "shard-folder-bench", "mixed10")

    def timed(fn):
        store = tmp / f"store-{time.monotonic_ns()}"
        store.mkdir()
        start = time.perf_counter()
        fn(store)
        seconds = time.perf_counter() - start
        shutil.rmtree(store)
        return seconds

    timed(parts)                                   # warm both: encoder traced, decoder compiled, files cached
    timed(ours)
    times = {"parts": [], "ours": []}
    for _ in range(args.runs):
        for name, fn in (("parts", parts), ("ours", ours)):
            times[name].append(timed(fn))
    rate = {k: [args.images / t for t in v] for k, v in times.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"{args.images} demo images, model {model_dir.name}, {args.runs} alternating runs after a warm-up")
    for name in ("parts", "ours"):
        r = rate[name]
        print(f"  {name:<6} {statistics.median(r):6.1f} images/s  (min {min(r):.1f}, max {max(r):.1f})")
    ratios = [o / p for o, p in zip(rate["ours"], rate["parts"])]
    print(f"  ours/parts {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); goal ≥ 0.80")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
