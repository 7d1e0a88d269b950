"""Progress of a loop on stderr: one line redrawn in place on a terminal; elsewhere (a log, a pipe) a
plain line every tenth of the way, without control characters."""
import sys
import time


def report(items, label, verbose=True):
    """Yields the items of `items` (a sized iterable), writing `label: done/total, seconds` to stderr
    after each one if `verbose`."""
    total, start, stream = len(items), time.perf_counter(), sys.stderr
    terminal = stream.isatty()
    for done, item in enumerate(items, 1):
        yield item
        if verbose and (terminal or done == total or done % max(1, total // 10) == 0):
            line = f"{label}: {done}/{total}, {time.perf_counter() - start:.1f} s"
            stream.write(f"\r{line}" + ("\n" if done == total else "") if terminal else f"{line}\n")
            stream.flush()
