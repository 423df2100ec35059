"""Cost per log line: the logging entry's JSON pipeline vs the stdlib default formatter.

Both format the same pre-built records through a handler writing to an in-memory
stream, so the number is the formatting and handler cost alone (no disk).

    python benchmarks/logging_cost.py [--lines 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import io
import logging
import time

import dask.config

from catalog.logging import ServerContext, formatter


def make_records(n: int) -> list[logging.LogRecord]:
    """Records like distributed's: a format string with arguments, some exceptions."""
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    return [
        logging.LogRecord(
            "distributed.worker",
            logging.INFO,
            __file__,
            1,
            "Starting established connection to %s (%d)",
            ("tcp://127.0.0.1:8786", i),
            exc_info if i % 100 == 0 else None,
        )
        for i in range(n)
    ]


def per_line(
    fmt: logging.Formatter, records: list[logging.LogRecord], repeat: int
) -> float:
    """Best-of-``repeat`` seconds per record through a StreamHandler."""
    best = float("inf")
    for _ in range(repeat):
        handler = logging.StreamHandler(io.StringIO())
        handler.setFormatter(fmt)
        start = time.perf_counter()
        for record in records:
            record.exc_text = None  # the stdlib formatter caches tracebacks
            handler.handle(record)
        best = min(best, (time.perf_counter() - start) / len(records))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    records = make_records(args.lines)
    stdlib = logging.Formatter(dask.config.get("distributed.admin.log-format"))
    json_fmt = formatter("json", ServerContext([]))
    base = per_line(stdlib, records, args.repeat)
    structured = per_line(json_fmt, records, args.repeat)
    print(f"lines per run:            {args.lines} (1% with a traceback)")
    print(f"stdlib default formatter: {base * 1e6:8.2f} us/line")
    print(f"catalog JSON pipeline:    {structured * 1e6:8.2f} us/line")
    print(f"ratio JSON / stdlib:      {structured / base:8.2f}x")


if __name__ == "__main__":
    main()
