"""Plots: training curves (and, with the generation stage, attention overlays). Matplotlib, no display."""
from __future__ import annotations

from pathlib import Path

# pycocoevalcap's "CIDEr" scorer computes CIDEr-D: say so wherever a person reads the score (other metrics
# keep their JSON key names, which people grep logs for)
LABELS = {"CIDEr": "CIDEr-D"}
_VAL_PLOTTED = ("val_Bleu_4", "val_CIDEr", "val_distinct")   # the history's general val scores


def metric_label(key: str) -> str:
    """Display name of a corpus metric key ("CIDEr" → "CIDEr-D")."""
    return LABELS.get(key, key)


def training_curves(history: list[dict], path) -> None:
    """history.json → PNG: training loss with its two parts (cross-entropy epochs), and val BLEU-4 / CIDEr-D
    (and any plug-in val score the history holds) per epoch, self-critical epochs shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from storage.workspace import atomic_file

    epochs = [h["epoch"] for h in history]
    xent = [h for h in history if h.get("phase", "xent") == "xent"]   # self-critical epochs have no such loss
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    lam = history[0].get("attention_lambda", 1.0) if history else 1.0
    left.plot([h["epoch"] for h in xent], [h["loss"] for h in xent], marker="o", label="total")
    if xent and "xent" in xent[0]:
        left.plot([h["epoch"] for h in xent], [h["xent"] for h in xent], marker="s", label="cross-entropy per token")
        left.plot([h["epoch"] for h in xent], [h["attention"] for h in xent], marker="^",
                  label="attention term per token")
    left.set(xlabel="epoch", ylabel="training loss", title=f"loss = cross-entropy + {lam:g} × attention term")
    left.legend()
    right.plot(epochs, [h["val_Bleu_4"] for h in history], marker="o", label="BLEU-4")
    right.plot(epochs, [h["val_CIDEr"] for h in history], marker="s", label="CIDEr-D")
    for key in (k for k in (history[0] if history else {}) if k.startswith("val_") and k not in _VAL_PLOTTED):
        if history[0][key] is not None:   # a plug-in's val score (extensions.Metrics.val_scores)
            right.plot(epochs, [h.get(key) for h in history], marker="^", label=key[4:].replace("_", " "))
    scst = [h["epoch"] for h in history if h.get("phase") == "scst"]
    if scst:   # [training] scst_epochs
        right.axvspan(scst[0] - 0.5, scst[-1] + 0.5, color="orange", alpha=0.15, label="self-critical epochs")
    kept = [h["epoch"] for h in history if h.get("best")]
    if kept:   # the epoch whose weights the model directory holds ([training] select_by)
        right.axvline(kept[-1], color="gray", linestyle=":", label=f"kept: epoch {kept[-1]}")
    right.set(xlabel="epoch", title="validation, decoded as GenerateCaptions decodes")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def word_attention(tokens, alphas):
    """The attention rows of a generated caption's words. Row t of `alphas` is the attention when tokens[t]
    was chosen; the caption (Vocabulary.decode) skips <start> and <pad> and stops at <end>, so keep exactly
    the rows of the words it shows, and word k of the caption pairs with row k of the result."""
    import numpy as np

    from pipeline.vocabulary import END, PAD, SPECIALS, START

    tokens = np.asarray(tokens).tolist()
    end = SPECIALS.index(END)
    stop = tokens.index(end) if end in tokens else len(tokens)
    keep = [t for t in range(stop) if tokens[t] not in (SPECIALS.index(START), SPECIALS.index(PAD))]
    return np.asarray(alphas, np.float32)[keep]


def attention_scale(alphas) -> float:
    """The one colour-scale top for all words of an image: its largest attention weight over every word.
    (Scaling each word to its own max would make uniform attention, 1/P everywhere, look like a hot spot.)"""
    import numpy as np

    alphas = np.asarray(alphas, np.float32)
    return max(float(alphas.max()) if alphas.size else 0.0, 1e-12)


def attention_maps(alphas, image_size: tuple[int, int], vmax: float | None = None, layer: str = "mixed10"):
    """alphas (T, P) with P a square grid of `layer` (64 → 8×8, row-major like the features) → (T, H, W) float32
    maps in [0, 1], upsampled smoothly to the image's (W, H) where the cells look (_place_grid). Every word
    shares ONE scale: map = weight / vmax, vmax defaulting to attention_scale(alphas) (the image's largest weight), so
    1.0 is the strongest attention of the whole caption and uniform attention stays at (1/P) / vmax."""
    import numpy as np

    from pipeline.encoder import grid_side

    alphas = np.asarray(alphas, np.float32)
    side = grid_side(alphas.shape[1])
    vmax = attention_scale(alphas) if vmax is None else vmax
    maps = [_place_grid(alpha.reshape(side, side) / np.float32(vmax), image_size, layer) for alpha in alphas]
    return np.stack(maps) if maps else np.zeros((0, image_size[1], image_size[0]), np.float32)


def _place_grid(grid, image_size: tuple[int, int], layer: str):
    """A side × side map drawn where InceptionV3's cells look (pipeline.encoder.cell_edges): for mixed10, cells
    32 px apart with their centres 37.5 px in from the borders of the 32·side + 43 px input (mixed7: 16 px,
    21.5 px, 16·side + 27 px), edges extended to the borders, then stretched to the image's (W, H) as the
    encoder squashed it."""
    import numpy as np
    from PIL import Image

    from pipeline.encoder import LAYERS, base_layer

    spec = LAYERS[base_layer(layer)]
    side, stride, offset = grid.shape[0], spec["stride"], spec["offset"]
    cells = np.asarray(Image.fromarray(grid, mode="F").resize((stride * side, stride * side), Image.BICUBIC))
    before = int(offset - stride / 2)                                      # 21 px for mixed10, 13 for mixed7
    after = int(2 * offset - stride) - before                              # centres at offset + stride·k
    square = np.pad(cells, ((before, after), (before, after)), mode="edge")
    return np.asarray(Image.fromarray(square, mode="F").resize(image_size, Image.BILINEAR)).clip(0, 1)


def scale_note(alphas) -> str:
    """How to read the shared scale of an image's attention pictures."""
    import numpy as np

    positions = np.asarray(alphas).shape[-1] or 1
    return (f"one scale for all words: brightest = {attention_scale(alphas):.3f} (this image's largest weight); "
            f"uniform attention = 1/{positions} = {1 / positions:.3f}")


def attention_grid(image, words: list[str], alphas, path, columns: int = 4, layer: str = "mixed10") -> None:
    """One panel per generated word: the image with that word's attention overlaid, titled with the word and
    its largest weight. All panels share one colour scale (attention_maps), shown by a colourbar in
    attention-weight units with the uniform level 1/P marked. image: uint8 (H, W, 3); alphas (≥ len(words), P)
    over the grid of `layer`, row k = word k (see word_attention)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from storage.workspace import atomic_file

    height, width = image.shape[:2]
    alphas = np.asarray(alphas, np.float32)[:len(words)]
    vmax = attention_scale(alphas)
    maps = attention_maps(alphas, (width, height), vmax, layer)
    rows = max(1, -(-len(words) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns + 1, 3 * rows * height / width + 0.4 * rows + 0.5),
                             layout="constrained")
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k < len(words):
            ax.imshow(image)
            ax.imshow(maps[k], cmap="gray", alpha=0.6, vmin=0, vmax=1)
            ax.set_title(f"{words[k]} (max {alphas[k].max():.2f})", fontsize=11)
    bar = fig.colorbar(ScalarMappable(Normalize(0, vmax), cmap="gray"), ax=axes, label="attention weight")
    if alphas.shape[1] and 1 / alphas.shape[1] <= vmax:
        bar.ax.axhline(1 / alphas.shape[1], color="red", linewidth=2)   # the uniform level 1/P
    fig.suptitle(scale_note(alphas) + " (red line on the colour bar)", fontsize=9)
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


def _score(value, places: int = 4) -> str:
    return "unavailable" if value is None else f"{value:.{places}f}"


def _metrics_tables(corpus: dict, tables: list, diversity: tuple[int, int] | None) -> str:
    """The report's head: caption metrics (CIDEr shown as CIDEr-D, the variant pycocoevalcap computes), caption
    diversity, then each plug-in's metrics block (tables: [(extensions.Metrics, block)])."""
    import html

    def table(cells):
        return ("<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k, _ in cells) + "</tr><tr>"
                + "".join(f"<td>{html.escape(v)}</td>" for _, v in cells) + "</tr></table>")

    cells = [(metric_label(k), _score(v)) for k, v in corpus.items()]
    if diversity is not None:
        distinct, images = diversity
        cells.append(("caption diversity", f"{distinct} distinct captions / {images} images "
                                           f"({distinct / max(images, 1):.3f})"))
    parts = [table(cells)]
    for metrics, block in tables:
        parts += [f"<h3>{html.escape(metrics.name.capitalize())}</h3>",
                  table([(label, _score(block.get(key))) for key, label in metrics.labels.items()]),
                  f"<p><em>{html.escape(metrics.note(block))}</em></p>"]
    return "".join(parts)


def _entry_row(e: dict) -> str:
    """One example image of the report: caption, references, and a thumbnail per word on a shared scale."""
    import html

    import numpy as np

    alphas = np.asarray(e["alphas"], np.float32)[:len(e["words"])]
    maps = attention_maps(alphas, (e["image"].shape[1], e["image"].shape[0]), layer=e.get("layer", "mixed10"))
    figures = "".join(f"<figure><img src='{_thumbnail_data_uri(e['image'], 72, m)}'>"
                      f"<figcaption>{html.escape(w)} ({a.max():.2f})</figcaption></figure>"
                      for w, m, a in zip(e["words"], maps, alphas))
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in e["references"])
    named = "".join(f"<br>{html.escape(line)}" for line in e.get("details", ()) if line)
    return (f"<tr><td><img src='{_thumbnail_data_uri(e['image'], 200)}'><br>id {e['image_id']}</td>"
            f"<td><b>{html.escape(e['caption'])}</b><br>CIDEr-D {e['cider']:.3f}{named}<ul>{refs}</ul></td>"
            f"<td class=att>{figures}<br><small>{html.escape(scale_note(alphas))}</small></td></tr>")


