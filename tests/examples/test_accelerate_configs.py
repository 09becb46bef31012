"""examples/accelerate_configs: accelerate's own loader reads them, and ddp_cpu.yaml really starts 2 gloo ranks.

On accelerate 1.16 a ``distributed_type: MULTI_CPU`` config (or ``--cpu``)
starts one process; docs/distributed.md promised two. The launch test runs
the documented command on a tiny script, as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
yaml = pytest.importorskip("yaml")

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "accelerate_configs"

SCRIPT = """
import json, os, sys
import torch
from accelerate import Accelerator

accelerator = Accelerator()
total = accelerator.reduce(torch.tensor([float(accelerator.process_index + 1)]), "sum")
backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
record = {"rank": os.environ.get("RANK"), "world_size": os.environ.get("WORLD_SIZE"),
          "distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
          "process_index": accelerator.process_index, "backend": backend, "sum": total.item()}
out = os.path.join(sys.argv[1], f"rank{accelerator.process_index}-{os.getpid()}.json")
with open(out, "w") as fh:
    json.dump(record, fh)
# leave the process group before exiting: a gloo group still alive at interpreter shutdown can abort a rank
# ("terminate called without an active exception"), seen once in CI on a loaded machine
accelerator.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("name", ["ddp.yaml", "ddp_cpu.yaml", "fsdp2.yaml"])
def test_config_loads_with_accelerates_loader_as_two_processes(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert config.num_processes == 2 and config.num_machines == 1


def test_ddp_cpu_config_selects_the_multi_process_launcher():
    """MULTI_CPU (or --cpu) sends `accelerate launch` to its one-process launcher; MULTI_GPU to torchrun."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(CONFIGS / "ddp_cpu.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.mixed_precision == "no"  # bf16 autocast is a GPU setting
    header = (CONFIGS / "ddp_cpu.yaml").read_text().split("compute_environment")[0]
    assert "ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate_configs/ddp_cpu.yaml" in header


@pytest.mark.distributed
def test_ddp_cpu_config_starts_two_gloo_ranks(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp_cpu.yaml"),
        "--main_process_port", "0", str(script), str(out),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    records = sorted((json.loads(p.read_text()) for p in out.glob("*.json")), key=lambda r: r["process_index"])
    assert [r["rank"] for r in records] == ["0", "1"], (records, stderr[-2000:])
    for record in records:
        assert record["world_size"] == "2" and record["num_processes"] == 2
        assert record["distributed_type"] == "DistributedType.MULTI_CPU" and record["backend"] == "gloo"
        assert record["sum"] == 3.0  # an all-reduce across both ranks really ran
