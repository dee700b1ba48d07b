"""The user's own data (`--data FILE`): read it into records of text (and labels, when present).

Accepted: a .txt file (paragraphs separated by blank lines; one record per line when it has none), a
.jsonl file (one JSON object or string a line), a .csv file (header row), a .parquet file (needs
pyarrow), or a folder: one a `datasets` `save_to_disk` wrote (its .arrow files are read with pyarrow,
no `datasets` needed), or a folder of the files above. Nothing read here can run code: JSON, CSV and
Arrow are parsed as data.

The text column is the first of `TEXT_COLUMNS` present, else the only column holding strings; the
label column is the first of `LABEL_COLUMNS` present in every record. Anything unreadable raises one
WorkloadError naming the file, the line or column, and what would be valid.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import WorkloadError

SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
TEXT_COLUMNS = ("text", "sentence", "content", "document", "prompt", "question", "sentence1", "input")
LABEL_COLUMNS = ("label", "labels", "target", "class")
_VALID = ("a .txt, .jsonl, .csv or .parquet file, or a folder a `datasets` save_to_disk wrote "
          "(or one holding such files)")


@dataclass(frozen=True)
class DataRecords:
    """Texts in file order, labels aligned with them (or None), and where they came from."""

    texts: list[str]
    labels: list[Any] | None
    source: str
    text_column: str | None = None
    label_column: str | None = None


def read_data(path: str | Path) -> DataRecords:
    """Records of `path` (see the module docstring); at least one non-empty text."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WorkloadError(f"--data {path}: no such file or folder; expected {_VALID}")
    try:
        if path.is_dir():
            rows, source = _read_folder(path)
        else:
            rows, source = _read_file(path), str(path)
    except WorkloadError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"--data {path}: cannot read it: {exc}") from exc
    return _to_records(rows, source)


def _read_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        pq = _pyarrow(path, "parquet")
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises its own ArrowInvalid etc.
            raise WorkloadError(f"--data {path}: not a readable parquet file: {exc}") from exc
    raise WorkloadError(f"--data {path}: unsupported file type '{suffix or path.name}'; expected {_VALID}")


def _read_txt(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if len(paragraphs) <= 1:  # no blank lines: one record per line
        paragraphs = [line.strip() for line in text.splitlines() if line.strip()]
    return paragraphs


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise WorkloadError(f"--data {path}: line {number} is not valid JSON ({exc})") from exc
            if not isinstance(row, (dict, str)):
                raise WorkloadError(f"--data {path}: line {number} holds a {type(row).__name__}; "
                                    "expected a JSON object (with a text field) or a string")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[Any]:
    with path.open(encoding="utf-8", newline="") as f:
        try:
            rows = list(csv.DictReader(f))
        except csv.Error as exc:
            raise WorkloadError(f"--data {path}: not a readable CSV file: {exc}") from exc
    return rows


def _read_folder(path: Path) -> tuple[list[Any], str]:
    arrows = sorted(path.glob("*.arrow")) or sorted(path.glob("*/*.arrow"))
    if arrows:  # datasets' save_to_disk: Arrow IPC streams (a DatasetDict keeps one folder per split)
        ipc = _pyarrow(path, "ipc")
        rows = []
        for file in arrows:
            try:
                with ipc.open_stream(str(file)) as reader:
                    rows.extend(reader.read_all().to_pylist())
            except Exception as exc:
                raise WorkloadError(f"--data {file}: not a readable Arrow stream: {exc}") from exc
        splits = sorted({f.parent.name for f in arrows}) if arrows[0].parent != path else []
        return rows, f"{path} (datasets folder{', splits ' + ', '.join(splits) if splits else ''})"
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
    if not files:
        raise WorkloadError(f"--data {path}: the folder holds no .arrow, .txt, .jsonl, .csv or .parquet "
                            f"files; expected {_VALID}")
    rows = []
    for file in files:
        rows.extend(_read_file(file))
    return rows, f"{path} ({', '.join(f.name for f in files)})"


def _pyarrow(path: Path, part: str) -> Any:
    try:
        if part == "parquet":
            import pyarrow.parquet as module
        else:
            import pyarrow.ipc as module
    except ImportError as exc:
        raise WorkloadError(f"--data {path}: reading it needs pyarrow; pip install 'optistack[hf]' "
                            "(or pip install pyarrow)") from exc
    return module


def _to_records(rows: list[Any], source: str) -> DataRecords:
    if not rows:
        raise WorkloadError(f"--data {source}: no records in it")
    if all(isinstance(r, str) for r in rows):
        texts = [r.strip() for r in rows if r.strip()]
        if not texts:
            raise WorkloadError(f"--data {source}: every record is empty")
        return DataRecords(texts, None, source)
    if not all(isinstance(r, dict) for r in rows):
        raise WorkloadError(f"--data {source}: mixes JSON strings and objects; use one or the other")
    columns = list(rows[0])
    text_col = _text_column(rows, columns, source)
    label_col = next((c for c in LABEL_COLUMNS if all(c in r and r[c] not in (None, "") for r in rows)), None)
    texts, labels = [], []
    for i, row in enumerate(rows):
        value = row.get(text_col)
        if not isinstance(value, str):
            raise WorkloadError(f"--data {source}: record {i + 1} has no text in column '{text_col}' "
                                f"(got {type(value).__name__})")
        if value.strip():
            texts.append(value.strip())
            if label_col is not None:
                labels.append(row[label_col])
    if not texts:
        raise WorkloadError(f"--data {source}: every text in column '{text_col}' is empty")
    return DataRecords(texts, labels if label_col else None, source, text_col, label_col)


def _text_column(rows: list[dict], columns: list[str], source: str) -> str:
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    stringy = [c for c in columns if isinstance(rows[0].get(c), str) and c not in LABEL_COLUMNS]
    if len(stringy) == 1:
        return stringy[0]
    raise WorkloadError(f"--data {source}: cannot tell which column holds the text (columns: "
                        f"{', '.join(map(str, columns)) or 'none'}); name it one of {', '.join(TEXT_COLUMNS)}")


def split_records(count: int, eval_share: float = 0.5, max_eval: int | None = None) -> tuple[range, range]:
    """(eval indices, calibration indices): eval the first records, calibration every later one,
    so the two never meet. At least one record each; needs two records."""
    if count < 2:
        raise WorkloadError(f"--data holds {count} record(s); it needs at least 2 (evaluation and "
                            "calibration are disjoint parts of it)")
    n_eval = min(max(1, round(count * eval_share)), count - 1)
    if max_eval is not None:
        n_eval = min(n_eval, max_eval)
    return range(0, n_eval), range(n_eval, count)


def describe_split(source: str, eval_part: range, calib_part: range, unit: str = "records", **counts: Any) -> dict:
    """The split as the report records it."""
    out = {"data": source,
           "eval": f"{unit} {eval_part.start}..{eval_part.stop - 1}" if len(eval_part) else "none",
           "calibration": f"{unit} {calib_part.start}..{calib_part.stop - 1}" if len(calib_part) else "none",
           "disjoint": True}
    out.update(counts)
    return out
