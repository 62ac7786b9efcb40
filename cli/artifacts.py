"""`captioner inspect`, `verify` and `plot-attention`: what the pipeline's files hold."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from cli.main import main
from storage import manifests


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
