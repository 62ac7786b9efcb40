"""`captioner`: command-line tools around the pipeline's artifacts (the pipeline itself runs with `luigi`)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from pipeline.errors import InputError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress lines.")
def main(verbose: bool) -> None:
    """Show, Attend and Tell image captioning: tools to make, inspect and check the pipeline's artifacts.

    Run the pipeline itself with Luigi from the repo root, e.g. `luigi --module tasks BuildVocabulary`."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@main.command("demo-data")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "train_images", default=800, show_default=True, help="Training images.")
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


def run() -> None:
    """Entry point that turns InputError into a one-line message and exit code 2."""
    try:
        main(standalone_mode=True)
    except InputError as e:
        click.echo(f"captioner: error: {e}", err=True)
        sys.exit(2)
