"""Configuration errors found before the model loads, reported once.

A recipe runs the same code on every rank; an error raised after ``import torch.distributed`` joined a group would
print one traceback per rank, and one raised after the model loaded and the data was tokenised costs minutes.
Everything that can be checked from the flags, the merged DeepSpeed config and the raw data is checked first
(:func:`check_config`, :func:`check_splits`) inside :func:`before_model_load`, which turns any such error into one
line on stderr from rank 0 (the other ranks exit quietly) and exit status 2, argparse's status for a bad command
line. No process group exists yet at that point, so no rank waits for another.

What can only be found later (data the loaded model cannot take, a node that never joined, a NaN loss, a checkpoint
that does not fit) goes through :func:`after_model_load`: an hfpipe user error is one line too, exit status 2, said
once: rank 0 says it and tells the others through the process group's store that it did; a rank whose error rank 0
did not report (a peer that timed out waiting for it, say) says its own. A genuine bug keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

#: what counts as a configuration error (bad flags, config, files, data) -- not a bug in hfpipe
ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


@contextlib.contextmanager
def before_model_load():
    """Run the checks inside; a configuration error leaves with one line from rank 0 and exit status 2."""
    if _rank() != 0:  # one progress bar per file, not one per rank
        import datasets

        datasets.disable_progress_bars()
    try:
        yield
    except ERRORS as exc:
        if _rank() == 0:
            message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).strip().replace("\n", " ")
            print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


#: seconds a rank other than 0 waits to hear that rank 0 reported the error, and rank 0 waits for their answer
REPORT_WAIT_S = 5.0
_REPORTED, _HEARD = "hfpipe/error/reported", "hfpipe/error/heard"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's to fix (one line) rather than a bug (a traceback): hfpipe's own runtime errors
    (a peer that timed out, a NaN loss, a failed push), a ``ValueError``/``FileNotFoundError`` that hfpipe's code
    raised (its checks: ``ConfigError``, ``DataError``, ... are ValueErrors), and the system's ``OSError`` (a missing
    model, a full disk, a folder without write permission). A ValueError from inside a library stays a traceback."""
    from hfpipe.hub import PushError
    from hfpipe.launch import PeerTimeout
    from hfpipe.training.numerics import NonFiniteLossError

    if isinstance(exc, (PeerTimeout, NonFiniteLossError, PushError)):
        return True
    if isinstance(exc, (ValueError, FileNotFoundError)):
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE + os.sep)
    return isinstance(exc, OSError) and exc.errno is not None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}; check the path, its permissions and the free disk space."
    return str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).strip().replace("\n", " ")


def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no store to talk through (a backend without one)
        return None


def _rank_0_reports(exc: BaseException, store) -> bool:
    """On a rank other than 0: whether rank 0 says this error (then this rank stays quiet)."""
    from datetime import timedelta

    if store is None:  # before the process group: errors every rank finds alike, unless the error says otherwise
        return getattr(exc, "rank_0_reports", True)
    try:
        store.wait([_REPORTED], timedelta(seconds=REPORT_WAIT_S))
        store.add(_HEARD, 1)
        return True
    except Exception:  # rank 0 did not report within the wait, or is gone
        return False


def report(exc: BaseException) -> None:
    """Say ``exc`` once (see the module docstring) and leave with exit status 2. Inside a process group the process
    leaves at once (``os._exit``): the group's exit handlers would wait for peers that are not coming."""
    rank, store = _rank(), _store()
    line = _one_line(exc)
    if rank == 0:
        print(f"error: {line}", file=sys.stderr, flush=True)
        if store is not None:
            try:
                store.set(_REPORTED, "1")
                others, deadline = int(os.environ.get("WORLD_SIZE", 1)) - 1, time.monotonic() + REPORT_WAIT_S
                while store.add(_HEARD, 0) < others and time.monotonic() < deadline:
                    time.sleep(0.05)
            except Exception:  # the store went away with a peer: nothing more to tell
                pass
    elif not _rank_0_reports(exc, store):
        print(f"error: {line if line.startswith('rank ') else f'rank {rank}: {line}'}", file=sys.stderr, flush=True)
    if store is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    raise SystemExit(2) from None


