"""Progress of a loop on stderr: one line redrawn in place on a terminal; elsewhere (a log, a pipe) a
plain line every tenth of the way, without control characters."""
import sys
import time


def report(items, label, verbose=True):
    """Yields the items of `items` (a sized iterable), writing `label: done/total, seconds` to stderr
    after each one if `verbose`."""
    total, start = len(items), time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        if verbose and (sys.stderr.isatty() or done == total or done % max(1, total // 10) == 0):
            write(label, done, total, start)


def write(label, done, total, start):
    """Writes `label: done/total, seconds since start` (a `time.perf_counter()`) to stderr: in place on a
    terminal, ending the line when done == total; elsewhere as a line."""
    stream, line = sys.stderr, f"{label}: {done}/{total}, {time.perf_counter() - start:.1f} s"
    stream.write(f"\r{line}" + ("\n" if done == total else "") if stream.isatty() else f"{line}\n")
    stream.flush()
