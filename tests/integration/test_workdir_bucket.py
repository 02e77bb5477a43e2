"""A run's files in a gs:// bucket: a tiny training run, its resume, sampling, evaluation, the
failed-start cleanup, the workdir checks, the metrics log, the DMD comparison and export, with the
workdir a gs:// URI served by a fake bucket. (The static half of the check, that the modules touching a
run's files use `etils.epath` only: tests/unit/test_workdir_paths.py; a local workdir takes the same
calls in every other run test.)

The fake bucket is a backend in epath's own table, so only code that goes through epath reaches it:
open() or os.path on the URI would look for ./gs:/... in the working directory (checked to stay empty)
and miss the files. Like an object store (gcsfs), it refuses to append. Orbax (tensorstore) talks to
GCS itself, so in the bucket runs it is pointed at the folder the bucket keeps its files in; the
TensorBoard events go through epath like every other file of the run.
"""

from __future__ import annotations

import json
import os

import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath

from configs import toy as toy_config
from dpdmd_jax import run_config
from dpdmd_jax.config import ConfigError, override
from dpdmd_jax.distill import anchor
from dpdmd_jax.distill.writers import JsonlWriter
from dpdmd_jax.eval import folder as eval_folder
from dpdmd_jax.run import baseline as run_baseline
from dpdmd_jax.run import preflight
from dpdmd_jax.run import sample as run_sample
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.run import train as run_train
from dpdmd_jax.run import workdir as workdir_lib
from dpdmd_jax.sampling import folder as sampling_folder


# ---------------------------------------------------------------------------- the fake bucket


