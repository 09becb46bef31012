"""Every fenced Python block of README.md and docs/*.md runs as written on CPU (tests/doc_blocks.py: markers).

Each run is a subprocess in its own empty folder, one torch thread, the
hub offline, with this checkout first on ``sys.path``; two run at a time. A
newcomer who copies a block into a file and runs it gets what this test
gets.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.doc_blocks import ROOT, Block, Run, doc_pages, extract, plan_runs

BLOCKS: list[Block] = [block for page in doc_pages() for block in extract(page)]
RUNS: dict[str, Run] = plan_runs(BLOCKS)
TIMEOUT_S = 300
MAX_SKIPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def execute(run: Run, folder: Path) -> subprocess.CompletedProcess:
    """Run ``run``'s script in ``folder``: ``python block.py``, or under torchrun for a distributed block."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "block.py").write_text(run.script, encoding="utf-8")
    cmd = [sys.executable, "block.py"]
    if run.processes:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={run.processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "block.py"]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[timed out after {TIMEOUT_S} s]"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """The runs of the selected tests, started together, two at a time; ``{run's last block id: Future}``."""
    mine = [
        item for item in request.session.items if item.module is sys.modules[__name__] and hasattr(item, "callspec")
    ]
    selected = {item.callspec.params["block_id"] for item in mine if "block_id" in item.callspec.params} or set(RUNS)
    todo: dict[str, Run] = {}
    for block_id in selected:
        run = RUNS[block_id]
        if run.last.skip_reason is None:
            todo.setdefault(run.last.id, run)
    root = tmp_path_factory.mktemp("docs")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures: dict[str, Future] = {
            key: pool.submit(execute, run, root / key.replace("/", "_").replace(":", "_"))
            for key, run in sorted(todo.items(), key=lambda kv: -bool(kv[1].processes))  # distributed first
        }
        yield futures
        for future in futures.values():
            future.cancel()


@pytest.mark.slow
@pytest.mark.parametrize("block_id", list(RUNS))
def test_doc_block_runs_as_written(block_id, results):
    run = RUNS[block_id]
    if run.last.skip_reason:
        pytest.skip(run.last.skip_reason)
    done = results[run.last.id].result()
    where = " + ".join(b.id for b in run.blocks)
    tail = done.stderr.strip()[-3000:]
    if run.last.error:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        assert done.returncode != 0, f"{where} should end with {run.last.error} but succeeded"
        assert re.match(rf"^([\w.]+\.)?{run.last.error}\b", last), f"{where}: expected {run.last.error}, got:\n{tail}"
    else:
        assert done.returncode == 0, f"{where} failed:\n{tail}"


def test_markers_are_few_and_skips_say_why():
    skips = [b for b in BLOCKS if b.skip_reason is not None]
    assert len(skips) <= MAX_SKIPS, [b.id for b in skips]
    assert all(len(b.skip_reason.strip()) >= 10 for b in skips)
    assert len(BLOCKS) >= 15  # the extraction finds the pages' blocks (18 when written)


def test_extraction_reads_markers_and_chains_continued_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- docs-test: continues -->\n```python\nprint(x)\n```\n\n"
        "<!-- docs-test: skip (needs a GPU: CUDA kernels) -->\n```python\nimport cuda_only\n```\n\n"
        "<!-- docs-test: raises KeyError -->\n```python\n{}['k']\n```\n\n```bash\nnot python\n```\n"
    )
    blocks = extract(page)
    assert [(b.line, b.marker) for b in blocks] == [
        (3, None), (8, "continues"), (13, "skip (needs a GPU: CUDA kernels)"), (18, "raises KeyError")
    ]  # fmt: skip
    runs = plan_runs(blocks)
    assert runs[blocks[0].id] is runs[blocks[1].id] and runs[blocks[1].id].script == "x = 1\n\nprint(x)\n"
    assert blocks[2].skip_reason == "needs a GPU: CUDA kernels" and blocks[3].error == "KeyError"
    page.write_text("<!-- docs-test: skipp (typo) -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="unknown docs-test marker 'skipp \\(typo\\)'"):
        extract(page)
    page.write_text("<!-- docs-test: continues -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="'continues' needs a previous Python block"):
        plan_runs(extract(page))


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.DOTALL | re.MULTILINE)
    assert match, f"README.md has no '## {title}' section"
    return match[1]


def test_readme_install_uses_the_repository_until_the_package_is_published():
    """`pip install hf_galore` finds nothing on the index: the README must not tell a newcomer to run it."""
    import configparser

    section = _readme_section("Install")
    commands = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
                for line in block.splitlines() if line.strip().startswith("pip install")]  # fmt: skip
    assert commands, section
    index_installs = [c for c in commands if re.search(r"pip install\s+['\"]?hf_galore(\[|['\"]?(\s|$))", c)]
    assert not index_installs, f"install(s) from an index that does not have the package: {index_installs}"
    assert "pip install -e ." in commands
    extras_declared = configparser.ConfigParser()
    extras_declared.read(ROOT / "setup.cfg")
    declared = set(extras_declared["options.extras_require"])
    for extras in re.findall(r"\.\[([\w,]+)\]", " ".join(commands)):
        assert set(extras.split(",")) <= declared, (extras, declared)
    assert 'pip install "hf_galore @ git+<repository URL>"' in section  # the form without a clone, explained
