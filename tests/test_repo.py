"""
What the repository promises about itself: lines of at most 120 characters, README's test command being the one
.ci/run runs, and .ci/gpu finishing inside one time budget (run here, without CUDA: its tests skip, it passes).
"""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def test_lines_are_at_most_120_characters():
    long = [f"{p.relative_to(REPO)}:{i}" for p in sorted(REPO.rglob("*.py")) if not {".venv", "data"} & set(p.parts)
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, long[:10]


def test_readme_commands_are_what_ci_runs():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.startswith("    python3 -m venv .venv")]
    assert len(commands) == 2 and "python train.py" in commands[0]  # quickstart, tests
    assert commands[1] in ci.splitlines()  # .ci/run runs exactly README's test command
    assert "pytest" in (REPO / "requirements-dev.txt").read_text() and "-r requirements-dev.txt" in commands[1]


@pytest.mark.slow
def test_gpu_check_runs_here_inside_its_budget(tmp_path):
    """.ci/gpu in one call: a single time budget its steps share (under 8 minutes by default); here, without CUDA,
    the CUDA tests skip, the benchmarks are skipped, and gpu_summary.json is written."""
    text = (REPO / ".ci" / "gpu").read_text()
    assert int(re.search(r"GPU_BUDGET_S:-(\d+)", text).group(1)) < 480
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_BUDGET_S="300")
    r = subprocess.run(["bash", str(REPO / ".ci" / "gpu")], capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    import json
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert summary["tests"]["skipped"] == summary["tests"]["tests"] >= 6 and summary["out_of_time"] == []


def test_help_carries_the_comment_beside_each_key():
    """--help of train.py and sample.py prints each key's comment from the defaults block; bench.py adds train.py's
    keys to its own options; prepare.py's help sentences are whole."""
    for script, key, comment in (("train.py", "--eval_interval=250", "evaluate (and checkpoint) every this many steps"),
                                 ("train.py", "--objective=None", "mlm_nsp: BERT's masked LM + next sentence"),
                                 ("sample.py", "--top_k=None", "keep the k likeliest tokens"),
                                 ("bench.py", "--warmup_iters=None", "100, or a tenth of the decay")):
        r = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True)
        line = next((ln for ln in r.stdout.splitlines() if ln.strip().startswith(key)), "")
        assert r.returncode == 0 and comment in line, (script, key, line)
    r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--help"], capture_output=True, text=True)
    assert "--append uses the corpus's own" in " ".join(r.stdout.split())
