"""`dpdmd_jax.run_config`: a run's recorded config.json read back as the config it was (tuples,
FieldReferences, the K an "auto" run chose), made the default `--config` of a command given
`--workdir`, with `--config.*` overrides on top that parse as they would on the config file."""

from __future__ import annotations

import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

from configs import sd35 as sd35_config
from configs import toy as toy_config
from dpdmd_jax import run_config
from dpdmd_jax.config import ConfigError
from dpdmd_jax.run import workdir as workdir_lib


def _record(workdir, c, **recorded) -> dict:
    """What the trainer writes into `workdir` for config `c` (and values the run records itself)."""
    workdir_lib.check_workdir_config(str(workdir), c)
    path = os.path.join(workdir, "config.json")
    saved = json.load(open(path))
    if recorded:  # as anchor.record writes the K it chose
        saved["distill"]["auto_anchor"].update(recorded)
        json.dump(saved, open(path, "w"))
    return saved


@pytest.mark.parametrize("name", ["toy", "toy:smoke", "sd35:tiny"])
def test_the_record_reads_back_as_the_config_it_was(name, tmp_path):
    module, _, variant = name.partition(":")
    c = {"toy": toy_config, "sd35": sd35_config}[module].get_config(variant or None)
    saved = _record(tmp_path, c, **({"chosen_k": 7} if name == "toy" else {}))
    back = run_config.get_config(str(tmp_path))
    assert json.loads(back.to_json_best_effort()) == saved
    assert back.data.latent_size == tuple(c.data.latent_size) and back.mesh.rules == c.mesh.rules  # tuples
    assert back.student.sigmas == c.student.sigmas and back.distill.anchor_k == c.distill.anchor_k
    if name == "toy":  # anchor_k="auto": the K the run chose is part of its config
        assert back.distill.anchor_k == "auto" and back.distill.auto_anchor.chosen_k == 7
    if name == "toy:smoke":  # a field base_config lacks (the random model's architecture)
        assert back.model.arch.dual_attention_layers == (0,)
    workdir_lib.check_workdir_config(str(tmp_path), back, write=False)  # the reader accepts it as the run's


def _parse(argv: list[str]):
    """`argv` through a fresh flag set as `sample`'s __main__ parses it: the record made the default."""
    argv = run_config.with_recorded_config(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(argv)
    return fv.config


def test_workdir_makes_the_record_the_default_config_and_overrides_apply_on_top(tmp_path):
    workdir = str(tmp_path / "run")
    _record(workdir, toy_config.get_config("smoke"))
    c = _parse(["sample", f"--workdir={workdir}"])
    assert c.model.source == "random" and c.distill.anchor_k == 2 and c.data.latent_size == (8, 8)
    # Overrides parse by the fields' types, as on the config file: FieldReferences (int | "auto", None | bool), tuples.
    c = _parse(["sample", "--workdir", workdir, "--config.distill.anchor_k=auto", "--config.mesh.fsdp=2",
                "--config.distill.stop_grad_first_step=True", "--config.data.latent_size=(4, 4)"])
    assert c.distill.anchor_k == "auto" and c.distill.stop_grad_first_step is True
    assert c.data.latent_size == (4, 4) and c.mesh.fsdp == 2
    # A layout knob may differ from the run's; a field that says what the checkpoint means may not.
    layout = _parse(["s", f"--workdir={workdir}", "--config.mesh.fsdp=2"])
    workdir_lib.check_workdir_config(workdir, layout, write=False)
    with pytest.raises(ConfigError, match=r"different config \(distill.anchor_k: 2 -> 3\).*drop --config"):
        workdir_lib.check_workdir_config(workdir, _parse(["s", f"--workdir={workdir}", "--config.distill.anchor_k=3"]),
                                     write=False)
    # --config=FILE is used as before; without --workdir, or with one that holds no run, nothing is added.
    assert _parse(["s", "--config=configs/toy.py", f"--workdir={workdir}"]).model.source == "toy"
    for argv in (["s", "--config.distill.anchor_k=3"], ["s", f"--workdir={tmp_path}"],
                 ["s", "--", f"--workdir={workdir}"]):
        assert run_config.with_recorded_config(argv) == argv


def test_an_unreadable_record_is_one_clear_error(tmp_path):
    with pytest.raises(run_config.RecordError, match="holds no config.json: is it a training run's workdir"):
        run_config.read_record(str(tmp_path))
    (tmp_path / "config.json").write_text('{"seed": 0, "model": {')  # cut short
    with pytest.raises(run_config.RecordError, match="cannot be read"):
        run_config.with_recorded_config(["s", f"--workdir={tmp_path}"])


def test_a_record_from_before_a_field_existed_resumes_with_its_default(tmp_path):
    """A run recorded before `gan` / `regression` / `data.prompt_column` existed ran with what are now
    their defaults: it resumes and samples; a field it does record still has to match."""
    c = toy_config.get_config("smoke")
    saved = _record(tmp_path, c)
    for section in ("gan", "regression"):
        del saved[section]
    del saved["data"]["prompt_column"]
    json.dump(saved, open(tmp_path / "config.json", "w"))
    workdir_lib.check_workdir_config(str(tmp_path), c, write=False)
    assert run_config.get_config(str(tmp_path)).gan.weight == 0.0  # read over base_config()
    workdir_lib.check_workdir_config(str(tmp_path), c)  # resumes, and records the fields from now on
    assert json.load(open(tmp_path / "config.json"))["gan"]["weight"] == 0.0
    changed = toy_config.get_config("smoke,gan")
    with pytest.raises(ConfigError, match=r"different config \(gan.weight: 0.0 -> 0.005"):
        workdir_lib.check_workdir_config(str(tmp_path), changed, write=False)
