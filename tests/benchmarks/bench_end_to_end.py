"""Wall time of each stage of the demo main job, so the slowest stage is visible (not run by pytest).

    python tests/benchmarks/bench_end_to_end.py                     # a fresh workspace: the whole main job (~15 min)
    python tests/benchmarks/bench_end_to_end.py --workspace work    # the newest TrainDecoder run of a workspace

Runs `luigi --module tasks TrainDecoder` (configs/luigi.cfg) in a new temporary workspace, then reads the run
record it left (runs/<id>.json: seconds per task, storage/runs.py) and prints each stage's total, its share of
the run and, for stages made of several tasks (ExtractShard), their count.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def newest_run(workspace: Path, task: str = "TrainDecoder") -> dict:
    """The newest run record of `workspace` whose command ran `task`."""
    records = [json.loads(p.read_text()) for p in sorted((workspace / "runs").glob("*.json"))]
    records = [r for r in records if task in r["command"]]
    if not records:
        sys.exit(f"no run of {task} recorded under {workspace / 'runs'}")
    return records[-1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspace", type=Path, help="report the newest run of this workspace instead of running")
    args = parser.parse_args()
    workspace = args.workspace
    if workspace is None:
        workspace = Path(tempfile.mkdtemp(prefix="bench-e2e-")) / "work"
        env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
        luigi = Path(sys.executable).with_name("luigi")
        subprocess.run([str(luigi), "--module", "tasks", "TrainDecoder"], cwd=REPO, check=True,
                       env={**env, "CAPTIONER_WORKDIR": str(workspace)})
    run = newest_run(workspace)
    seconds, count = defaultdict(float), defaultdict(int)
    for task in run["tasks"]:
        if "seconds" in task:
            seconds[task["family"]] += task["seconds"]
            count[task["family"]] += 1
    print(f"run {run['id']}: {run['seconds'] / 60:.1f} min, {run['result']}; command {' '.join(run['command'][1:])}")
    for family, s in sorted(seconds.items(), key=lambda item: -item[1]):
        tasks = f" ({count[family]} tasks)" if count[family] > 1 else ""
        print(f"  {family:<22} {s / 60:6.1f} min  {100 * s / run['seconds']:5.1f}%{tasks}")


if __name__ == "__main__":
    main()
