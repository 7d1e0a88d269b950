"""benchmarks/RESULTS.md: one `## ` section per benchmark, kept in place when a benchmark writes; the CPU
each entry names."""
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def _split(path, heading):
    """(lines before the section's body, its body lines, lines after), the section added at the end
    of the file if missing."""
    lines = path.read_text().rstrip("\n").splitlines() if path.exists() else ["# Benchmarks"]
    if heading not in lines:
        lines += ["", heading]
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[:start], lines[start:end], lines[end:]


def _write(path, before, body, after):
    body = "\n".join(body).strip("\n")
    after = "\n".join(after)
    path.write_text("\n".join(before) + "\n\n" + body + "\n" + ("\n" + after + "\n" if after else ""))


def append_entry(heading, entry, path=RESULTS):
    """Adds `entry` (markdown) at the end of the section `heading`."""
    before, body, after = _split(path, heading)
    _write(path, before, ["\n".join(body).rstrip("\n"), "", entry.strip("\n")], after)


def replace_section(heading, body, path=RESULTS):
    """Replaces what the section `heading` holds with `body` (markdown), where the section stands."""
    before, _, after = _split(path, heading)
    _write(path, before, [body], after)


def append_table_row(heading, header, row, path=RESULTS):
    """Adds `row` to the end of the first table of the section `heading`, which starts with the
    `header` lines if it has no table yet."""
    before, body, after = _split(path, heading)
    if header[0] not in body:
        body += ["", *header]
    end = body.index(header[0])
    while end < len(body) and body[end].startswith("|"):
        end += 1
    _write(path, before, [*body[:end], row, *body[end:]], after)


def cpu():
    """The CPU model and its vector-instruction flags, as /proc/cpuinfo gives them (elsewhere: what
    `platform` knows)."""
    if not Path("/proc/cpuinfo").exists():
        return platform.processor() or platform.machine()
    fields = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = [flag for flag in fields.get("flags", "").split() if flag.startswith(("avx", "fma", "f16c", "amx"))]
    return f"{fields.get('model name', 'unknown CPU')} (flags {' '.join(flags)})"


def command_line(module, argv=None):
    """The command line that ran benchmark `module` (e.g. "benchmarks.adherence") with `argv` (default: the
    process's arguments), for an entry's "Command" line."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
