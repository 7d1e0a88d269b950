"""benchmarks/results.py writes each benchmark's figures into its own section of RESULTS.md, in place."""
from benchmarks.results import append_entry, append_table_row, replace_section

PAGE = """# Benchmarks

## Speed

### run 1

## Memory

| date | peak |
|---|---|
| d1 | 1 |

Notes on memory.
"""


def test_append_entry_lands_at_the_end_of_its_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(PAGE)
    append_entry("## Speed", "### run 2\n\nfigures", path)
    assert path.read_text() == PAGE.replace("### run 1\n", "### run 1\n\n### run 2\n\nfigures\n")


def test_append_table_row_extends_the_table_not_the_notes(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(PAGE)
    append_table_row("## Memory", ["| date | peak |", "|---|---|"], "| d2 | 2 |", path)
    assert path.read_text() == PAGE.replace("| d1 | 1 |\n", "| d1 | 1 |\n| d2 | 2 |\n")


def test_replace_section_keeps_the_order_of_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(PAGE)
    replace_section("## Speed", "### run 3", path)
    assert path.read_text() == PAGE.replace("### run 1\n", "### run 3\n")


def test_missing_sections_and_files_are_created(tmp_path):
    path = tmp_path / "RESULTS.md"
    append_table_row("## Memory", ["| date | peak |", "|---|---|"], "| d1 | 1 |", path)
    append_entry("## Speed", "### run 1", path)
    assert path.read_text() == "# Benchmarks\n\n## Memory\n\n| date | peak |\n|---|---|\n| d1 | 1 |\n\n## Speed\n\n### run 1\n"
