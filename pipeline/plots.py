"""Plots: training curves (and, with the generation stage, attention overlays). Matplotlib, no display."""
from __future__ import annotations

from pathlib import Path


def training_curves(history: list[dict], path) -> None:
    """history.json → PNG with the training loss and the val BLEU-4 / CIDEr-D per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from storage.workspace import atomic_file

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h["loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss (cross-entropy + attention term)")
    right.plot(epochs, [h["val_Bleu_4"] for h in history], marker="o", label="BLEU-4")
    right.plot(epochs, [h["val_CIDEr"] for h in history], marker="s", label="CIDEr-D")
    right.set(xlabel="epoch", title="validation, greedy decoding")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def attention_maps(alphas, image_size: tuple[int, int]):
    """alphas (T, P) with P a square grid (64 → 8×8, row-major like the features) → (T, H, W) float32
    maps in [0, 1], upsampled smoothly (bicubic) to the image's (W, H)."""
    import numpy as np
    from PIL import Image

    alphas = np.asarray(alphas, np.float32)
    side = int(round(np.sqrt(alphas.shape[1])))
    if side * side != alphas.shape[1]:
        raise ValueError(f"{alphas.shape[1]} attention positions are not a square grid")
    maps = []
    for alpha in alphas:
        grid = alpha.reshape(side, side)
        grid = grid / max(float(grid.max()), 1e-12)
        maps.append(np.asarray(Image.fromarray(grid, mode="F").resize(image_size, Image.BICUBIC)).clip(0, 1))
    return np.stack(maps) if maps else np.zeros((0, image_size[1], image_size[0]), np.float32)


def attention_grid(image, words: list[str], alphas, path, columns: int = 4) -> None:
    """One panel per generated word: the image with that word's attention overlaid, the word as title.
    image: uint8 (H, W, 3); alphas (len(words), P)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from storage.workspace import atomic_file

    height, width = image.shape[:2]
    maps = attention_maps(np.asarray(alphas)[:len(words)], (width, height))
    rows = max(1, -(-len(words) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows * height / width + 0.4 * rows))
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k < len(words):
            ax.imshow(image)
            ax.imshow(maps[k], cmap="gray", alpha=0.6, vmin=0, vmax=1)
            ax.set_title(words[k], fontsize=12)
    fig.tight_layout()
    with atomic_file(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def _thumbnail_data_uri(image, width: int, overlay=None) -> str:
    """A small JPEG as a data: URI; overlay (H, W) in [0, 1] darkens where attention is low."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    im = Image.fromarray(image)
    im = im.resize((width, max(1, round(im.height * width / im.width))), Image.BILINEAR)
    if overlay is not None:
        mask = Image.fromarray((overlay * 255).astype(np.uint8)).resize(im.size, Image.BILINEAR)
        im = Image.composite(im, Image.new("RGB", im.size, (0, 0, 0)), mask.point(lambda v: 60 + v * 195 // 255))
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def html_report(path, title: str, corpus: dict, entries: list[dict], notes: list[str] = ()) -> None:
    """A static, self-contained HTML page (images embedded). entries: {"section", "image" uint8 (H, W, 3),
    "image_id", "caption", "references", "cider", "words", "alphas" (T, P)}."""
    import html
    import itertools

    from storage.workspace import atomic_file

    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}.att img{margin:1px}"
             ".att figure{display:inline-block;margin:2px;text-align:center;font-size:11px}</style>",
             f"<h1>{html.escape(title)}</h1><table><tr>"
             + "".join(f"<th>{html.escape(k)}</th>" for k in corpus) + "</tr><tr>"
             + "".join(f"<td>{'unavailable' if v is None else f'{v:.4f}'}</td>" for v in corpus.values())
             + "</tr></table>"]
    parts += [f"<p><em>{html.escape(n)}</em></p>" for n in notes]
    for section, group in itertools.groupby(entries, key=lambda e: e["section"]):
        parts.append(f"<h2>{html.escape(section)}</h2><table><tr><th>image</th><th>captions</th>"
                     "<th>attention per word</th></tr>")
        for e in group:
            maps = attention_maps(e["alphas"][:len(e["words"])], (e["image"].shape[1], e["image"].shape[0]))
            figures = "".join(f"<figure><img src='{_thumbnail_data_uri(e['image'], 72, m)}'>"
                              f"<figcaption>{html.escape(w)}</figcaption></figure>" for w, m in zip(e["words"], maps))
            refs = "".join(f"<li>{html.escape(r)}</li>" for r in e["references"])
            parts.append(f"<tr><td><img src='{_thumbnail_data_uri(e['image'], 200)}'><br>id {e['image_id']}</td>"
                         f"<td><b>{html.escape(e['caption'])}</b><br>CIDEr-D {e['cider']:.3f}<ul>{refs}</ul></td>"
                         f"<td class=att>{figures}</td></tr>")
        parts.append("</table>")
    with atomic_file(Path(path), suffix=".html") as tmp:
        Path(tmp).write_text("\n".join(parts), encoding="utf-8")
