"""Bookkeeping at a million images: wall time, peak memory and CPU time of the stages before feature
extraction, each run as a user runs it, `luigi --module tasks ...` in its own process (not run by pytest).

    .venv/bin/python tests/benchmarks/bench_bookkeeping.py [--images 1000000] [--runs 3] [--data DIR]
                                                           [--checkout DIR ...]

Generates (once, kept in --data for later runs) a COCO captions file of N images with 5 captions each in COCO's
layout (images and annotations in random order, sparse image ids, Zipf-distributed words), and the image files
as symbolic links to 8 small JPEGs (160x120, a few KB) written with Pillow. The config names only the data, as
a user's does (configs/luigi.cfg lies underneath), plus `[encoder] weights = random:0`: the ImageNet file cannot
be fetched offline, and nothing is extracted here (the weights only name the feature store). Each run, in a new
workspace:

  annotations+vocabulary  `luigi --module tasks BuildVocabulary`: ExtractAnnotations, then BuildVocabulary
  plan                    `luigi --module tasks PlanShards`: every image hashed (a new content cache), planned
  no-op rerun             `luigi --module tasks PlanShards` again: nothing to do
  stat check              what ExtractFeatures and its completeness check add on a rerun, in one process: the
                          listing digest (a stat of every image) and the content keys (a stat and a cache
                          look-up each) of every split

It prints the wall seconds, peak RSS (os.wait4's ru_maxrss of that process) and CPU seconds (user + system, less
moved than wall time by other work on a shared machine) of each, median and min-max over the runs. With several
--checkout directories (e.g. an older commit: `git archive <commit> | tar -x -C DIR`) every round runs each
checkout in turn, alternating, with this repository's virtualenv.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CAPTIONS_PER_IMAGE = 5
REAL_IMAGES = 8
STEPS = ("annotations+vocabulary", "plan", "no-op rerun", "stat check")
STAT_CHECK = """
import sys, time
from pathlib import Path
from pipeline import listing
from tasks import context
from tasks.config import workspace_root
annotations = next(p for p in (workspace_root() / "annotations").iterdir() if not p.name.startswith("."))
for split in ("train", "val", "test"):
    listing.listing_digest(annotations, split, context.image_root)
    context.content_keys(annotations, split)
