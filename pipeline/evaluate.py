"""Caption metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (+ SPICE on request).

With Java (pycocoevalcap's PTB tokenizer, METEOR and SPICE are Java programs): references and candidates are
tokenised by the PTB tokenizer, exactly as the COCO caption evaluation does. Without Java: a warning, our own
documented tokenizer (pipeline/annotations.py normalize_caption) for both sides, and METEOR / SPICE reported as
unavailable (null), never as 0.
"""
from __future__ import annotations

import functools
import logging
import shutil
import subprocess

from pipeline import extensions
from pipeline.errors import InputError
from pipeline.captions import distinct_captions, normalize_caption
from pipeline.plots import metric_label

log = logging.getLogger("captioner")

CORPUS_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """True when a working `java` is on PATH (tried once per process)."""
    java = shutil.which("java")
    if not java:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tokenize(references: dict, hypotheses: dict, use_java: bool) -> tuple[dict, dict]:
    """({id: [reference strings]}, {id: caption}) → token-space-joined dicts as the scorers expect."""
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
        res = tokenizer.tokenize({i: [{"caption": c}] for i, c in hypotheses.items()})
        return gts, res
    return ({i: [normalize_caption(c) for c in refs] for i, refs in references.items()},
            {i: [normalize_caption(c)] for i, c in hypotheses.items()})


def validation_scores(references: dict, hypotheses: dict) -> dict:
    """What training validates each epoch with: BLEU-4 and CIDEr-D (pycocoevalcap scorers on the manifests'
    normalised captions; no Java needed)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {i: references[i] for i in hypotheses}
    res = {i: [hypotheses[i] or "<empty>"] for i in hypotheses}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"Bleu_4": float(bleu[3]), "CIDEr": float(cider)}


def evaluate(references: dict, hypotheses: dict, java: bool | None = None, spice: bool = False) -> dict:
    """Score `hypotheses` {image_id: caption} against `references` {image_id: [captions]} (every hypothesis
    id must have references). Returns {"corpus": {metric: score | None}, "per_image": {id: {metric: score}},
    "tokenizer", "java", "notes"}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = [i for i in hypotheses if i not in references]
    if missing:
        raise ValueError(f"{len(missing)} captioned images have no references (first: {missing[:5]})")
    if java and not java_available():
        raise InputError("[evaluation] java = yes, but no `java` is on PATH. Fix: install Java 8+, or set java = auto "
                         "(or no) to tokenise without it, METEOR unavailable")
    use_java = java_available() if java is None else java
    notes = []
    if not use_java:
        notes.append(("Java not found" if java is None else "Java not used ([evaluation] java = no)")
                     + ": tokenised with captioner's own normaliser instead of the PTB tokenizer; METEOR and SPICE "
                       "unavailable (Java 8+ gives the official protocol)")
        log.warning(notes[-1])
    refs = {i: references[i] for i in hypotheses}
    gts, res = tokenize(refs, hypotheses, use_java)
    res = {i: [c if c.strip() else "<empty>"] for i, (c,) in res.items()}   # scorers reject empty strings
    ids = list(res)
    corpus, per_image = {}, {i: {} for i in ids}

    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"Bleu_{n + 1}"] = float(bleu[n])
        for i, s in zip(ids, bleu_each[n]):
            per_image[i][f"Bleu_{n + 1}"] = float(s)
    scorers = [("ROUGE_L", Rouge()), ("CIDEr", Cider())]
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor
        scorers.insert(0, ("METEOR", Meteor()))
    else:
        corpus["METEOR"] = None
    if spice and use_java:
        from pycocoevalcap.spice.spice import Spice
        scorers.append(("SPICE", Spice()))
    elif spice:
        corpus["SPICE"] = None
    for name, scorer in scorers:
        score, each = scorer.compute_score(gts, res)
        corpus[name] = float(score)
        for i, s in zip(ids, each):
            per_image[i][name] = float(s) if not isinstance(s, dict) else float(s["All"]["f"])
    return {"corpus": {k: corpus.get(k) for k in CORPUS_KEYS} | ({"SPICE": corpus["SPICE"]} if spice else {}),
            "per_image": per_image, "tokenizer": "ptb" if use_java else "captioner-normalise",
            "java": use_java, "notes": notes, "n_images": len(ids)}


