"""`captioner`: command-line tools around the pipeline's artifacts (the pipeline itself runs with `luigi`).

    main.py       the command group, the entry point (`captioner = cli:run`), status, prune, settings, demo-data
    models.py     caption, export: a trained model used outside the pipeline
    artifacts.py  inspect, verify, plot-attention: what the pipeline's files hold
"""
from cli import artifacts as _artifacts, models as _models  # noqa: F401  (their commands register on main)
from cli.main import main, run

__all__ = ["main", "run"]
