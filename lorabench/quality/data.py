"""The evaluation texts: a JSONL file of `{"adapter": name, "text": ...}` or `{"adapter": name,
"tokens": [...]}` rows, each row one sequence evaluated with that adapter.

Text is turned into token ids by the base model's tokenizer: UTF-8 bytes for a preset (random
weights, vocabulary of at least 256), the checkpoint's `tokenizer.json` through the `tokenizers`
package for a checkpoint folder. A row must give at least two tokens (one predicted), ids within
the vocabulary, and no more than the model's context.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

from lorabench.errors import LorabenchError

Tokenizer = Callable[[str], list[int]]


def byte_tokenizer(vocab: int) -> Tokenizer:
    """UTF-8 bytes as token ids (a preset's random model has no tokenizer of its own)."""
    def encode(text: str) -> list[int]:
        if vocab < 256:
            raise LorabenchError(f"text rows need a vocabulary of at least 256 byte tokens, the model has {vocab}; "
                                 "give token rows instead")
        return list(text.encode("utf-8"))
    return encode


def checkpoint_tokenizer(folder: Path) -> Tokenizer:
    """The checkpoint's own tokenizer (tokenizer.json, special tokens such as BOS added as it says)."""
    path = folder / "tokenizer.json"

    @functools.cache
    def load():
        if not path.is_file():
            raise LorabenchError(f"text rows: checkpoint {folder} has no tokenizer.json; give token rows instead")
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise LorabenchError("text rows with a checkpoint need the `tokenizers` package (python -m pip install "
                                 "tokenizers); or give token rows") from None
        try:
            return HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own exception type
            raise LorabenchError(f"{path}: not a readable tokenizer ({err})") from None

    def encode(text: str) -> list[int]:
        return load().encode(text).ids
    return encode


def read_rows(path: str | Path, adapters: list[str], tokenize: Tokenizer, vocab: int, max_tokens: int) -> dict[str, list[list[int]]]:
    """Token sequences per adapter, in file order; every adapter of `adapters` is a key (maybe with
    no rows). Any bad row is one error naming the file and line."""
    path = Path(path)
    known = set(adapters)
    rows: dict[str, list[list[int]]] = {name: [] for name in adapters}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise LorabenchError(f"--data {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LorabenchError(f"--data {path}: not readable as text ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--data {path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LorabenchError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(row, dict):
            raise LorabenchError(f"{where}: expected a JSON object with 'adapter' and 'text' or 'tokens'")
        name = row.get("adapter")
        if not isinstance(name, str):
            raise LorabenchError(f"{where}: field 'adapter' must be an adapter's name (a string)")
        if name not in known:
            raise LorabenchError(f"{where}: adapter {name!r} is not in the collection")
        if ("text" in row) == ("tokens" in row):
            raise LorabenchError(f"{where}: give exactly one of 'text' and 'tokens'")
        if "text" in row:
            if not isinstance(row["text"], str):
                raise LorabenchError(f"{where}: field 'text' must be a string")
            try:
                tokens = tokenize(row["text"])
            except LorabenchError as err:
                raise LorabenchError(f"{where}: {err}") from None
        else:
            tokens = row["tokens"]
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise LorabenchError(f"{where}: field 'tokens' must be a list of integer token ids")
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise LorabenchError(f"{where}: token id {bad} is outside the model's vocabulary 0..{vocab - 1}")
        if len(tokens) < 2:
            raise LorabenchError(f"{where}: {len(tokens)} token(s); a row needs at least 2 (one to predict)")
        if len(tokens) > max_tokens:
            raise LorabenchError(f"{where}: {len(tokens)} tokens, more than the model's context of {max_tokens}")
        rows[name].append(tokens)
    return rows