class FakeBucket(epath_backend.Backend):
    """gs://... kept in a local folder and reachable only through epath's backend table."""

    def __init__(self, store: str):
        self.store, self.os = store, epath_backend.os_backend

    def local(self, uri) -> str:
        uri = os.fspath(uri)
        assert uri.startswith("gs://"), uri
        return os.path.join(self.store, uri[len("gs://"):])

    def uri(self, local) -> str:
        return "gs://" + os.path.relpath(os.fspath(local), self.store)

    def open(self, path, mode):
        if "a" in mode:
            raise NotImplementedError(f"{path}: an object store cannot append to a file (mode {mode!r})")
        if "w" in mode:  # an object store has no folders to create first
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
        return self.os.open(self.local(path), mode)

    def exists(self, path):
        return self.os.exists(self.local(path))

    def isdir(self, path):
        return self.os.isdir(self.local(path))

    def listdir(self, path):
        return self.os.listdir(self.local(path))

    def glob(self, path):
        return [self.uri(p) for p in self.os.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in self.os.walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.uri(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        self.os.makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        self.os.mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        self.os.rmtree(self.local(path))

    def remove(self, path):
        self.os.remove(self.local(path))
        folder = os.path.dirname(self.local(path))  # nor empty folders: "gs://bucket/run/" is gone with its last file
        while folder != self.store and not os.listdir(folder):
            os.rmdir(folder)
            folder = os.path.dirname(folder)

    def rename(self, path, dst):
        self.os.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        self.os.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        self.os.copy(self.local(path), self.local(dst), overwrite=overwrite)

    def stat(self, path):
        return self.os.stat(self.local(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A fake gs:// bucket (its files under tmp_path/store) in a working directory that must stay
    empty: a run's file reached with open() / os.path on a gs:// URI would land there. Orbax, which
    reaches GCS without epath's backend table, uses the bucket's folder."""
    store, cwd = tmp_path / "store", tmp_path / "cwd"
    store.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fake = FakeBucket(str(store))
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else epath sends gs:// to tf.io.gfile
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    manager = workdir_lib.checkpoint_manager
    monkeypatch.setattr(workdir_lib, "checkpoint_manager", lambda workdir, c: manager(_to_store(fake, workdir), c))
    yield fake
    assert os.listdir(cwd) == [], "a run's file was reached as a local path (open() / os.path on the URI)"


def _to_store(fake: FakeBucket | None, path) -> str:
    path = os.fspath(path)
    return fake.local(path) if fake is not None and path.startswith("gs://") else path


def _listing(fake: FakeBucket | None, root: str) -> list[str]:
    """Every file under `root` (local, or in the fake bucket), relative to it, sorted."""
    top = _to_store(fake, root)
    return sorted(os.path.relpath(os.path.join(r, f), top) for r, _, fs in os.walk(top) for f in fs)


# ---------------------------------------------------------------------------- a run's files in a bucket


# The tiny VP backbone at the toy's 16 x 16 (its metrics' size), K chosen automatically (its record),
# and the toy metrics at the end (sample folders in the workdir, their evaluation, summary.json).
TINY = {"backbone": "tiny_vp", "distill.target": "denoise", "num_rounds": 2, "checkpoint_every": 1,
        "data.latent_size": (16, 16), "distill.anchor_k": "auto", "distill.auto_anchor.prompts": 2,
        "distill.auto_anchor.seeds": 2,
        "evals": {"toy": {"type": "toy_metrics", "every": 0, "seeds_per_prompt": 2, "repeats": 1}}}


def test_a_run_its_samples_and_their_evaluation_in_a_bucket(bucket):
    """(A local workdir takes the same calls: every other run test has one.)"""
    fake, root = bucket, "gs://bucket"
    workdir = f"{root}/run"
    c = override(toy_config.get_config("smoke"), TINY)
    assert preflight.run_problems(c, workdir) == []
    summary = run_train.train(c, workdir)

    files = _listing(fake, workdir)
    assert {"config.json", "anchor_auto.json", "metrics.jsonl", "summary.json", "teacher_metrics.json",
            "eval/teacher/run.json", "eval/student_2/samples.jsonl", "eval/student_2/eval.json"} <= set(files)
    assert any(f.startswith("checkpoints/2/") for f in files)
    assert any(f.startswith("tb/events.out.tfevents.") for f in files)  # TensorBoard's events, through epath too
    assert workdir_lib.checkpoint_steps(workdir) == [1, 2]
    # config.json round trip: the recorded config is the run's, with the K it chose, read back as a config.
    k = anchor.recorded_k(workdir)
    assert k is not None and json.loads(_read(fake, f"{workdir}/anchor_auto.json"))["chosen_k"] == k
    recorded = run_config.get_config(workdir)
    assert recorded.distill.auto_anchor.chosen_k == k and recorded.backbone == "tiny_vp"
    workdir_lib.check_workdir_config(workdir, recorded, write=False)  # a reader accepts it as the run's
    argv = run_config.with_recorded_config(["sample", f"--workdir={workdir}"])
    assert argv[1].endswith(f"run_config.py:{workdir}")  # a gs:// workdir is passed on as it is
    assert [json.loads(line)["step"] for line in _read(fake, f"{workdir}/metrics.jsonl").splitlines()] == [1, 2]
    assert json.loads(_read(fake, f"{workdir}/summary.json")) == summary and summary["rounds"] == 2
    assert f"{workdir}/summary.json" in run_train.end_of_run_message(c, workdir, summary)

    # A resume to round 3 keeps the log of rounds 1..2 and adds round 3 (a file rewritten whole).
    run_train.train(override(toy_config.get_config("smoke"), {**TINY, "num_rounds": 3, "evals": {}}), workdir)
    assert [json.loads(line)["step"] for line in _read(fake, f"{workdir}/metrics.jsonl").splitlines()] == [1, 2, 3]

    # The sample command into the workdir, then a rerun that remakes a cut PNG and a torn row.
    out = f"{workdir}/samples"
    done = run_sample.sample(recorded, out, workdir=workdir, num_prompts=2, seeds=2)
    assert done["rows"] == 4 and not done["preempted"] and done["source"] == f"{workdir}/checkpoints/3"
    png = f"{out}/images/p00001_s001.png"
    whole = _read(fake, png, "rb")
    _write(fake, png, whole[:-20], "wb")
    _write(fake, f"{out}/samples.jsonl", _read(fake, f"{out}/samples.jsonl") + '{"file": "p0', "w")
    again = run_sample.sample(recorded, out, workdir=workdir, num_prompts=2, seeds=2)
    assert again["made"] == 1 and again["rows"] == 4
    assert _read(fake, png, "rb") == whole and sampling_folder.readable_png(png)
    assert _listing(fake, f"{out}/corrupt") == ["p00001_s001.png"]
    assert _listing(fake, f"{out}/grids") == ["p00000.png", "p00001.png"]

    result = eval_folder.evaluate([out, f"{workdir}/eval/student_2"], names=["sampled", "in_run"],
                                  out=f"{workdir}/compare")
    assert result["sampled"]["images"] == 4 and result["in_run"]["images"] == 12
    assert json.loads(_read(fake, f"{out}/eval.json"))["images"] == 4
    assert _listing(fake, f"{workdir}/compare") == ["comparison.json", "comparison.md"]


def _read(fake: FakeBucket | None, path: str, mode: str = "r"):
    with open(_to_store(fake, path), mode) as f:  # the test reads behind the store's back: what is really there
        return f.read()


def _write(fake: FakeBucket | None, path: str, data, mode: str) -> None:
    os.makedirs(os.path.dirname(_to_store(fake, path)), exist_ok=True)
    with open(_to_store(fake, path), mode) as f:
        f.write(data)


def test_a_failed_start_leaves_a_bucket_as_it_was(bucket, monkeypatch, capsys):
    def fail(*a, **k):
        raise RuntimeError("out of memory while compiling")

    monkeypatch.setattr(setup_lib, "init_train_state", fail)
    c = override(toy_config.get_config("smoke"), {"num_rounds": 2, "distill.anchor_k": "auto",
                                                   "distill.auto_anchor.prompts": 2, "distill.auto_anchor.seeds": 2})
    with pytest.raises(RuntimeError, match="out of memory"):
        run_train.train(c, "gs://bucket/fresh")
    assert "recorded in gs://bucket/fresh/config.json" in capsys.readouterr().out  # K was chosen and written
    assert _listing(bucket, "gs://bucket") == []  # the folder this start created is gone

    _write(bucket, "gs://bucket/existing/notes.txt", "mine", "w")
    with pytest.raises(RuntimeError, match="out of memory"):
        run_train.train(c, "gs://bucket/existing")
    assert "recorded in gs://bucket/existing/config.json" in capsys.readouterr().out
    # config.json and the anchor's record went, the user's file stayed.
    assert _listing(bucket, "gs://bucket") == ["existing/notes.txt"]
    assert os.listdir(bucket.local("gs://bucket/existing")) == ["notes.txt"]  # no empty checkpoints/ left
    # A corrected command (another config) is not refused as "a different config".
    assert preflight.run_problems(override(c, {"distill.lambda_div": 0.5}), "gs://bucket/existing") == []


def test_the_workdir_checks_and_the_config_record_in_a_bucket(bucket):
    assert run_config.absolute("gs://bucket/run") == "gs://bucket/run"  # os.path.abspath: ./gs:/bucket/run
    assert workdir_lib.absolute("gs://bucket/run") == "gs://bucket/run"
    assert preflight.workdir_problems("gs://bucket/run") == []  # a probe object, written and removed
    assert _listing(bucket, "gs://bucket") == []
    _write(bucket, "gs://bucket/afile", "", "w")
    assert preflight.workdir_problems("gs://bucket/afile") == [
        "--workdir=gs://bucket/afile exists and is a file, not a folder: choose another --workdir."]

    with pytest.raises(run_config.RecordError, match="gs://bucket/run holds no config.json"):
        run_config.read_record("gs://bucket/run")
    assert run_config.with_recorded_config(["main", "--workdir=gs://bucket/run"]) == ["main", "--workdir=gs://bucket/run"]
    c = toy_config.get_config("smoke")
    workdir_lib.check_workdir_config("gs://bucket/run", c)
    assert _listing(bucket, "gs://bucket/run") == ["config.json"]  # written through a temporary name, replaced
    assert json.loads(_read(bucket, "gs://bucket/run/config.json")) == json.loads(c.to_json_best_effort())
    with pytest.raises(ConfigError, match="holds a run with a different config"):
        workdir_lib.check_workdir_config("gs://bucket/run", override(toy_config.get_config("smoke"),
                                                                     {"distill.lambda_div": 0.5}))
    anchor.record("gs://bucket/run", 3, {"carried": [0.1, 0.9, 1.0]})
    assert anchor.recorded_k("gs://bucket/run") == 3
    assert run_config.get_config("gs://bucket/run").distill.auto_anchor.chosen_k == 3
    workdir_lib.check_workdir_config("gs://bucket/run", c)  # a resume's rewrite keeps the K the run recorded
    assert anchor.recorded_k("gs://bucket/run") == 3
    assert _listing(bucket, "gs://bucket/run") == ["anchor_auto.json", "config.json"]
    assert workdir_lib.checkpoint_steps("gs://bucket/run") == []
    with pytest.raises(sampling_folder.SampleError, match="holds no checkpoints/ folder"):
        run_sample.load_student(None, "gs://bucket/run", None)


def test_the_metrics_log_is_written_whole_and_cut_back_on_resume(bucket):
    path = "gs://bucket/run/metrics.jsonl"
    bucket.makedirs("gs://bucket/run", exist_ok=True)
    w = JsonlWriter(path, resume_step=0, exclude=("rounds_per_sec",))
    for step in (1, 2, 3):
        w.write_scalars(step, {"loss": step / 2, "rounds_per_sec": 9.0})
    rows = [json.loads(line) for line in _read(bucket, path).splitlines()]
    assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 1.5}]
    JsonlWriter(path, resume_step=2).write_scalars(3, {"loss": 7.0})  # resumed from the checkpoint of round 2
    assert [json.loads(line) for line in _read(bucket, path).splitlines()] == [*rows[:2], {"step": 3, "loss": 7.0}]
    assert _listing(bucket, "gs://bucket/run") == ["metrics.jsonl"]  # no temporary file left


def test_tensorboard_reads_the_events_we_write(bucket):
    """The scalars and images a run logs, read back by TensorBoard's own event reader as it reads
    `tf.summary`'s (images: [width, height, png...] string tensors; scalars: float tensors)."""
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    from dpdmd_jax.distill.writers import TensorBoardWriter

    grid = np.random.default_rng(0).integers(0, 256, (1, 6, 10, 3)).astype(np.uint8)
    w = TensorBoardWriter("gs://bucket/run/tb")
    w.write_scalars(1, {"loss": 0.5, "loss_div": 2.0})
    w.write_scalars(2, {"loss": 0.25, "loss_div": 1.0})
    w.write_images(2, {"student_samples": grid.astype(np.float32) / 255.0})  # [0, 1] floats, as evaluators pass
    w.close()
    [events] = _listing(bucket, "gs://bucket/run/tb")
    acc = event_accumulator.EventAccumulator(_to_store(bucket, f"gs://bucket/run/tb/{events}"),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["tensors"]) == {"loss", "loss_div", "student_samples"}
    scalars = {t: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(t)]
               for t in ("loss", "loss_div")}
    assert scalars == {"loss": [(1, 0.5), (2, 0.25)], "loss_div": [(1, 2.0), (2, 1.0)]}
    [image] = acc.Tensors("student_samples")
    width, height, png = tensor_util.make_ndarray(image.tensor_proto)
    assert image.step == 2 and (int(width), int(height)) == (10, 6)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), grid[0])


def test_the_dmd_comparison_files_in_a_bucket(bucket, monkeypatch):
    c = override(toy_config.get_config("smoke"), {"compare_with_dmd": True, "distill.anchor_k": "auto"})
    row = {"nfe": 4.0, "diversity_layout": 0.2}
    runs = []

    def train(config, workdir):  # the two trainings themselves: tested above
        runs.append((config.distill.lambda_div, workdir))
        if config.distill.lambda_div:
            _write(bucket, f"{workdir}/teacher_metrics.json", '{"nfe": 30.0}', "w")
            workdir_lib.check_workdir_config(workdir, config)
            anchor.record(workdir, 4, {})
        return {"rounds": 4, "teacher": {"nfe": 30.0, "diversity_layout": 0.3}, "student": row}

    monkeypatch.setattr(run_baseline, "train", train)
    summary = run_baseline.train_with_baseline(c, "gs://bucket/run")
    assert runs == [(c.distill.lambda_div, "gs://bucket/run"), (0.0, "gs://bucket/run/dmd_baseline")]
    assert _read(bucket, "gs://bucket/run/dmd_baseline/teacher_metrics.json") == '{"nfe": 30.0}'
    assert "DP-DMD (K = 4, auto)" in _read(bucket, "gs://bucket/run/comparison.md")
    assert json.loads(_read(bucket, "gs://bucket/run/summary.json")) == summary and summary["dmd_baseline"] == row


def test_export_refuses_a_uri_out_before_anything_is_loaded(bucket, monkeypatch):
    from dpdmd_jax.run import export as run_export
    from dpdmd_jax.weights.export import ExportError

    monkeypatch.setattr(setup_lib, "build", lambda *a, **k: pytest.fail("built before --out was checked"))
    c = toy_config.get_config("smoke")
    workdir_lib.check_workdir_config("gs://bucket/run", c)
    with pytest.raises(ExportError, match="--out=gs://bucket/export: export writes a local folder"):
        run_export.export_student(c, "gs://bucket/run", "gs://bucket/export")
