"""Progress on stderr (`stable_diffusion/progress.py`): redrawn in place on a terminal, plain lines
every tenth of the way elsewhere."""
import io
import re

from stable_diffusion import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert list(progress.report(range(20), "denoising")) == list(range(20))
    lines = progress.sys.stderr.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"denoising: {i}/20" for i in range(2, 21, 2)]
    assert not re.search(r"[\r\b\x1b]", progress.sys.stderr.getvalue())


def test_one_line_redrawn_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", Terminal())
    list(progress.report(range(3), "denoising"))
    text = progress.sys.stderr.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert text.startswith("\rdenoising: 1/3, ")


def test_silent_unless_verbose(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    list(progress.report(range(3), "denoising", verbose=False))
    assert progress.sys.stderr.getvalue() == ""
