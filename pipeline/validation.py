"""Validation and epoch selection: decode the val split as GenerateCaptions will, score it, keep the epoch's
weights when it is the best so far, record it (history, log, TensorBoard) and checkpoint."""
from __future__ import annotations

import logging

from pipeline import extensions
from pipeline.captions import distinct_captions
from pipeline.decode import decoder_fn
from pipeline.evaluate import validation_scores
from pipeline.inputs import feature_batches
from pipeline.progress import format_seconds
from pipeline.vocabulary import Vocabulary
from storage.workspace import atomic_file, write_json

log = logging.getLogger("captioner")

def selection_name(select_by: str) -> str:
    """How the log names [training] select_by: CIDEr-D, or a plug-in's val score with CIDEr-D breaking ties."""
    return "CIDEr-D" if select_by == "cider" else f"{extensions.val_labels()[select_by]} (CIDEr-D breaking ties)"


def selection_key(entry: dict, select_by: str) -> tuple:
    """What ranks an epoch's history entry: (val CIDEr-D,), or (a plug-in's val score, val CIDEr-D)."""
    if select_by != "cider":
        return entry[f"val_{select_by}"], entry["val_CIDEr"]
    return (entry["val_CIDEr"],)


# -------------------------------------------------------------------------------------------- model bits


def decoded_captions(model, by_shard, vocab: Vocabulary, decoding: dict, batch_size: int,
                     block_rows: int = 256) -> dict[int, str]:
    """{image_id: caption} for every image of a split index, decoded with the [generation] settings `decoding`
    (beam_size, max_length, length_penalty, suppress_unk), as GenerateCaptions decodes."""
    decode = decoder_fn(model, vocab, **decoding)
    out = {}
    for ids, feats in feature_batches(by_shard, batch_size, block_rows):
        tokens = decode(feats)[0]
        for image_id, row in zip(ids.tolist(), tokens.numpy()):
            out[image_id] = vocab.decode(row)
    return out


# ---------------------------------------------------------------------------------------------- training


def end_epoch(state, data, vocab, summary: dict, text: str, seen: int, seconds: float, board,
               settings: dict) -> None:
    """Validate the epoch's weights decoding as GenerateCaptions will, keep them when the epoch is the best so
    far (selection_key), record the epoch (history, log, TensorBoard) and checkpoint. `summary`: the history
    entry's training part (phase, loss ...), `text` its log form."""
    hyps = decoded_captions(state.model, data.val_rows, vocab, settings["decoding"], settings["val_batch_size"],
                            settings["block_rows"])
    scores = validation_scores(data.val_refs, hyps)
    extra = {key: value for m in extensions.METRICS.values() if m.declares(data.val_records.values())
             for key, value in m.val_scores(hyps, data.val_records).items() if value is not None}
    entry = {"epoch": state["epoch"] + 1, **summary, "val_Bleu_4": scores["Bleu_4"],
             "val_CIDEr": scores["CIDEr"], **{f"val_{key}": value for key, value in extra.items()},
             "val_distinct": distinct_captions(hyps), "seconds": round(seconds, 2),
             "captions_per_second": round(seen / max(seconds, 1e-9), 1), "best": False,
             "example": next(iter(hyps.values()), "")}
    key = lambda e: selection_key(e, settings["select_by"])
    improved = entry["best"] = all(key(entry) > key(e) for e in state.history)
    if improved:
        with atomic_file(state.best_weights, suffix=".weights.h5") as tmp:
            state.model.save_weights(str(tmp))
        state.counters["best"].assign(key(entry)[0])
        state.counters["bad_epochs"].assign(0)
    else:
        state.counters["bad_epochs"].assign_add(1)
    state.history.append(entry)
    labels = extensions.val_labels()
    log.info("%s, val BLEU-4 %.4f, CIDEr-D %.4f, %s%.0fs, %.1f captions/s%s", text, scores["Bleu_4"],
             scores["CIDEr"], "".join(f"{labels[key]} {value:.3f}, " for key, value in extra.items()), seconds,
             state.history[-1]["captions_per_second"],
             f"; the best epoch so far by val {selection_name(settings['select_by'])}" if improved else "")
    board.epoch(state["step"], scores, extra, state.history[-1]["val_distinct"], hyps, data.val_refs)
    state.counters["epoch"].assign_add(1)
    state.counters["step_in_epoch"].assign(0)
    state.save()
    write_json(state.history_path, state.history)


def report_progress(callback, epoch, epochs, step_in_epoch, steps_per_epoch, step, total_steps, loss, xent, attention_term, rate,
            eta_seconds, attention_lambda: float):
    message = (f"epoch {epoch + 1}/{epochs}, step {step_in_epoch}/{steps_per_epoch} (total {step}/{total_steps}), "
               f"loss {loss:.4f} (xent {xent:.4f} + {attention_lambda:g} × attention {attention_term:.4f}), "
               f"{rate:.1f} captions/s, "
               f"ETA {format_seconds(eta_seconds)} (+ validation)")
    log.info(message)
    if callback is not None:
        callback(min(int(100 * step / max(total_steps, 1)), 100), message)


def shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
