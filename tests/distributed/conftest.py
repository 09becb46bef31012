"""Launch ``tests/distributed/_worker.py`` once per session on two gloo processes and share its results.

The launch is bounded (``LAUNCH_TIMEOUT``), uses a free port, and every
worker destroys its process group before exiting (``_worker.main``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
LAUNCH_TIMEOUT = (
    480  # seconds, for every scenario together (about 90 s on 2 idle cores, 210 s on 2 busy ones)
)
SCENARIOS = (
    "ddp",
    "ddp_explicit",
    "ddp_skewed_synced",
    "ddp_skewed_unsynced",
    "independent_ranks",
    "ddp_layerwise",
    "trainer_ddp",
    "trainer_ddp_no_callback",
    "fsdp2_std",
    "fsdp2_reverse_std",
    "fsdp2_randomized",
    "fsdp2_online_pca",
    "fsdp2_full",
    "fsdp2_int8",
    "fsdp2_fallback",
    "fsdp2_lazy_rotate",
    "fsdp2_nonfinite_std",
    "fsdp2_nonfinite_reverse_std",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    out_dir: Path, scenarios: tuple[str, ...] = SCENARIOS
) -> dict[str, list[dict]]:
    """Run the scenarios under torchrun; return ``{scenario: [rank0 result, rank1 result]}``."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TORCHELASTIC_ERROR_FILE": str(out_dir / "error.json"),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "tests.distributed._worker",
        str(out_dir),
        *scenarios,
    ]
    # A session of its own, so a hung launch is killed with all its workers.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: kill the whole tree
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        stderr = f"timed out after {LAUNCH_TIMEOUT} s\n{stderr}"
    results = {}
    for name in scenarios:
        files = [out_dir / f"{name}.rank{rank}.json" for rank in range(WORLD)]
        if not all(f.exists() for f in files):
            raise AssertionError(
                f"scenario {name!r} wrote no result (rc={proc.returncode}):\n{stderr[-4000:]}"
            )
        results[name] = [json.loads(f.read_text()) for f in files]
    return results


@pytest.fixture(scope="session")
def two_process_results(tmp_path_factory) -> dict[str, list[dict]]:
    return launch(tmp_path_factory.mktemp("distributed"))


@pytest.fixture
def scenario(two_process_results):
    def get(name: str) -> list[dict]:
        ranks = two_process_results[name]
        for rank, result in enumerate(ranks):
            assert "error" not in result, (
                f"rank {rank} of {name!r} failed:\n{result['error']}"
            )
        return ranks

    return get
