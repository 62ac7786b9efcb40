"""The `captioner` command group, its entry point, and the status, prune, settings and demo-data commands."""
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
    from pipeline.digits import demo
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
               and not all(runs.output_now(root, o).exists() for o in t["outputs"])]   # the workspace may have moved
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
            click.echo(f"other models in this workspace (other configs or earlier versions; newest first): "
                       f"{', '.join(str(d) for d in others[:5])}{' …' if len(others) > 5 else ''}")
        click.echo(f"tasks of the last run ({latest['id']}):")
        for t in latest["tasks"]:
            state = "MISSING NOW" if t["task"] in missing else t["outcome"]
            extra = (f" {t['seconds']:.1f}s" if "seconds" in t else "") + (f" {t['error']}" if "error" in t else "")
            name = f"{t['family']}({', '.join(f'{k}={v}' for k, v in t['params'].items())})"
            click.echo(f"  {name:<64} {state}{extra}")
    if check:
        sys.exit(0 if latest["result"] == "ok" and not missing else 1)


@main.command()
@click.option("--keep-days", default=7.0, show_default=True, help="Keep whatever changed in the last DAYS.")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
def prune(keep_days: float, dry_run: bool) -> None:
    """Delete what this config's pipeline no longer uses: older versions of its annotations, vocabulary, models
    with their checkpoints, captions and metrics (a nightly run on grown data makes new ones), split indexes of
    older plans, set-aside .broken-* and .damaged-* copies. Kept: everything the config's chain uses now (its
    [generation] model too), what any run of the last DAYS used, anything changed in them, the newest output
    of a stage whose version in use is not made yet, the feature shards and plans (shared by every version) and
    encoder weights (storage/workspace.py prunable). Refused while a run of the last DAYS is still going."""
    import shutil
    import time

    import luigi

    tasks = _import_tasks()
    from storage import runs, workspace
    from tasks.config import generation
    from tasks.records import upstream
    from tasks.startup import startup_problems

    _stop_on(startup_problems(["TrainDecoder"]))   # a config a run would refuse names nothing that is in use
    root, keep = tasks.config.workspace_root(), keep_days * 86400
    records = [r for r in runs.read_runs(root) if r["started"] >= time.time() - keep]
    going = [r["id"] for r in records if r["result"].startswith("running")]
    if going:
        raise click.ClickException(f"runs {', '.join(going)} may still be going in {root}: prune when they end")
    click.echo(f"config: {tasks.config_files()}; workspace {root}")
    in_use = [o for r in records for t in r["tasks"] + r.get("upstream", []) for o in t["outputs"]]
    in_use += [generation.read().model] if generation.read().model else []
    roots = [tasks.EvaluateCaptions(split=split) for split in manifests.SPLITS]
    in_use += [o.path for task in roots + upstream(roots) for o in luigi.task.flatten(task.output())]   # the chain
    doomed, freed = workspace.prunable(root, in_use, keep), 0
    for path in doomed:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        click.echo(f"{'would delete' if dry_run else 'deleted'} {path} ({size / 2 ** 20:.1f} MiB)")
        if not dry_run:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        freed += size
    click.echo(f"{'would free' if dry_run else 'freed'} {freed / 2 ** 20:.1f} MiB ({len(doomed)} outputs)")


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("flags", nargs=-1, type=click.UNPROCESSED)
@click.option("--json", "as_json", is_flag=True, help="The table as JSON.")
@click.option("--markdown", is_flag=True, help="Print docs/configuration.md: every key's default, valid values, "
                                               "meaning and shipped configs' values (FLAGS and config files unused).")
