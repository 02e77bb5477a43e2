"""DiffusionDB prompts as a TFDS dataset (TFDS ships no DiffusionDB builder).

DiffusionDB (CC0) keeps its prompts in `metadata.parquet` (column `prompt`, one row per image,
so most prompts repeat). The hub is not always reachable, so the builder reads a local copy from
TFDS's manual dir: `metadata.parquet` (or several `*.parquet` parts), or a `prompts.txt` dump with
one prompt per line. It keeps each distinct non-empty prompt once (in the fixed order into which
TFDS shuffles records by key) and writes array_record, which `tfds.data_source` reads by index
without TensorFlow.

Build once (or let the training run build it on first use from `data.manual_dir`):

  python -m dpdmd_jax.data.diffusiondb --manual_dir=/data/diffusiondb --data_dir=/data/tfds
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import tensorflow_datasets as tfds

NAME = "diffusion_db_prompts"


class DiffusionDbPrompts(tfds.core.GeneratorBasedBuilder):
    """Distinct DiffusionDB prompts, one record each: {"prompt": text}."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Distinct non-empty prompts of metadata.parquet."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put DiffusionDB's metadata.parquet (https://huggingface.co/datasets/poloclub/diffusiondb, "
        "or its parts *.parquet) or a prompts.txt with one prompt per line in the manual dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"prompt": tfds.features.Text()}),
            homepage="https://poloclub.github.io/diffusiondb/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

    def _generate_examples(self, manual_dir: str) -> Iterator[tuple[int, dict]]:
        seen: set[str] = set()
        for prompt in _raw_prompts(manual_dir):
            prompt = prompt.strip()
            if prompt and prompt not in seen:
                seen.add(prompt)
                yield len(seen) - 1, {"prompt": prompt}


def _raw_prompts(manual_dir: str) -> Iterator[str]:
    parquets = sorted(glob.glob(os.path.join(manual_dir, "*.parquet")))
    text = os.path.join(manual_dir, "prompts.txt")
    if parquets:
        import pyarrow.parquet as pq

        for path in parquets:
            table = pq.read_table(path, columns=["prompt"])
            yield from (p for p in table.column("prompt").to_pylist() if p is not None)
    elif os.path.isfile(text):
        with open(text, encoding="utf-8", errors="replace") as f:
            yield from f
    else:
        raise FileNotFoundError(f"{manual_dir}: no *.parquet and no prompts.txt; "
                                f"{DiffusionDbPrompts.MANUAL_DOWNLOAD_INSTRUCTIONS}")


def builder(data_dir: str) -> DiffusionDbPrompts:
    return DiffusionDbPrompts(data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD)


def prepare(data_dir: str, manual_dir: str) -> DiffusionDbPrompts:
    """Builds the dataset under `data_dir` from `manual_dir` (no-op when already built)."""
    b = builder(data_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return b


def is_prepared(data_dir: str) -> bool:
    return builder(data_dir).is_prepared()


class Prompts:
    """Random access to the prompts (a `Sequence[str]`), each host reading only what it indexes."""

    def __init__(self, data_dir: str):
        self.source = builder(data_dir).as_data_source(split="train")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> str:
        prompt = self.source[int(i)]["prompt"]
        return prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def main(argv):
    del argv
    b = prepare(FLAGS.data_dir, FLAGS.manual_dir)
    print(f"{NAME}: {b.info.splits['train'].num_examples} prompts in {b.data_dir}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("manual_dir", None, "Folder with DiffusionDB's metadata.parquet or a prompts.txt.")
    flags.DEFINE_string("data_dir", None, "TFDS data dir to build into.")
    flags.mark_flags_as_required(["manual_dir", "data_dir"])
    FLAGS = flags.FLAGS
    app.run(main)
