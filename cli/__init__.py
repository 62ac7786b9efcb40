"""`captioner`: command-line tools around the pipeline's artifacts (the pipeline itself runs with `luigi`)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from pipeline.errors import InputError
from storage import manifests


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress lines.")
def main(verbose: bool) -> None:
    """Show, Attend and Tell image captioning: tools to make, inspect and check the pipeline's artifacts.

    Run the pipeline itself with Luigi from the repo root, e.g. `luigi --module tasks BuildVocabulary`."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@main.command("demo-data")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "train_images", default=1200, show_default=True, help="Training images.")
@click.option("--val", "val_images", default=100, show_default=True, help="Validation images.")
@click.option("--test", "test_images", default=100, show_default=True, help="Test images.")
@click.option("--seed", default=1797, show_default=True, help="Seed: the same seed gives the same files.")
def demo_data(outdir: Path, train_images: int, val_images: int, test_images: int, seed: int) -> None:
    """Write the built-in digits demo dataset (COCO captions format + JPEGs) into OUTDIR."""
    from pipeline import demo
    from storage.workspace import atomic_dir

    if outdir.exists() and any(outdir.iterdir()):
        raise click.ClickException(f"{outdir} exists and is not empty; choose a new directory.")
    if min(train_images, val_images, test_images) < 1:
        raise click.ClickException("--train, --val and --test must each be at least 1.")
    if outdir.exists():
        outdir.rmdir()
    with atomic_dir(outdir) as tmp:
        summary = demo.write_demo_dataset(tmp, train_images, val_images, test_images, seed)
    click.echo(json.dumps(summary, indent=1))
    click.echo(f"wrote {outdir}: captions_{{train,val,test}}.json, karpathy_split.json, images under train/ val/ test/")