def html_report(path, title: str, corpus: dict, entries: list[dict], notes: list[str] = (),
                tables: list = (), about: dict | None = None, diversity: tuple[int, int] | None = None) -> None:
    """A static, self-contained HTML page (images embedded). entries: {"section", "image" uint8 (H, W, 3),
    "image_id", "caption", "references", "cider", "words", "alphas" (≥ len(words), P) row k = word k,
    optional "details": lines from plug-in metrics}; tables: [(extensions.Metrics, its block)]; about:
    {label: text} of what was evaluated (model, encoder, decoding, config, date); diversity: (distinct
    captions, images)."""
    import html
    import itertools

    from storage.workspace import atomic_file

    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}.att img{margin:1px}"
             ".att figure{display:inline-block;margin:2px;text-align:center;font-size:11px}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    if about:
        parts.append("<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                                         for k, v in about.items()) + "</table>")
    parts.append(_metrics_tables(corpus, tables, diversity))
    parts += [f"<p><em>{html.escape(n)}</em></p>" for n in notes]
    for section, group in itertools.groupby(entries, key=lambda e: e["section"]):
        parts.append(f"<h2>{html.escape(section)}</h2><table><tr><th>image</th><th>captions</th>"
                     "<th>attention per word (largest weight), one scale per image</th></tr>")
        parts += [_entry_row(e) for e in group]
        parts.append("</table>")
    with atomic_file(Path(path), suffix=".html") as tmp:
        Path(tmp).write_text("\n".join(parts), encoding="utf-8")
