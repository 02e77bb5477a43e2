"""The shipped full-size configs' execution settings: `configs/sd35.py` and `configs/sdxl.py` scan
their layers and rematerialise, and `:tiny` keeps both (so every end-to-end test of `:tiny` runs
them); `:tiny,bf16` computes in the full configs' dtypes. (The rounds themselves, plain vs shipped
and under every remat policy: tests/integration/test_real_configs.py.)"""

from __future__ import annotations

from configs import sd35 as sd35_config
from configs import sdxl as sdxl_config

CONFIGS = {"sd3": sd35_config, "sdxl": sdxl_config}


def test_tiny_keeps_the_real_configs_execution_settings():
    for module in CONFIGS.values():
        tiny, full = module.get_config("tiny"), module.get_config()
        for key in ("scan_layers", "remat_policy", "attention_impl"):
            assert tiny.model[key] == full.model[key], key
        assert tiny.model.scan_layers and tiny.model.remat_policy != "none"
        bf16 = module.get_config("tiny,bf16")
        assert (bf16.model.dtype, bf16.text.dtype) == (full.model.dtype, full.text.dtype) == ("bfloat16",) * 2
