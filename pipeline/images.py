"""Robust image loading for feature extraction: any file → uint8 RGB (S, S, 3), or an ImageError with a reason.

The format is decided by content (Pillow sniffs magic bytes), never by the extension. Every odd mode is
mapped to RGB explicitly (alpha onto white, 16-bit by its high byte, CMYK via Pillow's conversion), EXIF
orientation is applied, and the pixel count is checked from the header before any pixel is decoded.

Failures are of two kinds. An ImageError is a fact about the file that rerunning will not change — not found,
a directory, empty, not an image, truncated, corrupt, too large — and the image is skipped and reported. A
TransientReadError is a failure to READ the file (permission denied, I/O error, a stale network mount, …): it
propagates, the shard task fails, and the next run tries the image again; it is never recorded as skipped.

iter_batches decodes in a thread pool ahead of the consumer: Pillow releases the GIL while decoding and
resizing, so a few threads keep a CNN fed. Nothing here imports tensorflow (the Luigi scheduler imports it).
"""
from __future__ import annotations

import collections
import itertools
import os
import re
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 8192 x 8192 = 67 MP. COCO / Flickr images are ~0.3 MP and full-frame cameras top out near 61 MP, so no
# real photo is refused, while the worst accepted non-JPEG (PNG/TIFF, decoded in full; JPEGs are decoded at
# 1/8 scale via draft) costs ~4 bytes/px x 67 MP ≈ 270 MB per worker thread. It is also below Pillow's own
# warning threshold (Image.MAX_IMAGE_PIXELS = 89.5 MP), so Pillow's guard never decides for us.
DEFAULT_MAX_PIXELS = 8192 * 8192

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Image.open is the only place Pillow warns about decompression bombs for a first frame; warnings.catch_warnings
# mutates process-global state, so concurrent entries are serialised. Open only parses the header: cheap.
_OPEN_LOCK = threading.Lock()


class ImageError(Exception):
    """An image that cannot be used; str(e) is a short human reason, e.g. 'zero-byte file', 'truncated JPEG',
    'not an image (cannot identify format)', 'too large: 40000x40000 pixels > limit 67108864'."""


class TransientReadError(OSError):
    """The file could not be read now (permission denied, I/O error, …); it may be readable on the next run."""


# Facts about the path that a rerun will not change; every other OSError while reading is transient.
_PERMANENT_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _read_failure(e: OSError, path) -> Exception:
    """The exception for an OSError raised while reading `path`: ImageError or TransientReadError."""
    if isinstance(e, _PERMANENT_OS_ERRORS):
        return ImageError(_os_reason(e))
    return TransientReadError(e.errno, f"{path}: {_os_reason(e)}; not recorded as undecodable, the next run "
                                       "reads it again")


def _os_reason(e: OSError) -> str:
    """A reason for an operating-system error on the path itself (as opposed to bad image bytes)."""
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return "file not found"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"cannot read file ({e.strerror or e})"


def _decode_reason(e: Exception, fmt: str | None) -> str:
    """A reason for an exception Pillow raised while parsing or decoding the bytes of a `fmt` image."""
    what = fmt or "image"
    message = str(e).strip()
    if "truncated" in message.lower():
        return f"truncated {what}"
    detail = f"{type(e).__name__}: {message}" if message else type(e).__name__
    return f"corrupt {what} ({detail[:120]})"


