"""The documentation that is generated stays current: docs/configuration.md is `captioner settings --markdown`."""
import luigi
import luigi.parameter
from click.testing import CliRunner

from cli import main as cli
from tests.conftest import REPO


def test_configuration_reference_is_current():
    """Regenerate with `.venv/bin/captioner settings --markdown > docs/configuration.md` when this fails."""
    result = CliRunner().invoke(cli, ["settings", "--markdown"])
    assert result.exit_code == 0, result.output
    assert result.output == (REPO / "docs" / "configuration.md").read_text(encoding="utf-8"), \
        "docs/configuration.md is out of date: run `captioner settings --markdown > docs/configuration.md`"


def test_configuration_reference_names_every_key():
    import tasks

    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for section, key, _, _ in tasks.settings_schema():
        assert f"## [{section}]" in text and f"| `{key}` |" in text


def test_every_key_has_its_one_default_in_configs_luigi_cfg():
    """The sections declare no defaults: configs/luigi.cfg, read under every config, holds each key's."""
    import tasks
    from tasks.config import Section

    missing = [(s, k) for s, k, default, _ in tasks.settings_schema() if default is None]
    assert not missing, f"keys without a default in configs/luigi.cfg: {missing}"
    # luigi 3.8 keeps a default in Parameter._default; a BoolParameter always has one (False), luigi's own
    declared = [(cls.get_task_family(), name) for cls in Section.__subclasses__() for name, param in cls.get_params()
                if param._default is not luigi.parameter._no_value
                and not (isinstance(param, luigi.BoolParameter) and param._default is False)]
    assert not declared, f"defaults written in tasks/config.py as well: {declared}"
