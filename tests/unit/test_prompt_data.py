"""Prompt files and the prompt order: UTF-8 lines (bad ones skipped and counted); .jsonl / .json / .csv /
.tsv / .parquet files with the prompt in a field (named, or found among prompt / caption / text), each
broken row named by its line or row; the sample command's --prompt_column; and an order that
is a pure function of (seed, round) in which each host's rows are a slice of the global batch and
every epoch reads each prompt exactly once. (Truncated prompts named with what each encoder dropped,
through the transformers tokenizers, and `embedding_cache --help`: tests/integration/
test_prompt_text.py.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpdmd_jax.data.prompts import PromptFileError, PromptOrder, read_prompt_file, text_file_prompts


def test_prompt_file_skips_blank_and_non_utf8_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\n\n  \ncaf\xe9 au lait\n  a dog  \n\xff\xfe\n")
    assert read_prompt_file(str(path)) == (["a cat", "a dog"], 2)
    path.write_bytes(b"\n \n\xff\n")
    with pytest.raises(PromptFileError, match=r"holds no prompts \(1 non-UTF-8 lines skipped\)"):
        read_prompt_file(str(path))
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompt_file(str(tmp_path / "missing.txt"))
    path.write_text("a cat\n")
    with pytest.raises(PromptFileError, match=r"is a text file .* which has no columns"):
        read_prompt_file(str(path), "caption")


PROMPTS = ["a cat, on a mat", "café \"au\" lait"]  # a comma and quotes: CSV quoting; non-ASCII: UTF-8


def _write(path, suffix: str, rows: list[dict]) -> str:
    """`rows` (dicts of one schema) as a prompt file of the format `suffix`."""
    path = str(path) + suffix
    if suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif suffix == ".json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    elif suffix in (".csv", ".tsv"):
        import csv

        with open(path, "w", encoding="utf-8-sig", newline="") as f:  # with the BOM spreadsheets write
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_structured_prompt_files_read_a_named_or_found_column(tmp_path, suffix):
    rows = [{"id": str(i), "caption": p, "text": f"other {i}"} for i, p in enumerate(PROMPTS)]
    path = _write(tmp_path / "p", suffix, rows)
    assert read_prompt_file(path) == (PROMPTS, 0)  # auto: caption comes before text
    assert read_prompt_file(path, "text") == (["other 0", "other 1"], 0)
    with pytest.raises(PromptFileError, match=r"has no column 'prompts' \(its columns: id, caption, text\); choose "
                       r"one with --prompt_column=NAME \(sample\) or --config.data.prompt_column=NAME"):
        read_prompt_file(path, "prompts")
    no_auto = _write(tmp_path / "q", suffix, [{"id": "0", "title": "a dog"}])
    with pytest.raises(PromptFileError, match=r"has none of the columns prompt, caption, text \(its columns: id, "
                       r"title\); name the prompt column with --prompt_column"):
        read_prompt_file(no_auto)
    assert read_prompt_file(no_auto, "title") == (["a dog"], 0)
    empty = _write(tmp_path / "e", suffix, [{"prompt": "a cat"}, {"prompt": "  "}])
    where = {".jsonl": "line 2", ".json": "item 1", ".csv": r"row 2 \(line 3\)", ".tsv": r"row 2 \(line 3\)",
             ".parquet": "row 2"}[suffix]
    with pytest.raises(PromptFileError, match=rf"{where}: field 'prompt' is empty"):
        read_prompt_file(empty)


def test_json_prompt_files_of_strings_and_broken_rows(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('"a cat"\n\n{"prompt": "a dog"}\n')  # strings and objects; blank lines skipped
    assert read_prompt_file(str(jsonl)) == (["a cat", "a dog"], 0)
    jsonl.write_text('{"prompt": "a cat"}\n{"prompt": "a d\n')  # a torn last line (a kill while writing)
    with pytest.raises(PromptFileError, match=r"p.jsonl' line 2 is not a UTF-8 JSON value .*a torn or corrupt line"):
        read_prompt_file(str(jsonl))
    jsonl.write_text('{"prompt": "a cat"}\n{"caption": "a dog"}\n')
    with pytest.raises(PromptFileError, match=r"line 2: no field 'prompt' \(its fields: caption\)"):
        read_prompt_file(str(jsonl))
    jsonl.write_text('{"prompt": "a cat"}\n{"prompt": null}\n[1, 2]\n')
    with pytest.raises(PromptFileError, match=r"line 2: field 'prompt' is missing, not a string prompt"):
        read_prompt_file(str(jsonl))
    jsonl.write_text('{"prompt": "a cat"}\n[1, 2]\n')
    with pytest.raises(PromptFileError, match=r"line 2 holds list '\[1, 2\]', not a string or an object"):
        read_prompt_file(str(jsonl))
    jsonl.write_bytes(b'"a cat"\n"caf\xe9"\n')  # not UTF-8: an error, not a skipped line, in a structured file
    with pytest.raises(PromptFileError, match="line 2 is not a UTF-8 JSON value"):
        read_prompt_file(str(jsonl))
    jsonl.write_text("\n \n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        read_prompt_file(str(jsonl))
    js = tmp_path / "p.json"
    js.write_text('["a cat", "a dog"]')
    assert read_prompt_file(str(js)) == (["a cat", "a dog"], 0)
    js.write_text('{"prompts": ["a cat"]}')
    with pytest.raises(PromptFileError, match="holds a JSON dict; a .json prompt file is a list"):
        read_prompt_file(str(js))
    js.write_text('[\n"a cat",\n"a dog"')
    with pytest.raises(PromptFileError, match=r"is not valid JSON \(line 3"):
        read_prompt_file(str(js))
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("prompt,seed\na cat,1\n")
    assert read_prompt_file(str(csv_file)) == (["a cat"], 0)
    csv_file.write_text("seed,prompt\n1,a cat\n2\n")  # a short row: its prompt is missing
    with pytest.raises(PromptFileError, match=r"row 2 \(line 3\): field 'prompt' is missing"):
        read_prompt_file(str(csv_file))
    (tmp_path / "p.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PromptFileError, match="is not a readable parquet file"):
        read_prompt_file(str(tmp_path / "p.parquet"))
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(PromptFileError, match="column 'prompt' holds int64, not strings"):
        read_prompt_file(str(tmp_path / "n.parquet"))


def test_config_prompt_column_and_the_sample_flag(tmp_path):
    """data.prompt_column reaches the training source's reader; the sample command's --prompt_column
    picks the column its images are made for (the toy: its class names, in the 'caption' column;
    the 'prompt' column holds prompts the toy cannot encode, so reading it would be refused)."""
    from dpdmd_jax.run import sample as run_sample
    from dpdmd_jax.sampling.rows import read_rows
    from dpdmd_jax.toy import data as toy_data
    from tests.unit.test_evaluate import _config

    classes = list(toy_data.CLASS_NAMES[:2])
    path = _write(tmp_path / "p", ".csv", [{"prompt": f"a photo of {c}", "caption": c} for c in classes])
    c = _config()
    with c.unlocked():  # data.prompt_column is a base_config field (added there by the lead)
        c.data.prompt_file, c.data.prompt_column = path, "caption"
    assert text_file_prompts(c) == classes
    out = str(tmp_path / "samples")
    run_sample.sample(_config(), out, sampler="teacher", prompt_file=path, prompt_column="caption", seeds=3,
                      per_device_batch=1)
    assert sorted({r["prompt"] for r in read_rows(os.path.join(out, "samples.jsonl")).values()}) == sorted(classes)


def test_prompt_order_is_pure_sliceable_and_covers_each_epoch():
    n, rows, batch = 13, 3, 4  # 12 samples a round: rounds straddle epochs
    order = PromptOrder(n, seed=7, rows_per_round=rows, batch=batch)
    full = np.stack([order.indices(r, slice(0, batch)) for r in range(26)])  # 26 rounds = 24 epochs
    again = PromptOrder(n, seed=7, rows_per_round=rows, batch=batch)
    for r in (0, 5, 25):  # any process, any time: its rows are a slice of the same global batch
        np.testing.assert_array_equal(again.indices(r, slice(1, 3)), full[r][:, 1:3])
    flat = full.reshape(-1)  # sample order i = (r * rows + m) * batch + b
    for e in range(len(flat) // n):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))  # each prompt once per epoch
    other = PromptOrder(n, seed=8, rows_per_round=rows, batch=batch).indices(0, slice(0, batch))
    assert not np.array_equal(other, full[0])
