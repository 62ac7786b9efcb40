"""A deterministic corpus of good-but-odd and bad image files, for tests of image loading.

make_bad_images(directory) writes the files and returns name → (path, should_load). Every image is small
(mostly 40x30) and never all black, so "loaded as zeros" is detectable. REASON_KEYWORDS gives, for each bad
name, a word that the ImageError reason must contain.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

W, H = 40, 30

# bad name → a substring (lower case) its ImageError reason must contain
REASON_KEYWORDS = {
    "truncated_jpeg": "truncat",
    "corrupt_jpeg": "corrupt",
    "corrupt_png": "corrupt",
    "zero_byte_jpg": "zero-byte",
    "text_named_jpg": "not an image",
    "missing_jpg": "not found",
    "directory_jpg": "directory",
    "bomb_png": "too large",
    "bomb_huge_png": "too large",
}


def gradient(width: int = W, height: int = H) -> np.ndarray:
    """uint8 (height, width, 3): red ramps left→right, green top→bottom, blue constant 96 (never black)."""
    x = np.linspace(30, 250, width)[None, :].repeat(height, 0)
    y = np.linspace(30, 250, height)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 96)], axis=-1).round().astype(np.uint8)


def marker_image(width: int = W, height: int = H) -> np.ndarray:
    """uint8 (height, width, 3): blue, with the top-left quadrant red (to see rotations)."""
    a = np.zeros((height, width, 3), np.uint8)
    a[...] = (0, 0, 255)
    a[: height // 2, : width // 2] = (255, 0, 0)
    return a


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path, width: int, height: int, bit_depth: int, color_type: int, row) -> None:
    """A PNG written by hand (so headers can claim anything): every scanline is filter 0 + the bytes `row`.
    The IDAT stream is compressed incrementally, so a 20000x20000 image never exists in memory."""
    z = zlib.compressobj(9)
    parts = [z.compress(b"\x00" + row) for _ in range(height)]
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
                + _png_chunk(b"IEND", b""))


def write_gray16(path, value: int, width: int = W, height: int = H) -> None:
    """A 16-bit grayscale PNG (opens as mode I;16) with every pixel = value (0-65535)."""
    Image.fromarray(np.full((height, width), value, np.uint16)).save(path, "PNG")


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


def _fails_to_decode(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:
        return True
    return False


def _truncated_jpeg() -> bytes:
    # Noise so the entropy-coded data (not the ~600 bytes of tables) dominates and half falls inside it.
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    data = _jpeg_bytes(Image.fromarray(noise))
    cut = len(data) // 2
    assert cut > data.find(b"\xff\xda") + 20, "truncation point must fall inside the scan data"
    return data[:cut]


def _corrupt_jpeg() -> bytes:
    """Valid headers up to and including SOS, then garbage. Random entropy data alone often decodes (libjpeg
    only warns), so the garbage ends with an 0xFFC8 marker, which libjpeg rejects as unsupported."""
    data = _jpeg_bytes(Image.fromarray(gradient()))
    sos = data.find(b"\xff\xda")
    header_end = sos + 2 + int.from_bytes(data[sos + 2: sos + 4], "big")
    garbage = np.random.default_rng(1).integers(0, 255, 400, dtype=np.uint8).tobytes()  # no 0xFF: no markers
    corrupt = data[:header_end] + garbage + b"\xff\xc8" * 8 + b"\xff\xd9"
    assert _fails_to_decode(corrupt), "corrupt JPEG unexpectedly decodes; change the garbage"
    return corrupt


def _corrupt_png() -> bytes:
    """Valid signature, IHDR and chunk CRCs, but the IDAT payload is not a zlib stream."""
    ihdr = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)
    garbage = np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8).tobytes()
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"\x00\x01" + garbage)
            + _png_chunk(b"IEND", b""))
    assert _fails_to_decode(data), "corrupt PNG unexpectedly decodes"
    return data


def make_bad_images(directory) -> dict[str, tuple[str, bool]]:
    """Write the corpus into `directory` (created if needed); return name → (path, should_load)."""
    os.makedirs(directory, exist_ok=True)
    corpus: dict[str, tuple[str, bool]] = {}

    def path_for(filename):
        return os.path.join(directory, filename)

    def add(name, filename, should_load, image=None, data=None, **save_options):
        path = path_for(filename)
        if image is not None:
            image.save(path, **save_options)
        elif data is not None:
            with open(path, "wb") as f:
                f.write(data)
        corpus[name] = (path, should_load)

    rgb = Image.fromarray(gradient())
    # --- should load ---
    add("rgb_jpeg", "rgb.jpg", True, rgb, format="JPEG", quality=95)
    add("gray_jpeg", "gray.jpg", True, rgb.convert("L"), format="JPEG", quality=95)
    add("cmyk_jpeg", "cmyk.jpg", True, rgb.convert("CMYK"), format="JPEG", quality=95)
    add("cmyk_red_jpeg", "cmyk_red.jpg", True, Image.new("CMYK", (W, H), (0, 255, 255, 0)),
        format="JPEG", quality=95)
    palette = rgb.quantize(16)
    add("palette_png", "palette.png", True, palette, format="PNG")
    add("palette_transparent_png", "palette_trns.png", True, palette, format="PNG", transparency=0)
    alpha = np.linspace(0, 255, W).round().astype(np.uint8)[None, :].repeat(H, 0)
    add("rgba_png", "rgba.png", True, Image.fromarray(np.dstack([gradient(), alpha])), format="PNG")
    add("rgba_transparent_png", "rgba_clear.png", True, Image.new("RGBA", (W, H), (0, 0, 0, 0)), format="PNG")
    add("la_png", "la.png", True, Image.fromarray(np.dstack([gradient()[..., 1], alpha])), format="PNG")
    add("rgb_trns_png", "rgb_trns.png", True, rgb, format="PNG", transparency=(30, 30, 96))
    ramp16 = np.linspace(256, 65535, W * H).round().astype(np.uint16).reshape(H, W)
    add("gray16_png", "gray16.png", True, Image.fromarray(ramp16), format="PNG")
    add("gray32_tiff", "gray32.tif", True, Image.fromarray(ramp16.astype(np.int32)), format="TIFF")
    rgb48 = (gradient().astype(np.uint16) * 257).astype(">u2").tobytes()  # 16-bit/channel RGB, big-endian
    rgb48_path = path_for("rgb48.png")
    with open(rgb48_path, "wb") as f:  # write_png repeats one row; write distinct rows here
        z = zlib.compressobj(9)
        body = b"".join(z.compress(b"\x00" + rgb48[r * W * 6:(r + 1) * W * 6]) for r in range(H)) + z.flush()
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0))
                + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b""))
    corpus["rgb48_png"] = (rgb48_path, True)
    checker = ((np.indices((H, W)).sum(0) // 5) % 2 * 255).astype(np.uint8)
    add("bilevel_png", "bilevel.png", True, Image.fromarray(checker).convert("1"), format="PNG")
    add("png_named_jpg", "png_inside.jpg", True, rgb, format="PNG")
    add("gif_named_jpg", "gif_inside.jpg", True, rgb.quantize(32), format="GIF")
    add("bmp_named_png", "bmp_inside.png", True, rgb, format="BMP")
    frames = [Image.new("RGB", (W, H), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    add("animated_gif", "animated.gif", True, frames[0], format="GIF", save_all=True,
        append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored image must be rotated 90° clockwise for display
    add("exif_rotated_jpeg", "exif6.jpg", True, Image.fromarray(marker_image()), format="JPEG", quality=95,
        exif=exif.tobytes())
    add("tiny_png", "tiny_1x1.png", True, Image.new("RGB", (1, 1), (200, 100, 50)), format="PNG")
    add("thin_png", "thin_600x2.png", True, Image.fromarray(gradient(600, 2)), format="PNG")

    # --- should fail ---
    add("truncated_jpeg", "truncated.jpg", False, data=_truncated_jpeg())
    add("corrupt_jpeg", "corrupt.jpg", False, data=_corrupt_jpeg())
    add("corrupt_png", "corrupt.png", False, data=_corrupt_png())
    add("zero_byte_jpg", "empty.jpg", False, data=b"")
    add("text_named_jpg", "notes.jpg", False, data=b"This is a caption file, not a JPEG.\n" * 20)
    corpus["missing_jpg"] = (path_for("missing.jpg"), False)
    os.makedirs(path_for("x.jpg"), exist_ok=True)
    corpus["directory_jpg"] = (path_for("x.jpg"), False)
    # Valid 1-bit PNGs of all-zero rows: ~12 KB / ~48 KB on disk. 10000² = 100 MP is between Pillow's warning
    # (89.5 MP) and error (179 MP) limits, so it exercises our header check and the warning suppression;
    # 20000² = 400 MP makes Pillow itself raise DecompressionBombError inside Image.open.
    bomb = path_for("bomb.png")
    write_png(bomb, 10000, 10000, 1, 0, bytes(10000 // 8))
    corpus["bomb_png"] = (bomb, False)
    huge = path_for("bomb_huge.png")
    write_png(huge, 20000, 20000, 1, 0, bytes(20000 // 8))
    corpus["bomb_huge_png"] = (huge, False)
    assert set(REASON_KEYWORDS) == {name for name, (_, ok) in corpus.items() if not ok}
    return corpus
