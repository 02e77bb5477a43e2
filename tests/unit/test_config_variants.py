"""Typed config variants (`:k=10,shift=0.375,family=unet`, big_vision's parse_arg style) and the short
spellings they replace (`:k10`, `:shift3`, `:unet`), which stay as aliases."""

import importlib.util
import pathlib

import pytest

from dpdmd_jax.config import parse_arg

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_arg_reads_typed_values_switches_and_aliases():
    assert parse_arg("k=10,shift=0.375,family=unet") == [("k", "10"), ("shift", "0.375"), ("family", "unet")]
    assert parse_arg("k10,shift3,dmd") == [("k", "10"), ("shift", "3"), ("dmd", "True")]
    assert parse_arg("unet,wide", families=("unet",)) == [("family", "unet"), ("wide", "True")]
    assert parse_arg(None) == [] and parse_arg("") == []


@pytest.mark.parametrize("short, typed", [("k10,shift3", "k=10,shift=3"), ("unet", "family=unet"),
                                          ("shift0.375,auto", "shift=0.375,k=auto"), ("k5,dmd", "dmd,k=5")])
def test_toy_aliases_give_the_typed_variants_config(short, typed):
    toy = load("toy")
    assert toy.get_config(short).to_json() == toy.get_config(typed).to_json()


def test_pipeline_configs_take_typed_values_and_refuse_unknown_ones():
    sd35 = load("sd35")
    assert sd35.get_config("tiny,k=3").distill.anchor_k == 3
    assert sd35.get_config("shift=1.5").teacher.shift == 1.5
    with pytest.raises(ValueError, match="unknown sd35 config variant 'nope'"):
        sd35.get_config("nope")
    with pytest.raises(ValueError, match="is a switch"):
        load("sdxl").get_config("dmd=0")


@pytest.mark.parametrize("name", ["sd35", "sdxl"])
def test_lora_variant_sets_both_roles_rank_and_a_bf16_base_under_bf16_compute(name):
    cfg = load(name)
    c, c16 = cfg.get_config("lora"), cfg.get_config("lora=16")
    assert (c.student.lora.rank, c.fake.lora.rank, c.model.teacher_dtype) == (64, 64, "bfloat16")
    assert (c16.student.lora.rank, c16.fake.lora.rank) == (16, 16)
    assert cfg.get_config().student.lora.rank == 0 and cfg.get_config().model.teacher_dtype == ""
    toy = load("toy").get_config("lora=8")  # fp32 compute: the base stays in its loaded dtype
    assert (toy.student.lora.rank, toy.model.teacher_dtype) == (8, "")
