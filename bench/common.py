"""Shared by the benchmarks: writing results."""

from __future__ import annotations

import json
import os


def write_json(path: str, results) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
