"""What the current configuration names, resolved for the library: image roots, input files, decoding settings,
the stages its plug-ins add (tasks/plugins.py). Read through the config sections of tasks/config.py; used by the
stages (tasks/features.py, tasks/captioning.py)."""
from __future__ import annotations

from pathlib import Path

from pipeline import encoder as encoder_lib, features as features_lib
from pipeline.errors import InputError
from storage import contents, manifests, workspace as ws
from tasks import plugins
from tasks.config import (comma_list, config_files, dataset, encoder, generation, section_values,
                          workspace_root)


def dataset_stage():
    """The stage that writes the dataset `[dataset] source` names (an instance), or None for source = coco."""
    source = dataset.read().source
    return plugins.DATASETS[source]() if source in plugins.DATASETS else None


def weights_stage():
    """The stage that makes the weights `[encoder] weights` names (an instance), or None for weights that exist
    already (imagenet, a file, random:<seed>)."""
    weights = encoder.read().weights.strip()
    return plugins.WEIGHTS[weights]() if weights in plugins.WEIGHTS else None


def dataset_image_roots() -> list[str]:
    """The current config's `[dataset] images` (what `images:<k>` root references resolve through)."""
    return [str(Path(r).expanduser().resolve()) for r in comma_list(dataset.read().images)]


def image_root(reference: str) -> Path:
    """The directory a manifest's root reference names under the current config (storage.manifests)."""
    try:
        return manifests.resolve_root(reference, workspace_root(), dataset_image_roots())
    except ValueError as e:
        raise InputError(f"{config_files()}: [dataset] images: {e}") from e


def content_cache() -> contents.ContentCache:
    """The workspace's cache of image content keys (storage/contents.py)."""
    return contents.ContentCache(workspace_root() / "cache" / "contents.sqlite")


def content_keys(annotations_dir, split: str, progress_callback=None) -> dict[int, str]:
    """{image_id: content key} of a split's images, as they are on disk now."""
    with content_cache() as cache:
        return features_lib.identify_split(annotations_dir, split, image_root, cache, progress_callback)


def annotation_inputs(written: Path | None) -> tuple[list[str], list[str], str]:
    """(annotation files, image roots, karpathy split file or '') of `[dataset]`, or of the dataset a DATASETS
    stage wrote in `written` (COCO format, the layout tasks/plugins.py gives)."""
    if written is not None:
        return ([str(written / f"captions_{s}.json") for s in manifests.SPLITS],
                [str(written / s) for s in manifests.SPLITS], str(written / "karpathy_split.json"))
    d = dataset.read()
    return comma_list(d.annotations), comma_list(d.images), d.karpathy_split


def annotation_settings(files: list[str], karpathy: str) -> dict:
    """ExtractAnnotations' significant settings. COCO caption and split files count by content, not by path (the
    files and image roots may move to another host or mount), but roots inside the workspace by their path there
    (the manifests name them so); a written dataset's by its upstream fingerprint.
    The plug-ins count too: their image fields are kept in the manifests."""
    d = dataset.read()
    s = {"source": d.source, "seed": d.seed, "val_fraction": d.val_fraction, "test_fraction": d.test_fraction}
    if d.source == "coco":
        s["annotations"] = [identify_input(f, "annotations") for f in files]
        s["karpathy_split"] = identify_input(karpathy, "karpathy_split") if karpathy else ""
        references = [manifests.root_reference(r, k, workspace_root()) for k, r in enumerate(comma_list(d.images))]
        inside = [ref for ref in references if not ref.startswith("images:")]   # named by their path, not by k
        if inside:
            s["image_roots_in_workspace"] = inside
    if s.get("karpathy_split") or d.source != "coco":
        for key in ("seed", "val_fraction", "test_fraction"):   # unused with a split file
            s.pop(key)
    return {**s, **plugin_settings()}


def plugin_settings() -> dict:
    """{"plugins": [...]} when `[dataset] plugins` names any, else {}: part of the settings of the stages whose
    outputs the plug-ins shape (their image fields, val scores, rewards, metrics)."""
    plugins = comma_list(dataset.read().plugins)
    return {"plugins": plugins} if plugins else {}


def identify_input(path: str, key: str) -> str:
    """sha256 of an input file, or an InputError naming the [dataset] key when it cannot be read."""
    try:
        return ws.file_sha256(path)
    except OSError as e:
        raise InputError(f"{config_files()}: [dataset] {key}: cannot read {path}: {e.strerror}. "
                         "Fix: correct the path in the config.") from e


def generation_settings() -> dict:
    """The [generation] values that change captions (not batch_size); an explicit model directory is
    identified by its weights."""
    g = section_values(generation)
    g.pop("batch_size")
    if g["model"]:
        g["model"] = ws.file_sha256(Path(g["model"]) / "decoder.weights.h5")
    return g


def validation_decoding() -> dict:
    """The [generation] settings TrainDecoder validates with: the best epoch is the best for GenerateCaptions."""
    g = generation.read()
    return {"beam_size": g.beam_size, "max_length": g.max_length, "length_penalty": g.length_penalty,
            "suppress_unk": g.suppress_unk}


def len_positions() -> int:
    """Attention positions of the configured image size (64 at 299 px)."""
    return encoder_lib.grid_size(encoder.read().image_size, encoder.read().layer) ** 2
