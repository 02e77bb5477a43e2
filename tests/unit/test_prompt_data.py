"""Prompt files and the prompt order: UTF-8 lines (bad ones skipped and counted), and an order that
is a pure function of (seed, round) in which each host's rows are a slice of the global batch and
every epoch reads each prompt exactly once. (Truncated prompts named with what each encoder dropped,
through the transformers tokenizers, and `embedding_cache --help`: tests/integration/
test_prompt_text.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from dpdmd_jax.data.prompts import PromptFileError, PromptOrder, read_prompt_file


def test_prompt_file_skips_blank_and_non_utf8_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\n\n  \ncaf\xe9 au lait\n  a dog  \n\xff\xfe\n")
    assert read_prompt_file(str(path)) == (["a cat", "a dog"], 2)
    path.write_bytes(b"\n \n\xff\n")
    with pytest.raises(PromptFileError, match=r"holds no prompts \(1 non-UTF-8 lines skipped\)"):
        read_prompt_file(str(path))
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompt_file(str(tmp_path / "missing.txt"))


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
