"""A drop-in for HF Trainer users (issue 15): every TrainingArguments flag parses (or is refused in one line), args
files, configuration errors once before the model loads (exit 2, rank 0 only), a validation split from a single
--train_file, and run_glue.py's own command line running a recipe in one process with HF's output files."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from recipe_runs import LIMIT, ROOT  # noqa: E402

from hfpipe.training.arguments import ArgumentsError, parse_args  # noqa: E402

HF_FLAGS = ["--do_train", "--do_eval", "--do_predict", "--overwrite_output_dir", "--gradient_checkpointing",
            "--optim", "adamw_torch", "--logging_strategy", "steps", "--logging_steps", "0.25", "--save_steps", "0.5",
            "--eval_strategy", "steps", "--eval_steps", "0.5", "--report_to", "all", "--warmup_steps", "0.1",
            "--lr_scheduler_type", "cosine", "--save_total_limit", "2", "--seed", "7", "--local_rank", "0"]


def test_every_trainer_flag_parses_with_its_hf_meaning():
    (a,) = parse_args(argv=HF_FLAGS)
    assert (a.do_train, a.do_eval, a.do_predict, a.overwrite_output_dir) == (True, True, True, True)
    assert a.activation_checkpoint_interval == 1  # --gradient_checkpointing -> activation checkpointing
    assert a.steps("logging_steps", 10) == 3 and a.steps("save_steps", 10) == 5 and a.warmup(10) == 1
    from transformers.integrations import get_available_reporting_integrations

    assert a.report_to == get_available_reporting_integrations()  # "all", as HF resolves it
    assert {"do_train", "gradient_checkpointing", "save_steps"} <= a._explicit_fields
    assert "learning_rate" not in a._explicit_fields


@pytest.mark.parametrize("flags, message", [
    (["--optim", "adafactor"], "--optim adafactor: the pipeline trains with DeepSpeed's optimizer (torch AdamW); use "
                               "--optim adamw_torch or adamw_torch_fused."),
    (["--torch_compile"], "--torch_compile True is not supported by the pipeline trainer: the pipeline engine runs "
                          "eager layers; remove --torch_compile."),
    (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor 0.1 is not supported by the pipeline trainer: "
                                          "the pipeline computes the model's own loss; remove it."),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1; see --help."),
])
def test_what_the_pipeline_cannot_honour_is_refused_in_one_line(flags, message):
    with pytest.raises(ArgumentsError) as info:
        parse_args(argv=flags)
    assert str(info.value) == message


def test_an_args_file_is_the_same_run_as_its_flags(tmp_path):
    import yaml

    values = {"output_dir": "o", "do_train": True, "learning_rate": 1e-4, "save_steps": 0.5, "num_stages": 2}
    (tmp_path / "a.json").write_text(json.dumps(values))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(values))
    (flags,) = parse_args(argv=["--output_dir", "o", "--do_train", "--learning_rate", "1e-4", "--save_steps", "0.5",
                                "--num_stages", "2"])
    for name in ("a.json", "a.yaml"):
        (a,) = parse_args(argv=[str(tmp_path / name)])
        assert a.to_dict() == flags.to_dict() and a._explicit_fields == set(values)
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1e-4, "no_such_field": 1}))
    with pytest.raises(ArgumentsError, match=r"bad.json: Some keys are not used by the HfArgumentParser: "
                                             r"\['no_such_field'\]"):
        parse_args(argv=[str(tmp_path / "bad.json")])


def _csv(path, n=40):
    rows = ["sentence,label"] + [f"{'good fine great' if i % 2 else 'bad awful poor'} review number {i},{i % 2}"
                                 for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _recipe(argv, monkeypatch, capsys, rank=0, world=1):
    """Run the classification recipe in this process up to its first error; (exit status, stderr)."""
    from hfpipe.tasks.base import run_recipe
    from hfpipe.tasks.classification import ClassificationDataArguments, SequenceClassificationTask

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as info:
        run_recipe(SequenceClassificationTask, ClassificationDataArguments, "x", argv=argv)
    return info.value.code, capsys.readouterr().err


def test_configuration_errors_exit_2_with_one_line_from_rank_0_before_the_model_loads(tmp_path, monkeypatch,
                                                                                       capsys):
    import transformers

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_model)
    train = _csv(tmp_path / "train.csv")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "data_types": {"grad_accum_dtype": "fp32"}}))
    out = ["--output_dir", str(tmp_path / "out")]
    cases = [
        (["--no_such_flag"], "error: unrecognized arguments: --no_such_flag; see --help."),
        (["--train_file", str(tmp_path / "nope.csv")], f"error: --train_file {tmp_path / 'nope.csv'}: no such file; "
                                                       "pass a json, jsonl or csv file."),
        (["--train_file", train, "--do_eval", "--validation_split_percentage", "0"],
         "error: --do_eval needs a validation split, and the data has ['train']; pass --validation_file, or "
         "--validation_split_percentage to hold out part of the training data."),
        (["--train_file", train, "--text_column", "nope"], "error: --text_column 'nope' is not a column of the "
                                                           "data; columns: ['sentence', 'label']."),
    ]
    for flags, line in cases:
        code, err = _recipe(flags + out, monkeypatch, capsys)  # (datasets' progress bar may precede the line)
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert (code, err.splitlines()[-1], len(errors)) == (2, line, 1), flags
        assert _recipe(flags + out, monkeypatch, capsys, rank=1, world=2) == (2, "")  # the others: quiet
    code, err = _recipe(["--train_file", train, "--bf16", "--deepspeed", str(ds)] + out, monkeypatch, capsys)
    assert code == 2 and err.count("\nerror:") + err.startswith("error:") == 1
    assert "DeepSpeed's pipeline engine rejects this mix" in err
    code, err = _recipe(["--num_stages", "2"] + out, monkeypatch, capsys, world=3)
    assert code == 2 and err.startswith("error: num_stages=2 (from command line --num_stages 2) does not divide")
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_a_single_train_file_gets_a_validation_split(tmp_path):
    from hfpipe.tasks.classification import ClassificationDataArguments, SequenceClassificationTask

    raw = SequenceClassificationTask(ClassificationDataArguments(train_file=_csv(tmp_path / "t.csv"))).load_raw()
    assert (len(raw["train"]), len(raw["validation"])) == (38, 2)  # --validation_split_percentage 5 (HF's default)
    raw = SequenceClassificationTask(ClassificationDataArguments(
        train_file=_csv(tmp_path / "t.csv"), validation_split_percentage=25)).load_raw()
    assert (len(raw["train"]), len(raw["validation"])) == (30, 10)


@pytest.mark.launches
@pytest.mark.timeout(LIMIT + 60)
def test_run_glue_command_line_runs_a_recipe_in_one_process(tmp_path):
    """run_glue.py's README command (with a CSV of one's own instead of --task_name), the script name changed,
    started as `python recipe.py`: one process trains as one stage; HF's files come out."""
    from transformers import TrainerState

    from hfpipe.tasks.base import default_model_path

    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "finetune_classification.py"),
           "--model_name_or_path", default_model_path(), "--train_file", _csv(tmp_path / "train.csv"),
           "--do_train", "--do_eval", "--do_predict", "--max_seq_length", "128", "--per_device_train_batch_size",
           "32", "--learning_rate", "2e-5", "--num_train_epochs", "3", "--output_dir", str(out),
           "--overwrite_output_dir"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMIT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "***** train metrics *****" in proc.stdout and "***** eval metrics *****" in proc.stdout
    # pipeline traps: a dropped partial batch and padding far above the data
    assert "6 of the 38 training examples are left out of each epoch" in log
    assert "--max_seq_length 128 pads every row to 128 tokens" in log
    saved = json.loads((out / "ds_config.json").read_text())
    assert saved["config"]["pipeline"]["stages"] == 1 and saved["sources"]["num_stages"] == "default (all 1 " \
                                                                                           "processes)"
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 3 and results["train_samples"] == 38 and results["eval_samples"] == 2
    assert 0.0 < results["train_loss"] < 1.0 and "eval_accuracy" in results
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] == results["eval_accuracy"]
    state = TrainerState.load_from_json(str(out / "trainer_state.json"))  # saved after training, as HF's scripts do
    assert state.global_step == 3 and all(isinstance(h["loss"], float) for h in state.log_history if "loss" in h)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged if "eval_loss" in h] == [3]  # the final evaluation, logged once
    preds = json.loads((out / "predict_predictions.json").read_text())
    assert len(preds) == 2 and set(preds) <= {"0", "1"}
    assert (out / "final" / "README.md").read_text().startswith("---")  # the local model card
