"""The documentation that is generated stays current: docs/configuration.md is `captioner settings --markdown`."""
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
