"""How close extraction runs to the machine's limits (not run by pytest).

    python tests/benchmarks/bench_limits.py [--layer mixed10] [--images 64] [--runs 3]

Prints
  - InceptionV3's multiply-adds per image up to `--layer` at 299×299 (every convolution: output positions ×
    output channels × kernel area × input channels; batch norms, pools and activations left out);
  - the bare forward pass's images/s at float32 and bfloat16 (random:0 weights, batch 16, pre-made uint8
    tensors, the two alternating `--runs` times after a warm-up: median and min–max), and the FLOP/s that is
    (2 FLOP per multiply-add);
  - JPEG decoding + resizing to 299×299 with pipeline/images.py's load_image on one core: images/s for
    640×480 photographs (COCO's typical size; synthetic, with a photograph's mix of smooth areas and edges)
    and for the demo's images.
The CPU's peaks and the GPU arithmetic are in docs/results.md ("How close to the limit"), from these numbers.
"""
import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from pipeline import encoder as encoder_lib, features  # noqa: E402
from pipeline.digits.demo import write_demo_dataset  # noqa: E402
from pipeline.images import load_image  # noqa: E402


def multiply_adds(layer: str, size: int = 299) -> int:
    """Multiply-adds of every convolution of InceptionV3 up to `layer` for one size × size image."""
    import keras

    model = encoder_lib.truncated(encoder_lib.build_inception(encoder_lib.resolve_weights("random:0"), size), layer)
    total = 0
    for conv in (l for l in model.layers if isinstance(l, keras.layers.Conv2D)):
        _, h, w, c_out = conv.output.shape
        kh, kw, c_in, _ = conv.kernel.shape
        total += h * w * c_out * kh * kw * c_in
    return int(total)


def photograph(rng, width=640, height=480) -> bytes:
    """A JPEG of a photograph's statistics: smooth gradients, a few shapes with edges, sensor noise."""
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * rng.uniform(0.1, 0.4) + y * rng.uniform(0.1, 0.4) + rng.uniform(0, 120)) % 256
                     for _ in range(3)], -1)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        draw.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noisy = np.asarray(image, np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def decode_rate(paths, repeats: int = 3) -> float:
    """load_image (decode, orient, resize to 299×299) images/s on one core, best of `repeats` passes."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for p in paths:
            load_image(p, 299)
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", default="mixed10", choices=[k for k in encoder_lib.LAYERS if "+" not in k])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import tensorflow as tf

    macs = multiply_adds(args.layer)
    identity = encoder_lib.resolve_weights("random:0")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (16, 299, 299, 3), dtype=np.uint8) for _ in range(max(args.images // 16, 1))]
    forwards = {p: features.encoder_forward(identity, 299, args.layer, p) for p in ("float32", "bfloat16")}
    for forward in forwards.values():                       # trace and warm both alike
        forward(batches[0]).numpy()
    rates = {p: [] for p in forwards}
    for _ in range(args.runs):
        for precision, forward in forwards.items():
            start = time.perf_counter()
            for batch in batches:
                forward(batch).numpy()
            rates[precision].append(16 * len(batches) / (time.perf_counter() - start))

    tmp = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    photos = []
    for k in range(40):
        path = tmp / f"photo-{k}.jpg"
        path.write_bytes(photograph(rng))
        photos.append(str(path))
    write_demo_dataset(tmp / "demo", 40, 1, 1, seed=3)
    demo = sorted(str(p) for p in (tmp / "demo" / "train").glob("*.jpg"))

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}")
    print(f"InceptionV3 up to {args.layer} at 299x299: {macs / 1e9:.2f} G multiply-adds per image "
          f"({2 * macs / 1e9:.2f} GFLOP)")
    for precision, r in rates.items():
        median = statistics.median(r)
        print(f"bare forward {precision:<8} {median:6.2f} images/s (min {min(r):.2f}, max {max(r):.2f})  = "
              f"{median * 2 * macs / 1e9:.0f} GFLOP/s achieved")
    print(f"JPEG decode + resize on one core: {decode_rate(photos):.0f} images/s (640x480 photographs), "
          f"{decode_rate(demo):.0f} images/s (demo images)")


if __name__ == "__main__":
    main()
