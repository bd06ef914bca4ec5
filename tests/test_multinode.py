"""Multi-node through DeepSpeed's own launcher, on one machine (issue 17, part 6): two launchers with ``--no_ssh``,
``--num_nodes 2 --node_rank 0|1 --master_addr 127.0.0.1`` (2 nodes x 1 rank, pp=2) train a recipe to the loss
curve of the single-node run; a node that never joins ends the run within ``--ddp_timeout``, named."""

import json
import os
import subprocess
import time

import pytest

from recipe_runs import LIMIT, ROOT, free_port, launch

RECIPE = os.path.join(ROOT, "recipes", "finetune_classification.py")
FLAGS = ["--export_final_model", "false", "--report_to", "none", "--disable_tqdm", "true", "--num_stages", "2",
         "--max_steps", "3", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no"]


def _node(hostfile, rank: int, port: int, out, *extra) -> list[str]:
    return ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank", str(rank),
            "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), RECIPE,
            "--output_dir", str(out), *FLAGS, *extra]


def _losses(out) -> list[float]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.launches
@pytest.mark.timeout(3 * LIMIT)
def test_two_nodes_match_one_and_a_missing_node_is_named(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names are keys only: --no_ssh starts nothing remote
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    launch(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), RECIPE,
            "--output_dir", str(tmp_path / "one"), *FLAGS])
    port = free_port()
    node1 = subprocess.Popen(_node(hostfile, 1, port, tmp_path / "two"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        launch(_node(hostfile, 0, port, tmp_path / "two"))
        log1, _ = node1.communicate(timeout=LIMIT)
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, 9)
    assert node1.returncode == 0, log1[-4000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == 3 and len(set(one)) == 3
    assert two == pytest.approx(one, rel=1e-6)
    # node 1 never starts: node 0 stops within --ddp_timeout (plus start-up), naming it
    t0 = time.monotonic()
    proc = subprocess.run(_node(hostfile, 0, free_port(), tmp_path / "miss", "--ddp_timeout", "10"), cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=LIMIT)
    assert proc.returncode != 0
    assert "rank(s) 1 (node 1) of 2 never joined within 10 s (--ddp_timeout)" in proc.stdout, proc.stdout[-4000:]
    assert time.monotonic() - t0 < LIMIT