def _open(path) -> Image.Image:
    """Image.open with every failure turned into ImageError (or TransientReadError); only the header has been
    read on return."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # We enforce our own limit right after open; Pillow's warning would just be noise in the log.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except UnidentifiedImageError:
        raise ImageError("not an image (cannot identify format)") from None
    except Image.DecompressionBombError as e:
        # Raised inside open (> 2 x Image.MAX_IMAGE_PIXELS) before the size is visible to us.
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = found.group(1) if found else "?"
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageError(f"too large: {pixels} pixels > Pillow limit {limit}") from None
    except OSError as e:
        if e.errno is None:   # Pillow's own OSErrors (bad data) carry no errno
            raise ImageError(_decode_reason(e, None)) from None
        raise _read_failure(e, path) from None
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(_decode_reason(e, None)) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded Pillow image → mode RGB at the same size."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert clips 16-bit values at 255 (a mid-grey 32768 would become white); take the high
        # byte instead. Mode I (32-bit) is what older Pillows and TIFF give for 16-bit data: same scale.
        values = np.asarray(im).astype(np.int64)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8)).convert("RGB")
    if mode == "F":
        raise ImageError("unsupported mode F (floating-point pixels have no standard 0-255 scale)")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        # Transparent areas usually hold black (or junk) colour; a viewer shows them over white.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK at decode), YCbCr, ...


def load_image(path, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode the file at `path` (str or PathLike) and return a uint8 RGB array of shape
    (image_size, image_size, 3), values 0-255.

    The image is stretched to the square (no aspect-preserving crop, as in the TensorFlow Show-Attend-Tell
    tutorial) with Pillow's bilinear filter, which is antialiased when downscaling. Animated images give their
    first frame; EXIF orientation is applied. Raises ImageError (str = short reason) for any unusable file:
    missing, directory, empty, not an image, truncated, corrupt, more than `max_pixels` pixels, odd mode; and
    TransientReadError when the file cannot be read now. Never returns a placeholder array for a failure.
    """
    try:
        info = os.stat(path)
    except OSError as e:
        raise _read_failure(e, path) from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError("is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError("not a regular file")  # a FIFO or device would block or never end
    if info.st_size == 0:
        raise ImageError("zero-byte file")

    with _open(path) as im:
        fmt = im.format
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageError(f"empty image ({width}x{height} pixels)")
        if width * height > max_pixels:
            raise ImageError(f"too large: {width}x{height} pixels > limit {max_pixels}")
        try:
            if fmt in ("JPEG", "MPO"):
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= image_size:
                # a 12 MP photo then costs ~0.2 MP of decoding instead of 12.
                im.draft(None, (image_size, image_size))
            im.load()  # truncation and corrupt data surface here (LOAD_TRUNCATED_IMAGES stays False)
        except MemoryError:
            raise
        except OSError as e:
            if e.errno is None:
                raise ImageError(_decode_reason(e, fmt)) from None
            raise _read_failure(e, path) from None
        except Exception as e:
            raise ImageError(_decode_reason(e, fmt)) from None
        try:
            ImageOps.exif_transpose(im, in_place=True)  # in place: the default copies even when upright
        except MemoryError:
            raise
        except Exception:
            pass  # unreadable EXIF: the pixels themselves are fine, keep the stored orientation
        try:
            rgb = _to_rgb(im)
            resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.array(resized, dtype=np.uint8)
        except (ImageError, MemoryError):
            raise
        except Exception as e:
            raise ImageError(f"cannot convert {fmt} mode {im.mode} to RGB ({type(e).__name__}: {e})"[:200]) from None
    if array.shape != (image_size, image_size, 3):  # defensive: never hand a wrong shape to the encoder
        raise ImageError(f"unexpected decoded shape {array.shape}")
    return array


def _try_load(path, image_size: int, max_pixels: int):
    """(array, None) on success, (None, reason) on ImageError; anything else propagates to the consumer."""
    try:
        return load_image(path, image_size, max_pixels), None
    except ImageError as e:
        return None, str(e)


def iter_batches(items, image_size: int, batch_size: int, workers: int | None = None, prefetch: int = 2,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode (key, path) items in batches, in a thread pool, ahead of the consumer.

    items: iterable of (key, path); consumed lazily, batch_size at a time.
    Yields (keys, batch, failures) once per `batch_size` inputs, in input order: batch is uint8
    (k, image_size, image_size, 3) for the k images that loaded (k may be 0), keys their k keys in input
    order, failures a list of (key, path, reason) for the others. `workers` threads (default os.cpu_count())
    decode; while the consumer holds one batch, up to `prefetch` more are in flight, so memory stays
    O((prefetch + 1) x batch_size) images however long `items` is. Exceptions other than ImageError
    (e.g. MemoryError) are re-raised in the consumer.
    """
    if image_size < 1 or batch_size < 1 or prefetch < 0:
        raise ValueError(f"need image_size >= 1, batch_size >= 1, prefetch >= 0; "
                         f"got {image_size}, {batch_size}, {prefetch}")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return _iter_batches(iter(items), image_size, batch_size, workers, prefetch, max_pixels)


def _iter_batches(items, image_size, batch_size, workers, prefetch, max_pixels):
    pending = collections.deque()  # batches submitted but not yet yielded: [(key, path, future), ...]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load_image")

    def submit_next_batch() -> bool:
        chunk = list(itertools.islice(items, batch_size))
        if chunk:
            pending.append([(key, path, pool.submit(_try_load, path, image_size, max_pixels))
                            for key, path in chunk])
        return bool(chunk)

    try:
        for _ in range(prefetch + 1):
            if not submit_next_batch():
                break
        while pending:
            chunk = pending.popleft()
            submit_next_batch()  # refill first, so decoding continues while the consumer works on this one
            keys, arrays, failures = [], [], []
            for key, path, future in chunk:
                array, reason = future.result()
                if reason is None:
                    keys.append(key)
                    arrays.append(array)
                else:
                    failures.append((key, path, reason))
            batch = np.stack(arrays) if arrays else np.empty((0, image_size, image_size, 3), np.uint8)
            yield keys, batch, failures
    finally:
        # Consumer finished, broke out early or raised: drop queued work, wait for the few running decodes.
        pool.shutdown(wait=True, cancel_futures=True)


def load_for_display(path, side: int = 320) -> np.ndarray:
    """uint8 (H, W, 3) of an image for plots and reports: EXIF-oriented, RGB, at most `side` pixels wide or
    high, aspect ratio kept (unlike load_image, which stretches to the encoder's square input)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((side, side))
        return np.asarray(im)
