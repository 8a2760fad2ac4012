"""The README's option table is the one generated from the options class."""

import os

from pipelines.options import options_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_options_table_matches_code():
    text = open(os.path.join(ROOT, "README.md")).read()
    begin, end = "<!-- options:begin -->\n", "\n<!-- options:end -->"
    table = text[text.index(begin) + len(begin):text.index(end)].strip()
    assert table == options_markdown().strip(), "run `make docs` and paste docs/options.md"


def test_docs_options_file_matches_code():
    assert open(os.path.join(ROOT, "docs", "options.md")).read().strip() == \
        options_markdown().strip()
