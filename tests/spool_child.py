"""Append messages to a Spool and print each seq once ``append`` has returned; the parent kills -9 us.

    python spool_child.py DB_PATH COUNT [--max-messages N] [--synchronous NORMAL|FULL]

Each payload is ``{"seq": <seq>, "i": <i>}`` so the parent can check that what
survived is exactly what was appended. A line printed means "append returned":
the test asserts every printed seq is in the spool after the kill.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_runtime.mqtt.spool import Spool


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("db", type=Path)
    parser.add_argument("count", type=int)
    parser.add_argument("--max-messages", type=int, default=1_000_000)
    parser.add_argument("--synchronous", default="NORMAL")
    args = parser.parse_args(argv)
    spool = Spool(args.db, max_messages=args.max_messages, max_bytes=1 << 30, synchronous=args.synchronous)
    out = sys.stdout
    for i in range(args.count):
        seq = spool.append("edge/dev/events", lambda s, i=i: json.dumps({"seq": s, "i": i}).encode())
        out.write(f"{seq}\n")
        out.flush()
    spool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
