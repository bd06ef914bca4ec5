"""Running a recipe the way users do: under the ``deepspeed`` launcher on 2 CPU ranks, as its own process tree.

Tests that use it are marked ``launches`` (tests/conftest.py): they run last, with no rank pool alive, and their
time limit is generous -- about 4x what a run takes on a quiet 2-core machine -- because a loaded machine made one
of them time out; a hung run still ends.
"""

import json
import os
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: seconds one launched recipe may take (a quiet run: 30-90 s)
LIMIT = 1000


def free_port() -> int:
    with socket.socket() as sock:  # the default port 29500 may be taken by another launch on this machine
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_recipe(recipe: str, out, *flags: str) -> dict:
    """Run ``recipes/<recipe>.py`` with ``flags`` into ``out``; its ``eval_results.json``."""
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "recipes", f"{recipe}.py"), "--output_dir", str(out),
           "--export_final_model", "false", "--report_to", "none", "--disable_tqdm", "true", *flags]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMIT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "eval_results.json")) as f:
        return json.load(f)
