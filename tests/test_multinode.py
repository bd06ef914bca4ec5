"""Multi-node through DeepSpeed's own launcher, on one machine (issue 17, part 6): launchers with ``--no_ssh``,
``--num_nodes 2 --node_rank 0|1 --master_addr 127.0.0.1`` -- 2 nodes x 1 rank at pp=2, and 2 nodes x 2 ranks at
pp=2 x dp=2 (stage 0 on node 0, stage 1 on node 1) -- train the classification recipe to the loss curve of one
process; a node that never joins ends the run within ``--ddp_timeout``, named in one line (exit 2); data the loaded
model cannot take is one line from rank 0 of a 2-rank launch, the other rank quiet (exit 2, issue 17 part 3).

Every run starts at once (they share the two cores; most of a run is start-up and waiting), on a tiny BERT without
dropout (so the layouts' curves can be compared) that uses the embedded default's tokenizer.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from recipe_runs import LIMIT, ROOT, free_port

sys.path.insert(0, os.path.dirname(__file__))
from models import tiny_config  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "finetune_classification.py")
FLAGS = ["--export_final_model", "false", "--report_to", "none", "--disable_tqdm", "true", "--do_train",
         "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--learning_rate", "1e-3",
         "--gradient_accumulation_steps", "2"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


def _tiny(path, vocab_size: int) -> str:
    from transformers import BertModel

    from hfpipe.tasks.base import default_model_path

    config = tiny_config("bert", vocab_size=vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)  # the classifier head is new (seeded by the recipe)
    return ["--model_name_or_path", str(path), "--tokenizer_name", default_model_path()]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        log, _ = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{proc.args[:3]} did not finish in {LIMIT} s:\n" + log[-4000:])
    return proc.returncode, log


def _nodes(hostfile, ranks_per_node: int, out, model, *extra, node_ranks=(0, 1)) -> list[subprocess.Popen]:
    port = free_port()
    return [_start(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank", str(n),
                    "--num_gpus", str(ranks_per_node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                    RECIPE, "--output_dir", str(out), *model, *FLAGS, *extra]) for n in node_ranks]


def _losses(out) -> list[float]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _errors(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ln.startswith("error:")]


@pytest.mark.launches
@pytest.mark.timeout(3 * LIMIT)
def test_two_nodes_match_one_process_and_a_missing_node_or_bad_data_is_one_line(tmp_path):
    model, small_vocab = _tiny(tmp_path / "tiny", 30522), _tiny(tmp_path / "tiny-1000", 1000)
    two_by_one, two_by_two = tmp_path / "hosts1", tmp_path / "hosts2"
    two_by_one.write_text("node0 slots=1\nnode1 slots=1\n")  # names are keys only: --no_ssh starts nothing remote
    two_by_two.write_text("node0 slots=2\nnode1 slots=2\n")
    t0 = time.monotonic()
    runs = {
        # the reference: one process, one stage, the same global batch of 16 (8 x 2 micro-batches)
        "one": [_start([sys.executable, RECIPE, "--output_dir", str(tmp_path / "one"), *model, *FLAGS,
                        "--num_stages", "1"])],
        "2x1": _nodes(two_by_one, 1, tmp_path / "2x1", model, "--num_stages", "2"),
        "2x2": _nodes(two_by_two, 2, tmp_path / "2x2", model, "--num_stages", "2",
                      "--per_device_train_batch_size", "4"),  # 4 x 2 micro-batches x 2 replicas
        # node 1 never starts
        "missing": _nodes(two_by_one, 1, tmp_path / "missing", model, "--num_stages", "2", "--ddp_timeout", "5",
                          node_ranks=(0,)),
        # token ids of the tokenizer (30522 words) beyond the model's 1000: found after the model loaded
        "data": [_start(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), RECIPE,
                         "--output_dir", str(tmp_path / "data"), *small_vocab, *FLAGS, "--num_stages", "2"])],
    }
    done = {name: [_finish(p) for p in procs] for name, procs in runs.items()}
    for name in ("one", "2x1", "2x2"):
        for code, log in done[name]:
            assert code == 0, f"{name}:\n{log[-4000:]}"
    one = _losses(tmp_path / "one")
    assert len(one) == 3 and len(set(one)) == 3
    assert _losses(tmp_path / "2x1") == pytest.approx(one, rel=1e-5)
    assert _losses(tmp_path / "2x2") == pytest.approx(one, rel=1e-5)
    (code, log), = done["missing"]
    assert (code, _errors(log)) == (2, ["error: rank(s) 1 (node 1) of 2 never joined within 5 s (--ddp_timeout); "
                                        "start every node's launcher with the same --master_addr/--master_port and "
                                        "--num_nodes, or raise --ddp_timeout."]), log[-4000:]
    assert "Traceback" not in log
    (code, log), = done["data"]
    errors = _errors(log)
    assert code == 2 and len(errors) == 1 and "Traceback" not in log, log[-4000:]
    assert errors[0].startswith("error: train example ") and "(vocab_size=1000)" in errors[0]
    assert time.monotonic() - t0 < LIMIT
