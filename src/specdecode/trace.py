"""``--trace FILE``: one JSON line per step, framed by a ``run`` header and a ``summary`` line.

``specdecode explain`` reads these files; the format is stable within a major version.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict


class TraceWriter:
    def __init__(self, path_or_file, meta: dict | None = None):
        self._own = isinstance(path_or_file, (str, bytes)) or hasattr(path_or_file, "__fspath__")
        if self._own:
            os.makedirs(os.path.dirname(os.path.abspath(path_or_file)), exist_ok=True)
        self._file = open(path_or_file, "w") if self._own else path_or_file
        self.meta = dict(meta or {})

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()

    def header(self, config, **info) -> None:
        cfg = asdict(config)
        self._write({"type": "run", **self.meta, **info, "config": cfg})

    def step(self, rec) -> None:
        self._write(rec.to_json())

    def summary(self, stats, finish_reason: str) -> None:
        self._write({"type": "summary", "finish_reason": finish_reason, **stats.to_json()})

    def close(self) -> None:
        if self._own:
            self._file.close()


def read_trace(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