def summary_table(corpus: dict, distinct: int, images: int, blocks: dict) -> str:
    """Readable one-metric-per-line table for the log: the caption metrics, caption diversity, then the scores of
    each plug-in's metrics block ({name: block}, extensions.METRICS)."""
    rows = [(metric_label(k), "unavailable" if v is None else f"{v:.4f}") for k, v in corpus.items()]
    rows.append(("distinct captions", f"{distinct} / {images} images"))
    for name, block in blocks.items():
        rows += [(label, "unavailable" if block.get(k) is None else f"{block[k]:.4f}")
                 for k, label in extensions.METRICS[name].labels.items()]
    width = max(len(label) for label, _ in rows + [("metric", "")])
    return "\n".join([f"{'metric':<{width}} score"] + [f"{label:<{width}} {value}" for label, value in rows])


def evaluate_split(outdir, split: str, results_path, attention_path, manifest_path, java: bool | None = None,
                   spice: bool = False, examples: int = 12, seed: int = 0, dataset_roots=None,
                   about: dict | None = None) -> dict:
    """Score a GenerateCaptions output against the split's raw reference captions; write
    `outdir`/<split>.json (corpus, distinct captions, a block per plug-in metrics whose truth the records
    declare (extensions.METRICS), per-image scores) and
    `outdir`/<split>-report.html.
    `dataset_roots`: the current [dataset] images, through which the report finds dataset images. `about`:
    what was evaluated ({label: text}: model, encoder, decoding, config…), shown at the top of the report and
    kept in the metrics file with the date."""
    import time
    from pathlib import Path

    from storage import manifests, shards

    results = manifests.read_json(results_path)
    records = {r["image_id"]: r for r in manifests.read_manifest(manifest_path)}
    hypotheses = {r["image_id"]: r["caption"] for r in results}
    scores = evaluate({i: records[i]["raw_captions"] for i in hypotheses}, hypotheses, java=java, spice=spice)
    attention = shards.read_all_attention(attention_path, dataset_roots)
    blocks = {name: m.evaluate(hypotheses, records, attention) for name, m in extensions.METRICS.items()}
    blocks = {name: block for name, block in blocks.items() if block is not None}
    per_image = []
    for i, s in scores["per_image"].items():
        entry = {"image_id": i, "caption": hypotheses[i], **s}
        for name in blocks:
            entry.update(extensions.METRICS[name].per_image(hypotheses[i], records[i]))
        per_image.append(entry)
    about = {"evaluated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **(about or {})}
    metrics = {"split": split, **{k: v for k, v in scores.items() if k != "per_image"},
               "distinct_captions": distinct_captions(hypotheses), **blocks, "about": about, "per_image": per_image}
    manifests.write_json(Path(outdir) / f"{split}.json", metrics)
    log.info("%s split, %d images, tokenizer %s:\n%s", split, len(hypotheses), metrics["tokenizer"],
             summary_table(metrics["corpus"], metrics["distinct_captions"], len(hypotheses), blocks))
    _write_report(Path(outdir) / f"{split}-report.html", f"{split} split: {len(hypotheses)} images", metrics,
                  records, attention, list(blocks), examples, seed)
    return metrics


def _write_report(path, title: str, metrics: dict, records: dict, attention: dict, blocks: list[str],
                  examples: int, seed: int) -> None:
    """The HTML report: what was evaluated, the metrics, then the worst CIDEr-D images, the best ones and a
    random sample, each with per-word attention."""
    import numpy as np

    from pipeline.images import load_for_display
    from pipeline.plots import html_report, word_attention

    scored = {e["image_id"]: e for e in metrics["per_image"]}
    ranked = sorted(scored, key=lambda i: scored[i]["CIDEr"])
    rng = np.random.default_rng(seed)
    chosen = [("Worst CIDEr-D first", i) for i in ranked[:examples]]
    chosen += [("Best CIDEr-D first", i) for i in ranked[::-1][:min(examples, max(len(ranked) - examples, 0))]]
    chosen += [("Random sample", int(i)) for i in rng.choice(ranked, min(examples, len(ranked)), replace=False)]
    rows = {int(i): k for k, i in enumerate(attention["image_ids"])}
    entries = []
    for section, image_id in chosen:
        row, caption = rows[image_id], scored[image_id]["caption"]
        entries.append({"section": section, "image_id": image_id, "image": load_for_display(attention["paths"][row]),
                        "caption": caption, "references": records[image_id]["raw_captions"],
                        "cider": scored[image_id]["CIDEr"], "words": caption.split(),
                        "alphas": word_attention(attention["tokens"][row], attention["attention"][row]),
                        "layer": attention["layer"],
                        "details": [extensions.METRICS[name].describe(caption, records[image_id]) for name in blocks]})
    tables = [(extensions.METRICS[name], metrics[name]) for name in blocks]
    html_report(path, title, metrics["corpus"], entries, metrics["notes"], tables, metrics["about"],
                (metrics["distinct_captions"], len(scored)))
