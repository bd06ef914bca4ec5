"""Running a recipe the way users do: under a launcher (``deepspeed``, ``accelerate launch``) on 2 CPU ranks, as its
own process tree.

Tests that use it are marked ``launches`` (tests/conftest.py): they run last, with no rank pool alive, and their
time limit is generous -- many times what a run takes on a quiet 2-core machine (30-90 s) -- because a loaded machine
made one of them time out at 290 s; a hung run still ends, its whole process group killed.
"""

import json
import os
import signal
import socket
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: seconds one launched run may take
LIMIT = 1000


def free_port() -> int:
    with socket.socket() as sock:  # the default port 29500 may be taken by another launch on this machine
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cmd: list[str]) -> str:
    """Run ``cmd`` from the repository root; its output (stdout and stderr). Fails the test on a non-zero exit or
    after :data:`LIMIT` seconds (the launcher and its ranks are killed)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's ranks too
        log, _ = proc.communicate()
        pytest.fail(f"{cmd[0]} did not finish in {LIMIT} s:\n" + log[-4000:])
    assert proc.returncode == 0, log[-6000:]
    return log


def run_recipe(recipe: str, out, *flags: str) -> dict:
    """Run ``recipes/<recipe>.py`` under ``deepspeed --num_gpus 2`` with ``flags`` into ``out``; its
    ``eval_results.json``."""
    launch(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
            os.path.join(ROOT, "recipes", f"{recipe}.py"), "--output_dir", str(out),
            "--export_final_model", "false", "--report_to", "none", "--disable_tqdm", "true", *flags])
    with open(os.path.join(out, "eval_results.json")) as f:
        return json.load(f)


def _recipe_main(path: str, argv: list[str]) -> None:
    """A recipe's ``main()`` as ``python path *argv`` would run it, in a rank of a pool."""
    import runpy
    import sys

    saved = sys.argv
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")  # its `if __name__ == "__main__":` block, as `python path` runs it
    finally:
        sys.argv = saved


def run_recipe_in_pool(pool, recipe: str, out, *flags: str) -> dict:
    """Like :func:`run_recipe`, but on the ranks of a test pool (``dist_pool(2)``) instead of a fresh ``deepspeed``
    launch: the recipe's own ``main()`` on the same command line, without the ~10 s a launch spends starting Python,
    importing torch/DeepSpeed/transformers and building the process groups on each rank. Tests of the launchers
    themselves (the demo's command, accelerate, multi-node) still launch."""
    path = os.path.join(ROOT, "recipes", f"{recipe}.py")
    pool.run(_recipe_main, path, ["--output_dir", str(out), "--export_final_model", "false", "--report_to", "none",
                                  "--disable_tqdm", "true", *flags])
    with open(os.path.join(out, "eval_results.json")) as f:
        return json.load(f)
