"""Problems of single entries found by the annotations stage: exact counts per kind, and the first instances of
each kind listed in report.json. The run goes on; each problem entry is skipped."""
from __future__ import annotations

PROBLEM_KINDS = (
    "malformed_image",             # images[i] not an object, or without an integer id (64-bit) or a string file_name
    "malformed_image_field",       # a plug-in's field of images[i] malformed (digits: not integers 0-9): field dropped
    "malformed_annotation",        # annotations[i] not an object, or without an integer image_id (or id), 64-bit
    "caption_not_a_string",        # caption missing, null, a number, a list …: that caption dropped
    "caption_for_unknown_image",   # annotation whose image_id is not in images[]
    "image_without_captions",      # image with no (non-empty) caption: dropped
    "missing_image_file",          # images[].file_name not found under its image root: dropped
    "image_outside_root",          # images[].file_name absolute or climbing out of its root with '..': dropped
    "empty_caption",               # caption empty after normalisation: dropped
    "duplicate_image_id",          # the same image id listed again (same or another file): later one dropped
    "duplicate_caption_id",        # the same annotation id again: later one dropped
    "image_not_in_split",          # Karpathy split given but the image is not in it: dropped
    "split_file_conflict",         # the split file lists the image in two splits: kept in the last one listed
)
LISTED_PER_KIND = 1000   # problem instances listed in report.json per kind (the counts are always exact)


class Problems:
    """Problems found: exact counts per kind, and the first `limit` instances of each kind in the order found."""

    def __init__(self, limit: int | None = None):
        self.limit = LISTED_PER_KIND if limit is None else limit
        self.counts = dict.fromkeys(PROBLEM_KINDS, 0)
        self.listed = {kind: [] for kind in PROBLEM_KINDS}

    def add(self, kind: str, instance: dict) -> None:
        self.counts[kind] += 1
        if len(self.listed[kind]) < self.limit:
            self.listed[kind].append(instance)

    def wanted(self, kind: str) -> int:
        """How many more instances of `kind` would be listed."""
        return self.limit - len(self.listed[kind])

    def lists(self) -> dict:
        return {kind: instances for kind, instances in self.listed.items() if instances}
