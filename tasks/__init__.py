"""Luigi wiring: `luigi --module tasks TASK` imports this package, which registers every task and, when the
`luigi` command is starting, checks the whole configuration and takes the per-workspace lock.

    luigi --module tasks TrainDecoder                                 # demo (configs/luigi.cfg)
    luigi --module tasks EvaluateCaptions --split test
    LUIGI_CONFIG_PATH=configs/coco2014.cfg luigi --module tasks TrainDecoder

    config.py      the config files layered, the config sections (checked when read)
    startup.py     the strict startup check, the per-workspace lock
    base.py        Stage: a fingerprinted output directory written atomically; the shard targets
    context.py     what the config names, resolved for the library (image roots, input files, decoding)
    features.py    the data half of the DAG: annotations → vocabulary; feature store
    demo.py        the built-in demo's stages (its dataset, its encoder weights), registered in context.py
    captioning.py  the model half: TrainDecoder → GenerateCaptions → EvaluateCaptions; CaptionImages
    records.py     run records (runs/*.json), failures repeated last, the final `captioner: results` line

The DAG is drawn in ARCHITECTURE.md.

Each task's output is `<workspace>/<stage>/<fingerprint>`, where the fingerprint hashes the task's significant
settings and every upstream fingerprint (storage/workspace.py). Each run() calls one pipeline function inside
an atomic directory, so an output directory that exists is complete.
"""
from __future__ import annotations

import sys
import warnings

import luigi
import luigi.configuration

from tasks import records  # noqa: F401  (importing it registers the run-record event handlers)
from tasks.config import config_files, config_paths
from tasks.startup import launched_by_luigi_cli, lock_on_workspace, settings_schema, startup_problems
from tasks.captioning import CaptionImages, EvaluateCaptions, GenerateCaptions, TrainDecoder
from tasks import demo  # noqa: F401  (the built-in demo's stages and sections, registered in tasks/context.py)
from tasks.features import BuildVocabulary, ExtractAnnotations, ExtractFeatures, ExtractShard, PlanShards, store_dir

__all__ = ["BuildVocabulary", "CaptionImages", "EvaluateCaptions", "ExtractAnnotations", "ExtractFeatures",
           "ExtractShard", "GenerateCaptions", "PlanShards",
           "TrainDecoder", "config_files", "config_paths", "settings_schema", "store_dir"]

# Strict configuration: checked while luigi imports this module to parse its command line, so a typo'd key,
# section or flag stops the run (exit [retcode] scheduling_error) before luigi's argparse or any task sees it.
# Then luigi's pid lock is keyed on the workspace, so the same command on two workspaces runs freely.
if launched_by_luigi_cli() and not {"--help", "--help-all"} & set(sys.argv):
    # the unknown keys are reported here, as errors; luigi's own warning about them would only repeat it
    warnings.filterwarnings("ignore", category=luigi.parameter.UnconsumedParameterWarning)
    _problems = startup_problems(sys.argv[1:])
    if _problems:
        for _problem in _problems:
            print(f"captioner: ERROR: {_problem}", file=sys.stderr)
        sys.exit(luigi.configuration.get_config().getint("retcode", "scheduling_error", 35))
    _holder = lock_on_workspace(sys.argv[1:])
    if _holder:
        print(f"captioner: ERROR: {_holder}", file=sys.stderr)
        sys.exit(luigi.configuration.get_config().getint("retcode", "already_running", 10))
