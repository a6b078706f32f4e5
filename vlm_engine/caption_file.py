"""The caption output file: one row per image, in JSONL or CSV, appended batch by batch and read
back to resume.

    file = CaptionFile("captions.csv", fields=STRUCTURED_FIELDS)
    todo = [path for path in paths if path not in file.done]
    file.append(rows)

A row is keyed by its `path`; a CSV file's columns are the rows' fields, a parsed value is a cell
of JSON. A last row cut off mid-write is dropped when the file is opened.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
FIELDS = ("path", "caption", "error")
STRUCTURED_FIELDS = (*FIELDS, "parsed")  # rows of a run under a structured-outputs constraint


class CaptionFileError(ValueError):
    """The output's format is unknown, or the file holds something other than caption rows."""


def output_format(path: str | Path, format: str | None = None) -> str:
    """The file format, "jsonl" or "csv": `format` if given, else the one its suffix names."""
    if format is None:
        format = FORMATS.get(Path(path).suffix.lower())
        if format is None:
            raise CaptionFileError(
                f"cannot tell the format of {str(path)!r} from its suffix; "
                "name it .jsonl or .csv, or pass the format (jsonl or csv)"
            )
    if format not in ("jsonl", "csv"):
        raise CaptionFileError(f"format must be 'jsonl' or 'csv', got {format!r}")
    return format


class CaptionFile:
    """Caption rows in a JSONL or CSV file, appended batch by batch.

    Opening it reads the rows already there (`done` holds their paths) and drops a last row
    that an interrupted run cut off, so appending goes on from complete rows.
    """

    def __init__(
        self, path: str | Path, format: str | None = None, fields: tuple[str, ...] = FIELDS
    ):
        self.path = Path(path)
        self.format = output_format(self.path, format)
        self.fields = fields  # a CSV file's columns (JSONL rows hold the same keys)
        rows = self._read()
        self.done = {row["path"] for row in rows}

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Write the rows in one go; a CSV file gets its header first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(self._serialize(rows, header))
        self.done.update(row["path"] for row in rows)

    def _serialize(self, rows: Sequence[dict[str, Any]], header: bool) -> str:
        buffer = io.StringIO()
        if self.format == "jsonl":
            buffer.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            writer = csv.writer(buffer, lineterminator="\n")
            if header:
                writer.writerow(self.fields)
            writer.writerows([_csv_field(row.get(name)) for name in self.fields] for row in rows)
        return buffer.getvalue()

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        # A row cut off mid-character decodes with a replacement character; it is dropped anyway.
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        try:
            if self.format == "jsonl":
                rows, complete = _parse_jsonl(text)
            else:
                rows, complete = _parse_csv(text, self.fields)
        except (ValueError, csv.Error) as e:
            raise CaptionFileError(
                f"{self.path} is not a {self.format} caption file: {e}"
            ) from None
        if not complete:
            self._rewrite(rows)
        return rows

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file with `rows` (written aside first: a crash keeps the old file)."""
        aside = self.path.with_name(self.path.name + ".partial")
        aside.write_text(self._serialize(rows, header=bool(rows)), encoding="utf-8", newline="")
        os.replace(aside, self.path)


def _parse_jsonl(text: str) -> tuple[list[dict[str, Any]], bool]:
    """The rows of complete lines, and whether the text ends with one (no cut-off tail)."""
    *lines, tail = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                raise ValueError(f"line {number} is not a row with a path")
            rows.append(row)
    return rows, not tail.strip()


def _csv_field(value: Any) -> str:
    """A CSV cell: text as it is, a parsed value as JSON, nothing as an empty cell."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _parse_csv(text: str, fields: tuple[str, ...] = FIELDS) -> tuple[list[dict[str, Any]], bool]:
    """The complete rows, and whether there was no cut-off tail (a caption may span lines)."""
    buffer = io.StringIO(text, newline="")
    records = []
    try:
        for record in csv.reader(buffer, strict=True):
            records.append(record)
        complete = not text or text.endswith("\n")
        if not complete and records:
            records.pop()  # cut off after a field
    except csv.Error:
        if buffer.tell() < len(text):  # broken before the last line: not a cut-off tail
            raise
        complete = False  # cut off inside a quoted field; `records` holds the rows before it
    if records and tuple(records[0]) != fields:
        raise ValueError(f"the header is {records[0]}, not {list(fields)}")
    for number, record in enumerate(records[1:], 2):
        if len(record) != len(fields):
            raise ValueError(f"record {number} has {len(record)} fields, not {len(fields)}")
    return [dict(zip(fields, record, strict=True)) for record in records[1:]], complete


__all__ = [
    "FIELDS",
    "FORMATS",
    "STRUCTURED_FIELDS",
    "CaptionFile",
    "CaptionFileError",
    "output_format",
]
