"""Prompt sources: a prompt file or the DiffusionDB TFDS dataset, read in an order that is a pure
function of (seed, round), tokenized on each host for the rows it holds and encoded on device by the
backbone's text encoder.

Prompt files (`read_prompt_file`), by suffix:
  * `.txt` (and any other suffix): UTF-8, one prompt per line; blank lines and lines that are not
    UTF-8 are skipped (the latter counted);
  * `.jsonl`: one JSON value per line, a string or an object with the prompt in a field;
  * `.json`: a list of strings, or a list of objects with the prompt in a field;
  * `.csv` / `.tsv`: a header row, the prompt in a column (UTF-8, an Excel BOM allowed);
  * `.parquet`: the prompt in a column of strings.
The field / column is `data.prompt_column` (the sample command's `--prompt_column`); "" picks the
first of `PROMPT_COLUMNS` the file has. In the structured formats every row is a prompt: a row that
cannot be parsed (a torn JSONL line), lacks the field, or holds an empty or non-string value is an
error that names its line / row, rather than a silently shorter prompt set.

Order: the global sample index of round r, batch m (of the M + 1), row b is
i = (r (M + 1) + m) B + b; it reads prompt perm_e[i mod N] of epoch e = i div N, where perm_e is a
permutation seeded by (seed, e). A resumed run therefore reads exactly what the uninterrupted one
would have, and no host needs more than the indices of its own rows.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dpdmd_jax.core import Cond, RoundBatch
from dpdmd_jax.parallel import mesh as mesh_lib


class PromptFileError(ValueError):
    """The prompt file is missing, empty, unreadable, or has no usable prompt column."""


PROMPT_COLUMNS = ("prompt", "caption", "text")  # the column "" (auto) picks: the first a file has
STRUCTURED = (".jsonl", ".json", ".csv", ".tsv", ".parquet")  # every other suffix: one prompt per line
COLUMN_FLAGS = "--prompt_column=NAME (sample) or --config.data.prompt_column=NAME (training)"


def read_prompt_file(path: str, column: str = "") -> tuple[list[str], int]:
    """(prompts, number of lines skipped because they are not UTF-8) of a prompt file (module
    docstring: the formats); `column` names the prompt field of a structured file ("" = auto)."""
    if not os.path.isfile(path):
        raise PromptFileError(f"prompt file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in STRUCTURED:
        if column:
            raise PromptFileError(f"prompt file {path!r} is a text file (one prompt per line), which has no columns; "
                                  f"--prompt_column / data.prompt_column={column!r} applies to {', '.join(STRUCTURED)}")
        return _text_prompts(path)
    readers = {".jsonl": _jsonl_prompts, ".json": _json_prompts, ".csv": _csv_prompts, ".tsv": _csv_prompts,
               ".parquet": _parquet_prompts}
    prompts = readers[suffix](path, column)
    if not prompts:
        raise PromptFileError(f"prompt file {path!r} holds no prompts")
    return prompts, 0


def _text_prompts(path: str) -> tuple[list[str], int]:
    prompts, bad = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                bad += 1
                continue
            if line:
                prompts.append(line)
    if not prompts:
        raise PromptFileError(f"prompt file {path!r} holds no prompts" + (f" ({bad} non-UTF-8 lines skipped)"
                                                                           if bad else ""))
    return prompts, bad


def choose_column(path: str, columns: Sequence[str], column: str) -> str:
    """`column` if the file has it; for "" the first of PROMPT_COLUMNS it has; else one error
    listing the columns it has and naming the flags."""
    if column:
        if column not in columns:
            raise PromptFileError(f"prompt file {path!r} has no column {column!r} (its columns: "
                                  f"{', '.join(map(str, columns)) or 'none'}); choose one with {COLUMN_FLAGS}")
        return column
    found = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if found is None:
        raise PromptFileError(f"prompt file {path!r} has none of the columns {', '.join(PROMPT_COLUMNS)} (its columns: "
                              f"{', '.join(map(str, columns)) or 'none'}); name the prompt column with {COLUMN_FLAGS}")
    return found


def _prompt(value: Any, where: str, column: str | None) -> str:
    """A row's prompt: a non-empty string (stripped), else an error naming the row."""
    what = f"field {column!r}" if column else "value"
    if not isinstance(value, str):
        raise PromptFileError(f"{where}: {what} is {'missing' if value is None else type(value).__name__}, not a "
                              "string prompt")
    if not value.strip():
        raise PromptFileError(f"{where}: {what} is empty; every row of a structured prompt file is a prompt: remove "
                              "the row or fill it in")
    return value.strip()