def _shard_paths(paths) -> list[Path]:
    from storage import shards

    out = []
    for path in map(Path, paths):
        out += shards.list_shards(path) if path.is_dir() else [path]
    return out


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--stats", is_flag=True, help="Add per-shard mean/std/zero fraction and a NaN/Inf check.")
@click.option("--image-id", type=int, help="Only report where rows extracted for this image id are stored.")
@click.option("--content", help="Only report where this content key (the sha256 of an image file, as "
                                "`sha256sum` prints it) is stored.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(paths, stats: bool, image_id: int | None, content: str | None, as_json: bool) -> None:
    """Describe HDF5 feature shards (files, or store directories holding them). Rows are keyed by content: the
    sha256 of the image file's bytes (`contents` dataset); image ids say which dataset image a row was
    extracted for."""
    from storage import shards

    found = _shard_paths(paths)
    if image_id is not None or content is not None:
        what = f"content {content}" if content is not None else f"image {image_id}"
        hits = [{"shard": str(p), "row": row} for p in found
                if (row := shards.find_image(p, image_id, content)) is not None]
        for hit in hits:
            hit["content"] = shards.read_contents(hit["shard"])[hit["row"]]
        click.echo(json.dumps({"image_id": image_id, "content": content, "found": hits}, indent=1) if as_json else
                   "\n".join(f"{what}: {h['shard']} row {h['row']} (content {h['content']})" for h in hits)
                   or f"{what}: not in {len(found)} shards")
        sys.exit(0 if hits else 1)
    infos = [shards.describe_shard(p, stats=stats) for p in found]
    if as_json:
        click.echo(json.dumps(infos, indent=1, default=str))
        return
    for info in infos:
        click.echo(f"{info['path']}\n  rows {info['rows']}  {info['dtype']} {tuple(info['shape'])}  chunks "
                   f"{tuple(info['chunks'])}  compression {info['compression']}  {info['bytes']:,} bytes "
                   f"({info['bytes_per_image'] / 1024:.0f} KiB/image)")
        for key, value in sorted(info["attrs"].items()):
            click.echo(f"  {key}: {value}")
        if "stats" in info:
            s = info["stats"]
            click.echo(f"  stats: mean {s['mean']:.4g}  std {s['std']:.4g}  zero fraction {s['zero_fraction']:.3f}"
                       f"  NaN/Inf {s['nonfinite']}")
        click.echo(f"  skipped: {len(info['skipped'])}")
        for item in info["skipped"]:
            click.echo(f"    {item['image_id']} {item['path']} ({item['content'][:12]}…): {item['reason']}")


@main.command()
@click.argument("directory", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(directory: Path | None) -> None:
    """Check every feature store under DIRECTORY (a workspace, its features/ folder, or one store; default:
    $CAPTIONER_WORKDIR or ./work): shards open, are complete, finite, match their checksums, index and
    manifests. Exits 1 and names each problem otherwise."""
    from pipeline.features import verify_store
    from storage import workspace

    directory = directory or workspace.workspace_root()
    if (directory / "features").is_dir():
        directory = directory / "features"
    stores = [directory] if (directory / "plans").is_dir() or any(directory.glob("shard-*.h5")) else \
        sorted(p for p in directory.iterdir() if p.is_dir())
    if not stores:
        raise click.ClickException(f"no feature store under {directory}")
    failed = False
    for store in stores:
        problems, counts = verify_store(store)
        leftovers = workspace.leftover_temporaries(store)
        status = "FAILED" if problems else "ok"
        click.echo(f"{store}: {status} — {counts['shards']} shards, {counts['rows']} rows, {counts['indexes']} "
                   f"split indexes" + (f", {len(leftovers)} temporary files from interrupted runs" if leftovers else ""))
        for problem in problems:
            click.echo(f"  {problem}", err=True)
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A model directory (work/models/<fp>).")
@click.option("--beam", type=click.IntRange(min=1), help="Beam size; 1 is greedy (default: the model's "
                                                         "[generation] beam_size).")
@click.option("--max-length", type=click.IntRange(min=1),
              help="Maximum words, <end> included (default: the model's).")
@click.option("--length-penalty", type=float, help="Captions ranked by log p / length^this (default: the model's).")
@click.option("--weights", type=click.Path(path_type=Path),
              help="InceptionV3 weights file, when it moved since training (checked by sha256).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the attention grid to this PNG (PLOT-1.png, PLOT-2.png, ... for several images).")
@click.option("--json", "as_json", is_flag=True, help="One JSON list on stdout.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write JSON Lines here: {\"path\", \"caption\", \"score\"} per captioned image "
                   "(CaptionImages' format; paths relative to a folder argument).")
def caption(images, model_dir: Path, beam: int | None, max_length: int | None, length_penalty: float | None,
            weights: Path | None, plot: Path | None, as_json: bool, out: Path | None) -> None:
    """Caption new IMAGES (files, or folders searched recursively for images) with the encoder recorded in the
    model's provenance and the model's decoding settings (as GenerateCaptions, CaptionImages and the export
    use them; a flag overrides one), in one TensorFlow start. Unreadable images get a message and exit code 1;
    the others are still captioned."""
    from pipeline import decode, encoder as encoder_lib, features, plots
    from pipeline.folders import list_images
    from pipeline.images import iter_batches, load_for_display
    from pipeline.model import load_model

    _check_model_dir(model_dir)
    shown = {}   # image path → how --out names it (relative to its folder argument)
    for item in images:
        if item.is_dir():
            shown.update({str(item / rel): rel for rel in list_images(item)})
        else:
            shown[str(item)] = str(item)
    images = [Path(p) for p in shown]
    if not images:
        raise click.ClickException("no image files in the folders given (looked for "
                                   ".jpg .jpeg .png .webp .bmp .gif, recursively)")
    model, vocab, provenance = load_model(model_dir)
    identity = _training_encoder(provenance, weights, model_dir)
    size, layer = provenance["encoder"]["image_size"], encoder_lib.layer_of(provenance["encoder"]["encoder"])
    forward = features.encoder_forward(identity, size, layer, provenance["encoder"].get("precision", "float32"))
    d = model_decoding(model_dir, beam, max_length, length_penalty)
    unk = vocab.index["<unk>"] if d["suppress_unk"] else None   # beam 1 is exactly greedy, and it gives the score
    decoder = decode.beam_fn(model, d["beam_size"], d["max_length"], vocab.index["<start>"], vocab.index["<end>"],
                             unk, d["length_penalty"])
    results = []
    order = {str(p): i for i, p in enumerate(images)}
    for keys, batch, failures in iter_batches([(str(p), str(p)) for p in images], size, batch_size=16):
        for key, _, reason in failures:
            results.append({"image": key, "error": reason})
            click.echo(f"captioner: {key}: {reason}", err=True)
        if not len(keys):
            continue
        tokens, alphas, scores = decoder(forward(batch))
        for path, row, alpha, score in zip(keys, tokens.numpy(), alphas.numpy(), scores.numpy()):
            results.append({"image": path, "caption": vocab.decode(row), "score": round(float(score), 5)})
            if plot:   # numbered by the image's place on the command line, whatever failed before it
                png = plot if len(images) == 1 else plot.with_name(f"{plot.stem}-{order[path] + 1}{plot.suffix}")
                plots.attention_grid(load_for_display(path, 640), results[-1]["caption"].split(),
                                     plots.word_attention(row, alpha), png, layer=layer)
                results[-1]["plot"] = str(png)
    results.sort(key=lambda r: order[r["image"]])
    if out:
        manifests.write_jsonl(out, ({"path": shown[r["image"]], "caption": r["caption"], "score": r["score"]}
                                    for r in results if "caption" in r))
        click.echo(f"captioner: wrote {out}", err=True)
    if as_json:
        click.echo(json.dumps(results, indent=1))
    else:
        for r in results:
            if "caption" in r:
                click.echo(f"{r['image']}: {r['caption']}" + (f"  [{r['plot']}]" if "plot" in r else ""))
    sys.exit(1 if any("error" in r for r in results) else 0)


def model_decoding(model_dir: Path, beam: int | None = None, max_length: int | None = None,
                   length_penalty: float | None = None) -> dict:
    """The decoding a model was trained to be used with (its config.json "decoding": the [generation] settings
    it was validated with, as GenerateCaptions uses them), each overridden by a value given here."""
    recorded = manifests.read_json(model_dir / "config.json").get("decoding", {})
    given = {"beam_size": beam, "max_length": max_length, "length_penalty": length_penalty}
    defaults = {"beam_size": 3, "max_length": 20, "length_penalty": 1.0, "suppress_unk": True}
    return {k: given.get(k) if given.get(k) is not None else recorded.get(k, v) for k, v in defaults.items()}


@main.command("export")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--weights", type=click.Path(path_type=Path),
              help="InceptionV3 weights file, when it moved since training (checked by sha256).")
@click.option("--beam", type=click.IntRange(min=1), help="Beam size (default: the model's [generation] setting).")
@click.option("--max-length", type=click.IntRange(min=1), help="Maximum words (default: the model's).")
def export_command(model_dir: Path, out_dir: Path, weights: Path | None, beam: int | None,
                   max_length: int | None) -> None:
    """Export MODEL_DIR (work/models/<fp>) as a TensorFlow SavedModel in OUT_DIR: encoder with the recorded
    weights, decoder, vocabulary and beam search; signature serving_default, images (encoded bytes) →
    captions, scores, attention. Serve it with TF Serving or tf.saved_model.load."""
    from pipeline import export
    from pipeline.model import load_model

    _check_model_dir(model_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise click.ClickException(f"{out_dir} exists and is not empty. Fix: remove it or choose another folder "
                                   "(TF Serving wants <base>/<version>/, e.g. exports/captioner/1).")
    _, _, provenance = load_model(model_dir)
    identity = _training_encoder(provenance, weights, model_dir)
    d = model_decoding(model_dir, beam, max_length)
    about = export.export(model_dir, out_dir, identity, d["beam_size"], d["max_length"], d["length_penalty"],
                          d["suppress_unk"])
    click.echo(f"captioner: exported {model_dir} to {out_dir} (beam {about['decoding']['beam_size']}, "
               f"{about['image_size']} px); signature serving_default: images → captions, scores, attention")


def _check_model_dir(model_dir: Path) -> None:
    """A ClickException unless `model_dir` is a model directory (models/<fp>); for a folder of them (models/),
    the message lists the model directories found there, newest first."""
    if (model_dir / "decoder.weights.h5").is_file():
        return
    found = sorted((d for d in model_dir.glob("*/") if (d / "decoder.weights.h5").is_file()),
                   key=lambda d: (d / "decoder.weights.h5").stat().st_mtime, reverse=True)
    if found:
        listing = "\n".join(f"  {d}" for d in found)
        raise click.ClickException(f"{model_dir} is a folder of models, not a model directory. Pass one of "
                                   f"them to --model (newest first):\n{listing}")
    raise click.ClickException(f"{model_dir} is not a model directory (no decoder.weights.h5). Fix: pass "
                               "--model work/models/<fp>, a TrainDecoder output.")


def _training_encoder(provenance: dict, weights: Path | None, model_dir: Path) -> dict:
    """The encoder identity the model was trained with, or a ClickException saying why it cannot be had.
    A recorded weights path inside the workspace is relative to it (models/<fp> is two levels below)."""
    from pipeline import encoder as encoder_lib
    from storage import shards
    from storage.workspace import file_sha256, resolve

    recorded = provenance["encoder"]
    if encoder_lib.layer_of(recorded.get("encoder", "")) is None:
        raise click.ClickException(f"the model was trained on features of {recorded.get('encoder')!r}; this version "
                                   f"extracts {encoder_lib.encoder_name('<layer>')} with <layer> one of "
                                   f"{', '.join(encoder_lib.LAYERS)}. Refusing to mix them.")
    expected = {"preprocess": encoder_lib.PREPROCESS, "schema_version": shards.SCHEMA_VERSION}
    for key, value in expected.items():
        if recorded.get(key) != value:
            raise click.ClickException(f"the model was trained on features with {key} = {recorded.get(key)!r}; "
                                       f"this version extracts {value!r}. Refusing to mix them.")
    if recorded["weights"] == "random":
        return encoder_lib.resolve_weights(f"random:{recorded['seed']}")
    # file/imagenet stores are keyed by the file's sha256; the digits encoder's by its pretraining fingerprint,
    # with the sha256 of the file recorded by TrainDecoder
    expected_sha = recorded.get("sha256") or provenance.get("weights_sha256")
    recorded_path = provenance.get("weights_path")
    if recorded_path:
        recorded_path = resolve(recorded_path, Path(model_dir).resolve().parents[1])
    candidates = [p for p in (weights, recorded_path,
                              encoder_lib.keras_cache_file() if recorded["weights"] == "imagenet" else None) if p]
    seen = []
    for path in map(Path, candidates):
        if path.is_file():
            digest = file_sha256(path)
            if digest == expected_sha:
                if recorded["weights"] == "digits":
                    return encoder_lib.digits_identity(path, recorded["pretrain"])
                return {"weights": recorded["weights"], "path": str(path), "sha256": digest}
            seen.append(f"{path} has sha256 {digest[:12]}…")
        else:
            seen.append(f"{path} does not exist")
    raise click.ClickException(
        f"the model was trained on features from {recorded['weights']} weights with sha256 "
        f"{(expected_sha or '?')[:12]}…, and no such file was found ({'; '.join(seen)}). "
        "Fix: pass --weights with the weights file used for training.")


def _configured_image_roots() -> list[str] | None:
    """`[dataset] images` of the config in $LUIGI_CONFIG_PATH, if one is set: dataset images resolve through it
    (they may be mounted elsewhere than when the captions were generated); else None (the recorded roots)."""
    if not os.environ.get("LUIGI_CONFIG_PATH"):
        return None
    from tasks.context import dataset_image_roots   # the same parsing the pipeline's stages use

    return dataset_image_roots() or None


@main.command("plot-attention")
@click.argument("captions_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--image-id", required=True, type=int, help="Image to plot.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG path (default: attention-ID.png).")
def plot_attention(captions_dir: Path, image_id: int, out: Path | None) -> None:
    """Plot one image's per-word attention from a GenerateCaptions output (work/captions/<fp>)."""
    from pipeline import plots
    from pipeline.images import load_for_display
    from storage import shards

    for attention_file in sorted(captions_dir.glob("*-attention.h5")):
        try:
            maps = shards.read_attention(attention_file, image_id, _configured_image_roots())
        except KeyError:
            continue
        split = attention_file.name[:-len("-attention.h5")]
        results = manifests.read_json(captions_dir / f"{split}.json")
        text = next(r["caption"] for r in results if r["image_id"] == image_id)
        out = out or Path(f"attention-{image_id}.png")
        plots.attention_grid(load_for_display(maps["path"], 640), text.split(),
                             plots.word_attention(maps["tokens"], maps["attention"]), out, layer=maps["layer"])
        click.echo(f"{out}: {text}")
        return
    raise click.ClickException(f"image {image_id} is not in any *-attention.h5 under {captions_dir}")


@main.command()
@click.option("--workspace", "root", type=click.Path(file_okay=False, path_type=Path),
              help="Workspace directory (default: $CAPTIONER_WORKDIR or ./work).")
@click.option("--runs", "last", default=5, show_default=True, help="How many past runs to list.")
@click.option("--check", is_flag=True, help="Exit 1 unless the last run succeeded and all its outputs exist.")
@click.option("--json", "as_json", is_flag=True, help="The last run record as JSON.")
def status(root: Path | None, last: int, check: bool, as_json: bool) -> None:
    """What the last pipeline runs did (work/runs/*.json; runs killed before writing theirs show as
    "interrupted" with what they had finished), and whether the outputs of the last one are all in place now."""
    from storage import runs, workspace

    root = root or workspace.workspace_root()
    records = runs.read_runs(root)
    if not records:
        raise click.ClickException(f"no run records under {root / 'runs'}: nothing ran in this workspace yet")
    latest = records[-1]
    missing = [t["task"] for t in latest["tasks"] if t["outcome"] in ("ran", "complete")
               and not all(Path(o).exists() for o in t["outputs"])]
    if as_json:
        click.echo(json.dumps({**latest, "outputs_missing_now": missing}, indent=1))
    else:
        click.echo(f"workspace {root}\nlast runs (newest last):")
        for r in records[-last:]:
            counts = ", ".join(f"{n} {k}" for k, n in r["counts"].items() if n)
            click.echo(f"  {r['id']}  {r['result']:<11} {r['seconds']:8.1f}s  {counts}  [{r['config']}]")
        mine, others = _config_model(root), models_of(root)
        if mine is not None:
            model = model_summary(root, mine) if (mine / "decoder.weights.h5").is_file() else None
            click.echo(f"model of this config ({_config_files()}): " +
                       (f"{model['dir']} (trained {model['trained']})" if model else f"{mine} (not trained yet)"))
            for split, m in sorted((model or {"metrics": {}})["metrics"].items()):
                click.echo(f"  {split:<5} {m['summary']}  {m['path']}")
        others = [d for d in others if mine is None or d.name != mine.name]
        if others:
            click.echo(f"other models in this workspace (other configs; newest first): "
                       f"{', '.join(str(d) for d in others[:5])}{' …' if len(others) > 5 else ''}")
        click.echo(f"tasks of the last run ({latest['id']}):")
        for t in latest["tasks"]:
            state = "MISSING NOW" if t["task"] in missing else t["outcome"]
            extra = (f" {t['seconds']:.1f}s" if "seconds" in t else "") + (f" {t['error']}" if "error" in t else "")
            name = f"{t['family']}({', '.join(f'{k}={v}' for k, v in t['params'].items())})"
            click.echo(f"  {name:<64} {state}{extra}")
    if check:
        sys.exit(0 if latest["result"] == "ok" and not missing else 1)


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("flags", nargs=-1, type=click.UNPROCESSED)
@click.option("--json", "as_json", is_flag=True, help="The table as JSON.")
@click.option("--markdown", is_flag=True, help="Print docs/configuration.md: every key's default, valid values, "
                                               "meaning and shipped configs' values (FLAGS and config files unused).")
def settings(flags: tuple[str, ...], as_json: bool, markdown: bool) -> None:
    """Every setting of the pipeline: its value for a run with these FLAGS (luigi-style, e.g.
    `--training-batch-size 8`) and the config files (configs/luigi.cfg, configs/demo.cfg for the demo, the file of
    $LUIGI_CONFIG_PATH), its
    default, where the value comes from (flag, file, environment or default), and what it does."""
    import tasks
    from pipeline import settings_check

    if markdown:
        from tasks.config import RETCODES, Section

        configs = Path(tasks.__file__).resolve().parent.parent / "configs"
        base = configs / "luigi.cfg"
        shipped = [("defaults", [base]), ("demo", [base, configs / "demo.cfg"]),
                   ("coco2017", [base, configs / "coco2017.cfg"]), ("coco2014", [base, configs / "coco2014.cfg"])]
        sections = {cls.get_task_family(): cls for cls in Section.__subclasses__()}
        click.echo(settings_check.settings_markdown(tasks.settings_schema(), sections, shipped, RETCODES), nl=False)
        return
    from tasks.config import DEFAULT_CONFIG   # its values are the defaults: shown as such, not as a file's
    files = [p for p in tasks.config_paths() if Path(p).resolve() != DEFAULT_CONFIG.resolve()]
    rows = settings_check.settings_table(tasks.settings_schema(), files, list(flags),
                                         {("workspace", "root"): ("CAPTIONER_WORKDIR",
                                                                  os.environ.get("CAPTIONER_WORKDIR", ""))})
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"config files: {tasks.config_files()}")
    section = None
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            click.echo(f"[{section}]")
        notes = [row["source"]] + ([f"default {row['default']!r}"] if row["source"] != "default" else [])
        notes += [row["help"]] if row["help"] else []
        click.echo(f"  {row['key'] + ' = ' + row['value']:<34} # {' · '.join(notes)}")


def models_of(root: Path) -> list[Path]:
    """The trained model directories of a workspace, newest first."""
    models = [d for d in (root / "models").glob("[!.]*") if (d / "decoder.weights.h5").is_file()]
    return sorted(models, key=lambda d: (d / "decoder.weights.h5").stat().st_mtime, reverse=True)


def _config_model(root: Path) -> Path | None:
    """The model directory the current config (LUIGI_CONFIG_PATH over configs/luigi.cfg) trains in the workspace
    `root` (its fingerprint), or names in [generation] model when that lies in `root`; None when the config
    cannot say (a bad value: `luigi` reports it)."""
    try:
        import tasks
        from tasks.config import generation
        named = generation.read().model
        model = Path(named).resolve() if named else root / "models" / Path(tasks.TrainDecoder().output().path).name
    except Exception:   # InputError and whatever a broken config raises: status still lists the runs
        return None
    return model if model.parent.resolve() == (root / "models").resolve() else None


def _config_files() -> str:
    from tasks.config import config_files
    return config_files()


def model_summary(root: Path, model: Path) -> dict:
    """A model directory with the metrics of the captions it made, per split: {"dir", "trained", "metrics":
    {split: {"path", "summary"}}}. Follows provenance: metrics/<fp> ← captions/<fp> ← models/<fp>. Digit metrics
    appear only where the evaluation computed them (a dataset with digit labels)."""
    import time

    upstream = lambda d: manifests.read_json(d / "provenance.json").get("upstream", {})
    captions = {d.name for d in (root / "captions").glob("[!.]*")
                if (d / "provenance.json").is_file() and upstream(d).get("models") == model.name}
    metrics = {}
    for d in sorted((root / "metrics").glob("[!.]*"), key=lambda d: d.stat().st_mtime):
        if (d / "provenance.json").is_file() and upstream(d).get("captions") in captions:
            for path in d.glob("*.json"):
                if path.name != "provenance.json":
                    corpus = manifests.read_json(path)
                    digits = corpus.get("digits") or {}
                    summary = f"BLEU-4 {corpus['corpus']['Bleu_4']:.3f}  CIDEr-D {corpus['corpus']['CIDEr']:.3f}"
                    for key, name in (("digits_exact", "digits exact"), ("attention_grounding", "grounding")):
                        if digits.get(key) is not None:
                            summary += f"  {name} {digits[key]:.2f}"
                    metrics[path.stem] = {"path": str(path), "summary": summary}
    trained = time.strftime("%Y-%m-%d %H:%M", time.localtime((model / "decoder.weights.h5").stat().st_mtime))
    return {"dir": str(model), "trained": trained, "metrics": metrics}


def run() -> None:
    """Entry point that turns InputError into a one-line message and exit code 2."""
    try:
        main(standalone_mode=True)
    except InputError as e:
        click.echo(f"captioner: error: {e}", err=True)
        sys.exit(2)