@contextlib.contextmanager
def after_model_load():
    """Around the rest of a recipe (model, data, training): an hfpipe user error (:func:`is_user_error`) is one
    line and exit status 2 (:func:`report`); anything else propagates with its traceback."""
    try:
        yield
    except Exception as exc:
        if not is_user_error(exc):
            raise
        report(exc)


def world_size() -> int:
    """The processes of this launch, from the launcher's environment (1 for ``python recipe.py``)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_config(args) -> dict:
    """The merged DeepSpeed config of ``args`` on this launch's processes (raises what the trainer would raise),
    and the warnings a pipeline run deserves: fewer micro-batches than stages leaves stages idle."""
    from hfpipe.core.dsconfig import check_fp16_supported
    from hfpipe.training.config import resolve_ds_config

    ds, sources = resolve_ds_config(args, world_size())
    check_fp16_supported(ds["fp16"]["enabled"], source=sources.get("fp16"))
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name (the Hub repo to create or update).")
    return ds


def warn_idle_stages(ds: dict) -> float:
    """Warn when ``gradient_accumulation_steps`` (micro-batches per step) is below the stage count; returns the
    predicted idle fraction of the schedule, (p - 1) / (m + p - 1) for p stages and m micro-batches (GPipe/1F1B)."""
    p, m = ds["pipeline"]["stages"], ds["gradient_accumulation_steps"]
    idle = (p - 1) / (m + p - 1)
    if p > 1 and m < p and _rank() == 0:
        warnings.warn(f"gradient_accumulation_steps={m} is below num_stages={p}: each stage idles about "
                      f"{idle:.0%} of every step (pipeline bubble (p-1)/(m+p-1)); use --gradient_accumulation_steps "
                      f">= {p} (e.g. {4 * p}) with a smaller --per_device_train_batch_size.", stacklevel=2)
    return idle


def warn_data_shape(dataset, global_batch_size: int, max_seq_length: int, sample: int = 1000) -> None:
    """Warn (rank 0) about what the pipeline's fixed shapes do to this training set: the partial last batch of
    each epoch is dropped (every step needs one full global batch), and every row is padded to
    ``max_seq_length`` (far above the longest example: wasted compute)."""
    if dataset is None or _rank() != 0:
        return
    n = len(dataset)
    dropped = n % global_batch_size if n >= global_batch_size else 0
    if dropped:
        warnings.warn(f"{dropped} of the {n} training examples are left out of each epoch: a step takes one full "
                      f"global batch of {global_batch_size} (shuffling picks other ones each epoch); a global batch "
                      f"dividing {n} uses them all.", stacklevel=2)
    cols = getattr(dataset, "column_names", None) or []
    if "attention_mask" not in cols:
        return
    rows = dataset.select(range(min(n, sample)))["attention_mask"] if hasattr(dataset, "select") else []
    longest = max((int(sum(m)) for m in rows), default=0)
    if longest and max_seq_length >= 2 * longest and max_seq_length - longest >= 64:
        warnings.warn(f"--max_seq_length {max_seq_length} pads every row to {max_seq_length} tokens, but the longest "
                      f"of the first {len(rows)} training examples has {longest}: about {max_seq_length / longest:.0f}x "
                      f"the compute needed; use --max_seq_length {longest} (or a little more).", stacklevel=2)


def check_splits(raw, args) -> None:
    """The splits the ``--do_*`` flags need exist."""
    need = ([("train", "--do_train", "--train_file or --dataset_name with a train split")] if args.do_train else []) \
        + ([("validation", "--do_eval", "--validation_file, or --validation_split_percentage to hold out part of "
                                        "the training data")] if args.do_eval else [])
    for split, flag, fix in need:
        if split not in raw or len(raw[split]) == 0:
            have = sorted(raw) if hasattr(raw, "keys") else []
            raise ValueError(f"{flag} needs a {split} split, and the data has {have or 'none'}; pass {fix}.")