def settings(flags: tuple[str, ...], as_json: bool, markdown: bool) -> None:
    """Every setting of the pipeline: its value for a run with these FLAGS (luigi-style, e.g.
    `--training-batch-size 8`) and the config files (configs/luigi.cfg, configs/demo.cfg for the demo, the file of
    $LUIGI_CONFIG_PATH), its default, where the value comes from (flag, file, environment or default), and what it
    does; then every problem the run would stop on (tasks/startup.py), exiting as it would (35)."""
    tasks = _import_tasks()
    from pipeline import settings_check
    from tasks.startup import startup_problems

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
    else:
        click.echo(f"config files: {', '.join(tasks.config_paths())}")
        section = None
        for row in rows:
            if row["section"] != section:
                section = row["section"]
                click.echo(f"[{section}]")
            notes = [row["source"]] + ([f"default {row['default']!r}"] if row["source"] != "default" else [])
            notes += [row["help"]] if row["help"] else []
            click.echo(f"  {row['key'] + ' = ' + row['value']:<34} # {' · '.join(notes)}")
    _stop_on(startup_problems(["TrainDecoder", *_section_flags(flags)]))   # luigi parses flags for some task


def _stop_on(problems: list[str]) -> None:
    """Each problem the startup check found, as a run prints it, then exit 35 as a run would; nothing if none."""
    for problem in problems:
        click.echo(f"captioner: ERROR: {problem}", err=True)
    if problems:
        sys.exit(35)


def _import_tasks():
    """The tasks package, or exit 35 naming the line of a config file luigi cannot parse (it reads them when
    imported)."""
    import configparser

    try:
        import tasks
    except configparser.Error as e:
        click.echo(f"captioner: ERROR: {' '.join(str(e).split())}. Fix: every line of a config file is a [section], "
                   "a `key = value`, an indented continuation or a # comment, and each section appears once per "
                   "file.", err=True)
        sys.exit(35)
    return tasks


def _section_flags(flags) -> list[str]:
    """The flags without those of a task's own parameters (`--split test`: the settings are the same for all)."""
    import luigi
    from luigi.task_register import Register

    own = {f"--{name.replace('_', '-')}" for family in Register.task_names()
           if not issubclass(cls := Register.get_task_cls(family), luigi.Config) for name, _ in cls.get_params()}
    out, tokens = [], list(flags)
    while tokens:
        token = tokens.pop(0)
        if token.partition("=")[0] not in own:
            out.append(token)
        elif "=" not in token and tokens and not tokens[0].startswith("--"):
            tokens.pop(0)   # its value
    return out


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
    {split: {"path", "summary"}}}. Follows provenance: metrics/<fp> ← captions/<fp> ← models/<fp>. A plug-in's
    metrics appear only where the evaluation computed them (a dataset that declares their truth)."""
    import time

    from pipeline import extensions

    _load_plugins()
    upstream = lambda d: manifests.read_json(d / "provenance.json").get("upstream", {})
    captions = {d.name for d in (root / "captions").glob("[!.]*")
                if (d / "provenance.json").is_file() and upstream(d).get("models") == model.name}
    metrics = {}
    for d in sorted((root / "metrics").glob("[!.]*"), key=lambda d: d.stat().st_mtime):
        if (d / "provenance.json").is_file() and upstream(d).get("captions") in captions:
            for path in d.glob("*.json"):
                if path.name != "provenance.json":
                    corpus = manifests.read_json(path)
                    summary = f"BLEU-4 {corpus['corpus']['Bleu_4']:.3f}  CIDEr-D {corpus['corpus']['CIDEr']:.3f}"
                    for plugin in extensions.METRICS.values():
                        block = corpus.get(plugin.name) or {}
                        summary += "".join(f"  {name} {block[key]:.2f}" for key, name in plugin.labels.items()
                                           if block.get(key) is not None)
                    metrics[path.stem] = {"path": str(path), "summary": summary}
    trained = time.strftime("%Y-%m-%d %H:%M", time.localtime((model / "decoder.weights.h5").stat().st_mtime))
    return {"dir": str(model), "trained": trained, "metrics": metrics}


def _load_plugins() -> None:
    """The plug-ins the config in effect names ([dataset] plugins), registered (tasks/context.py)."""
    from tasks.config import load_plugins
    load_plugins()


def run() -> None:
    """Entry point that turns InputError into a one-line message and exit code 2."""
    try:
        main(standalone_mode=True)
    except InputError as e:
        click.echo(f"captioner: error: {e}", err=True)
        sys.exit(2)