"""


# ------------------------------------------------------------------------------------------------- data

def pseudo_words(rng, n: int) -> list[str]:
    """n distinct lowercase words made of syllables."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words, seen = [], set()
    while len(words) < n:
        word = "".join(rng.choice(syllables, rng.integers(1, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def captions_of(rng, words: list[str], n: int) -> list[str]:
    """n captions of 8-16 Zipf-distributed words, capitalised, some with a comma or a possessive, a full stop."""
    p = 1.0 / np.arange(1, len(words) + 1)
    picks = rng.choice(len(words), size=(n, 16), p=p / p.sum())
    lengths = rng.integers(8, 17, n)
    extras = rng.random(n)
    out = []
    for row, length, extra in zip(picks.tolist(), lengths.tolist(), extras.tolist()):
        chosen = [words[j] for j in row[:length]]
        if extra < 0.1:
            chosen[2] += "'s"
        elif extra < 0.2:
            chosen[4] += ","
        text = " ".join(chosen)
        out.append(text[0].upper() + text[1:] + ".")
    return out


def generate(data: Path, n_images: int, seed: int = 0) -> None:
    """captions.json, images/ (symbolic links) and real/ (the JPEGs) under `data`; kept when already made."""
    marker = data / "generated.json"
    wanted = {"images": n_images, "captions_per_image": CAPTIONS_PER_IMAGE, "seed": seed, "version": 2}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return
    start = time.perf_counter()
    shutil.rmtree(data, ignore_errors=True)
    (data / "real").mkdir(parents=True)
    (data / "images").mkdir()
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:120, 0:160]
    for k in range(REAL_IMAGES):   # small smooth pictures, a few KB each
        pixels = np.stack([(x * (k + 1) + y) % 256, (y * 2 + 40 * k) % 256, (x + y * k) % 256], -1).astype(np.uint8)
        Image.fromarray(pixels).save(data / "real" / f"{k}.jpg", quality=85)
    ids = (rng.choice(4 * n_images, n_images, replace=False) + 1).tolist()   # sparse, in random order like COCO
    for image_id in ids:
        os.symlink(f"../real/{image_id % REAL_IMAGES}.jpg", data / "images" / f"{image_id:012d}.jpg")
    words = pseudo_words(rng, 9000)
    tmp = data / "captions.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('{"info": {"description": "synthetic COCO-form captions", "version": "1.0", "year": 2017}, '
                '"licenses": [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 1, '
                '"name": "Attribution License"}], "images": [')
        for k, image_id in enumerate(ids):
            name = f"{image_id:012d}.jpg"
            f.write(f'{", " if k else ""}{{"license": 1, "file_name": "{name}", '
                    f'"coco_url": "http://images.cocodataset.org/train2017/{name}", "height": 480, "width": 640, '
                    f'"date_captured": "2013-11-14 16:28:13", '
                    f'"flickr_url": "http://farm4.staticflickr.com/3153/9833{image_id:07d}_0e5c0a4f4c_z.jpg", '
                    f'"id": {image_id}}}')
        f.write('], "annotations": [')
        order = rng.permutation(n_images * CAPTIONS_PER_IMAGE)
        chunk = 200_000
        for start_at in range(0, len(order), chunk):
            part = order[start_at:start_at + chunk]
            texts = captions_of(rng, words, len(part))
            f.write(("" if start_at == 0 else ", ") + ", ".join(
                f'{{"image_id": {ids[j // CAPTIONS_PER_IMAGE]}, "id": {j + 1}, "caption": {json.dumps(text)}}}'
                for j, text in zip(part.tolist(), texts)))
        f.write("]}\n")
    os.replace(tmp, data / "captions.json")
    marker.write_text(json.dumps(wanted))
    print(f"generated {n_images:,} images / {n_images * CAPTIONS_PER_IMAGE:,} captions in {data} "
          f"({(data / 'captions.json').stat().st_size / 2 ** 20:.0f} MiB) in {time.perf_counter() - start:.0f} s",
          flush=True)


def write_config(data: Path) -> Path:
    cfg = data / "bench.cfg"
    cfg.write_text(f"[dataset]\nsource = coco\nannotations = {data / 'captions.json'}\nimages = {data / 'images'}\n\n"
                   "# the ImageNet file cannot be fetched offline; nothing is extracted here\n"
                   "[encoder]\nweights = random:0\n")
    return cfg


# -------------------------------------------------------------------------------------------- measuring

def measured(command: list[str], env: dict, cwd: Path, log: Path) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB, CPU seconds) of one process; exits with its log's tail when it fails."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} in {cwd} exited {proc.returncode}; last lines of {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-15:]))
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def one_round(checkout: Path, data: Path, cfg: Path, label: str) -> dict:
    workspace = data / f"work-{label}"
    shutil.rmtree(workspace, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LUIGI_CONFIG_PATH", "PYTHONPATH")}
    env.update(LUIGI_CONFIG_PATH=str(cfg), CAPTIONER_WORKDIR=str(workspace), PYTHONPATH=str(checkout),
               TF_CPP_MIN_LOG_LEVEL="2")
    luigi = [str(Path(sys.executable).with_name("luigi")), "--module", "tasks"]
    commands = {"annotations+vocabulary": luigi + ["BuildVocabulary"], "plan": luigi + ["PlanShards"],
                "no-op rerun": luigi + ["PlanShards"], "stat check": [sys.executable, "-c", STAT_CHECK]}
    result = {}
    for step in STEPS:
        result[step] = measured(commands[step], env, checkout, data / f"{label}-{step.replace(' ', '-')}.log")
        print(f"  {label:<28} {step:<24} {result[step][0]:7.1f} s {result[step][1]:7.0f} MiB "
              f"{result[step][2]:7.1f} s CPU", flush=True)
    report = next((workspace / "annotations").glob("[!.]*/report.json"))
    result["splits"] = json.loads(report.read_text())["splits"]
    result["annotations MiB"] = sum(p.stat().st_size for p in report.parent.iterdir()) / 2 ** 20
    shutil.rmtree(workspace)
    return result


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, help="default: /tmp/captioner-bookkeeping-<images>")
    parser.add_argument("--checkout", type=Path, action="append",
                        help="a source tree to run (repeatable; default: this repository)")
    args = parser.parse_args()
    data = (args.data or Path(f"/tmp/captioner-bookkeeping-{args.images}")).resolve()
    checkouts = [c.resolve() for c in args.checkout or [REPO]]
    generate(data, args.images)
    cfg = write_config(data)
    print(f"machine: {machine()}")
    print(f"data: {args.images:,} images / {args.images * CAPTIONS_PER_IMAGE:,} captions, "
          f"{(data / 'captions.json').stat().st_size / 2 ** 20:.0f} MiB of JSON; {args.runs} rounds"
          + (", checkouts alternating" if len(checkouts) > 1 else ""), flush=True)
    results = {c: [] for c in checkouts}
    for run in range(args.runs):
        for k, checkout in enumerate(checkouts):
            results[checkout].append(one_round(checkout, data, cfg, f"{k}-{checkout.name}-{run}"))
    print(f"machine at the end: load average {os.getloadavg()[0]:.1f}")
    for checkout, runs in results.items():
        print(f"{checkout} (annotations output {statistics.median(r['annotations MiB'] for r in runs):.0f} MiB; "
              + ", ".join(f"{s} {c['images']:,} images / {c['captions']:,} captions"
                          for s, c in runs[0]["splits"].items()) + ")")
        for step in STEPS:
            seconds, mib, cpu = ([r[step][k] for r in runs] for k in range(3))
            print(f"  {step:<24} {statistics.median(seconds):7.1f} s ({min(seconds):.1f}-{max(seconds):.1f})"
                  f" {statistics.median(mib):7.0f} MiB ({min(mib):.0f}-{max(mib):.0f})"
                  f" {statistics.median(cpu):7.1f} s CPU ({min(cpu):.1f}-{max(cpu):.1f})")


if __name__ == "__main__":
    main()
