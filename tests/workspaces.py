"""Run as `python -m tests.workspaces` (with $CAPTIONER_WORKDIR and $LUIGI_CONFIG_PATH set): every split's features
of the configured dataset, extracted by the real tasks in one process (one encoder built, not one per split), for
tests/conftest.py's `extracted` workspace."""
import sys

import luigi

import tasks

if __name__ == "__main__":
    done = luigi.build([tasks.ExtractFeatures(split=split) for split in ("train", "val", "test")],
                       local_scheduler=True, workers=1)
    sys.exit(0 if done else 1)
