"""The configuration reference (docs/configuration.md) is generated from the config models and kept
current; the README names the two commands and links the reference."""

import re

from danceopd.config_doc import DOC, render
from tests.conftest import ROOT


def test_config_reference_is_current():
    text = (ROOT / DOC).read_text()
    m = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", text, re.S)
    assert m, f"{DOC} lacks the config-reference markers"
    assert m.group(1).strip() == render().strip(), "run: python -m danceopd.config_doc --write"


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert DOC in text, f"the README links the configuration reference ({DOC})"