def _from_values(path: str, values: Iterable[tuple[str, Any]], column: str) -> list[str]:
    """Prompts of (where, value) pairs: all strings, or all objects with the prompt in a field."""
    prompts, field = [], None
    for where, value in values:
        if isinstance(value, dict):
            if field is None:
                field = choose_column(path, list(value), column)
            if field not in value:
                raise PromptFileError(f"{where}: no field {field!r} (its fields: {', '.join(value) or 'none'})")
            prompts.append(_prompt(value[field], where, field))
        elif isinstance(value, str) and not column:
            prompts.append(_prompt(value, where, None))
        else:
            want = f"an object with a {column!r} field" if column else "a string or an object with a prompt field"
            raise PromptFileError(f"{where} holds {type(value).__name__} {str(value)[:40]!r}, not {want}")
    return prompts


def _jsonl_prompts(path: str, column: str) -> list[str]:
    def values():
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                where = f"prompt file {path!r} line {n}"
                try:
                    line = raw.decode("utf-8")
                    if line.strip():
                        yield where, json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise PromptFileError(f"{where} is not a UTF-8 JSON value ({e}): a torn or corrupt line; fix or "
                                          "remove it") from None

    return _from_values(path, values(), column)


def _json_prompts(path: str, column: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompt file {path!r} is not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise PromptFileError(f"prompt file {path!r} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, list):
        raise PromptFileError(f"prompt file {path!r} holds a JSON {type(data).__name__}; a .json prompt file is a list "
                              "of strings or of objects with a prompt field")
    return _from_values(path, ((f"prompt file {path!r} item {i}", v) for i, v in enumerate(data)), column)


def _csv_prompts(path: str, column: str) -> list[str]:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    prompts = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: the BOM spreadsheets write
            reader = csv.DictReader(f, delimiter=delimiter)
            field = choose_column(path, reader.fieldnames or [], column)
            for n, row in enumerate(reader, 1):
                prompts.append(_prompt(row[field], f"prompt file {path!r} row {n} (line {reader.line_num})", field))
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompt file {path!r} is not UTF-8 ({e})") from None
    except csv.Error as e:
        raise PromptFileError(f"prompt file {path!r} is not a readable {'TSV' if delimiter != ',' else 'CSV'} file "
                              f"({e})") from None
    return prompts


def _parquet_prompts(path: str, column: str) -> list[str]:
    # Imported here: pyarrow takes ~0.5 s to import and only parquet prompt files need it (as diffusiondb.py).
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        field = choose_column(path, schema.names, column)
        values = pq.read_table(path, columns=[field]).column(field)
    except (pa.ArrowException, OSError) as e:
        raise PromptFileError(f"prompt file {path!r} is not a readable parquet file ({e})") from None
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise PromptFileError(f"prompt file {path!r}: column {field!r} holds {values.type}, not strings")
    return [_prompt(v, f"prompt file {path!r} row {n}", field) for n, v in enumerate(values.to_pylist(), 1)]


class PromptOrder:
    """Which prompt each (round, batch, row) reads; see the module docstring."""

    def __init__(self, num_prompts: int, seed: int, rows_per_round: int, batch: int):
        self.n, self.seed, self.rows, self.batch = num_prompts, seed, rows_per_round, batch

    @functools.lru_cache(maxsize=2)  # noqa: B019  (one source per run; a round spans <= 2 epochs)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def indices(self, r: int, rows: slice) -> np.ndarray:
        """Prompt indices [M + 1, len(rows)] of round r's global batch rows `rows`."""
        m = np.arange(self.rows)[:, None]
        b = np.arange(rows.start, rows.stop)[None, :]
        i = (r * self.rows + m) * self.batch + b
        epoch, j = np.divmod(i, self.n)
        out = np.empty_like(i)
        for e in np.unique(epoch):
            out[epoch == e] = self._perm(int(e))[j[epoch == e]]
        return out


class TextSource:
    """Prompts -> token ids on the host (this process's rows) -> conditionings on device."""

    def __init__(self, c: ml_collections.ConfigDict, prompts: Sequence[str], text_encoder, mesh: jax.sharding.Mesh):
        self.prompt_list, self.text, self.mesh = prompts, text_encoder, mesh
        self.order = PromptOrder(len(prompts), c.seed, c.distill.fake_updates_per_student + 1, c.batch_size)
        self.batch = c.batch_size
        self.truncated = 0  # prompts truncated so far by this process
        empty = text_encoder.empty()  # [1, ...]: the embedding of "", the unconditional branch
        sharded = lambda x: jax.jit(lambda e: jnp.broadcast_to(e, (self.batch, *e.shape[1:])),
                                    out_shardings=mesh_lib.batch_sharding(mesh, x.ndim))(x)
        self.global_uncond = jax.tree.map(sharded, empty)
        self.empty = jax.device_get(empty)

    def __len__(self) -> int:
        return len(self.prompt_list)

    def prompts(self) -> Sequence[str]:
        return self.prompt_list

    def prompt_problems(self, prompts: Sequence[str]) -> list[str]:
        return []

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Conditionings of `prompts` (device arrays, encoders sharded on the mesh)."""
        return self.text.encode(list(prompts))

    def uncond(self, n: int) -> Cond:
        """The embedding of "" for n rows (host arrays)."""
        return jax.tree.map(lambda e: np.broadcast_to(np.asarray(e), (n, *e.shape[1:])), self.empty)

    def round(self, r: int, rows: slice) -> RoundBatch:
        idx = self.order.indices(r, rows)
        tokens, truncated = self.text.tokenize([self.prompt_list[i] for i in idx.reshape(-1)])
        if truncated.any():
            self.truncated += int(truncated.sum())
            logging.log_every_n_seconds(
                logging.WARNING, "%d prompts so far were longer than the tokenizers' limits and were truncated "
                "(as the diffusers pipeline does)", 600, self.truncated)
        return RoundBatch(cond=jax.tree.map(lambda x: x.reshape(*idx.shape, *x.shape[1:]), tokens), uncond=None)

    def encode(self, batch: RoundBatch) -> RoundBatch:
        """Global token arrays -> global conditionings (device); the uncond is computed once."""
        return RoundBatch(cond=self.text.encode_tokens(batch.cond), uncond=self.global_uncond)

    def eval_cond(self, n: int):
        """Conditionings of the first n prompts (fixed sample grids), on device."""
        return self.encode_prompts([self.prompt_list[i] for i in range(min(n, len(self)))])


def text_file_prompts(c: ml_collections.ConfigDict) -> list[str]:
    """The prompts of `data.prompt_file` (its `data.prompt_column` for a structured file)."""
    prompts, bad = read_prompt_file(c.data.prompt_file, c.data.prompt_column)
    if bad:
        logging.warning("%s: skipped %d lines that are not valid UTF-8", c.data.prompt_file, bad)
        print(f"{c.data.prompt_file}: skipped {bad} lines that are not valid UTF-8; {len(prompts)} prompts remain")
    return prompts
