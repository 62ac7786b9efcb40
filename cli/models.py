"""`captioner caption` and `export`: a trained model used outside the pipeline, with the encoder and decoding it
was trained with."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.main import _load_plugins, main
from storage import manifests


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
    the others are still captioned. (Over 50 lines: its options and three outputs, text, JSON and plots, read
    best in one place.)"""
    from pipeline import decode, encoder as encoder_lib, features, plots
    from pipeline.folders import IMAGE_SUFFIXES, list_images
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
                                   f"{' '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
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
    _load_plugins()   # a `+<extra>` layer is a plug-in's
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
    # file/imagenet stores are keyed by the file's sha256; weights a stage made by that stage's fingerprint, with
    # the sha256 of the file recorded by TrainDecoder
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
                if "stage" in recorded:
                    return encoder_lib.stage_identity(recorded["weights"], path, recorded["stage"],
                                                      recorded["pretrained_on"])
                return {"weights": recorded["weights"], "path": str(path), "sha256": digest}
            seen.append(f"{path} has sha256 {digest[:12]}…")
        else:
            seen.append(f"{path} does not exist")
    raise click.ClickException(
        f"the model was trained on features from {recorded['weights']} weights with sha256 "
        f"{(expected_sha or '?')[:12]}…, and no such file was found ({'; '.join(seen)}). "
        "Fix: pass --weights with the weights file used for training.")
