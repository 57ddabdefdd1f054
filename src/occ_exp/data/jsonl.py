"""JSON Lines files (benchmarks, data sets): one JSON object per line, checked row by row.

A malformed row is a `DataError` whose message starts with `<file>:<line>:` and says what is
wrong (not UTF-8, not JSON, not an object, a required key missing or empty), so the user can open
the file at that line. Blank lines are skipped; a UTF-8 byte-order mark is accepted. A row longer
than `max_row_chars` characters (`data.max_row_chars`, see occ_exp.config.MAX_ROW_CHARS) is refused
before it is read whole, so a file without line breaks cannot exhaust memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from occ_exp.config import MAX_ROW_CHARS


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


def iter_jsonl(path: str | os.PathLike, required: Sequence[str] = (), max_row_chars: int = MAX_ROW_CHARS) -> Iterator[dict]:
    """Yield the rows of a JSONL file; `required` keys must be present and not null or empty."""
    for _, row in iter_jsonl_lines(path, required, max_row_chars):
        yield row


def _too_long(where: str, size: str, max_row_chars: int) -> DataError:
    return DataError(f"{where}: a row of {size} is longer than data.max_row_chars={max_row_chars:,} characters (real math "
                     "problems have a few thousand); check the file (missing line breaks?) or raise data.max_row_chars")


def iter_jsonl_lines(path: str | os.PathLike, required: Sequence[str] = (),
                     max_row_chars: int = MAX_ROW_CHARS) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every non-blank line (see `iter_jsonl`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    limit = 4 * max_row_chars + 2  # bytes read per line at most (4: UTF-8's longest character, 2: CR LF)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(limit), b""), 1):
            where = f"{path}:{lineno}"
            if len(raw) == limit and not raw.endswith(b"\n"):  # the rest of the line is never read
                raise _too_long(where, f"more than {limit:,} bytes", max_row_chars)
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8") from None
            if (n := len(line.rstrip("\r\n"))) > max_row_chars:
                raise _too_long(where, f"{n:,} characters", max_row_chars)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object ({{...}}), got {type(row).__name__}")
            missing = [k for k in required if row.get(k) in (None, "")]
            if missing:
                raise DataError(f"{where}: missing or empty {', '.join(map(repr, missing))} "
                                f"(the row has keys {sorted(row)[:8]}); every row needs {list(required)}")
            yield lineno, row


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = (), max_row_chars: int = MAX_ROW_CHARS) -> list[dict]:
    """All rows of a JSONL file (see `iter_jsonl`)."""
    return list(iter_jsonl(path, required, max_row_chars))
