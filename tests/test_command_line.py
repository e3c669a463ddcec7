"""command_line: the checks made before hours of work (N:M against SparseGPT's blocks, the calibration's memory)."""

from pathlib import Path

import pytest
import torch

import command_line
import models
from checkpoint import UsageError
from opt_model import OPTConfig


def test_nm_that_straddles_sparsegpt_blocks_is_refused():
    config = OPTConfig(hidden_size=96, ffn_dim=192, num_attention_heads=4)  # 3 divides d_in, not the block of 128
    command_line.check_nm_fits((1, 3), models.empty_model(config), sparsegpt=False)
    with pytest.raises(UsageError, match="blocks of 128 columns"):
        command_line.check_nm_fits((1, 3), models.empty_model(config), sparsegpt=True)


def test_calibration_memory_is_checked_with_the_figure():
    # 2 copies x 100000 windows x 2048 tokens x 768 x 2 bytes: OPT-125M in float16, 586 GiB
    with pytest.raises(UsageError, match=r"--nsamples 100000 cannot fit: .* = 585\.9 GiB .* cuda:0 has 80\.0 GiB "
                                         r"available: at most --nsamples 13653"):
        command_line.check_calibration_memory(100000, 2048, 768, torch.float16, 80 * 2**30, "cuda:0")
    command_line.check_calibration_memory(13653, 2048, 768, torch.float16, 80 * 2**30, "cuda:0")
    command_line.check_calibration_memory(10**9, 2048, 768, torch.float16, None, "mps")  # unknown: not checked
    if Path("/proc/meminfo").is_file():
        assert command_line.available_memory(torch.device("cpu")) > 0


def test_routing_and_prefix_have_one_spelling_and_a_quiet_alias():
    """--mumoe-routing / --mumoe-prefix on every command; generate.py's old --routing / --prefix still read the same."""
    for many in (True, False):
        p = command_line.ArgumentParser(prog="x")
        command_line.add_mumoe_routing(p, "which activations route", many=many)
        command_line.add_mumoe_prefix(p, "route on the first P tokens")
        linear = ["linear"] if many else "linear"
        assert vars(p.parse_args([])) == {"mumoe_routing": ["block"] if many else "block", "mumoe_prefix": None}
        assert vars(p.parse_args(["--mumoe-routing", "linear", "--mumoe-prefix", "3"])) == \
            vars(p.parse_args(["--routing", "linear", "--prefix", "3"])) == {"mumoe_routing": linear, "mumoe_prefix": 3}
        shown = p.format_help()
        assert "--mumoe-routing" in shown and "--mumoe-prefix" in shown
        assert "--routing" not in shown.replace("--mumoe-routing", "") and "--prefix" not in shown.replace(
            "--mumoe-prefix", ""), f"the aliases should be quiet:\n{shown}"


def test_one_default_dtype():
    assert command_line.default_dtype(None, torch.device("cpu")) == torch.float32
    assert command_line.default_dtype(None, torch.device("cuda", 0)) == torch.float16
    assert command_line.default_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
