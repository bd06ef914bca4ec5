"""Base models (``AutoModel``: ``BertModel``, ``LlamaModel``) through the pipeline (issue 15 part 6): they convert and
export bit-exact under their own names (no ``bert.`` / ``model.`` prefix, pooler included), the real sentence-
transformers MiniLM (``architectures: ["BertModel"]``) included, and a 2-stage pipeline returns HF's
``last_hidden_state`` for a padded batch."""

import glob
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

sys.path.insert(0, os.path.dirname(__file__))
from models import tiny_config  # noqa: E402

from hfpipe.checkpoint import convert, export
from hfpipe.core.builder import prepare
from hfpipe.core.heads import BASE_MODEL, head_for_class


def _tensors(folder):
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _base_folder(tmp_path, model_type):
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(model_type))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_base_model_round_trip_is_bit_exact(tmp_path, model_type):
    folder, model = _base_folder(tmp_path, model_type)
    manifest = convert(folder, tmp_path / "ckpt", num_stages=2, progress=False)
    assert manifest["architecture"] == type(model).__name__ and manifest["layers"][-1]["name"] == "BaseModelOutput"
    assert manifest["missing_keys"] == [] and manifest["unused_keys"] == []
    out = export(tmp_path / "ckpt", tmp_path / "out", progress=False)
    src, dst = _tensors(folder), _tensors(out)
    assert sorted(src) == sorted(dst) and not any(k.startswith(("bert.", "model.")) for k in dst)
    assert all(torch.equal(t, dst[k]) and t.dtype == dst[k].dtype for k, t in src.items())
    reloaded, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_real_minilm_converts_as_the_base_model_it_is(tmp_path):
    """``hfpipe convert`` of the sentence-transformers MiniLM (``BertModel``) stopped with ``AttributeError: 'BertModel'
    object has no attribute 'bert'``; now it round-trips under BertModel's own names, its pooler included."""
    from transformers import AutoTokenizer

    from hfpipe.tasks.base import default_model_path

    path = default_model_path()
    manifest = convert(path, tmp_path / "ckpt", num_stages=2, progress=False)
    assert manifest["architecture"] == "BertModel" and manifest["missing_keys"] == []
    assert manifest["unused_keys"] == ["embeddings.position_ids"]  # a legacy buffer BertModel no longer has
    out = export(tmp_path / "ckpt", tmp_path / "out", progress=False)
    src, dst = _tensors(path), _tensors(out)
    assert sorted(dst) == sorted(k for k in src if k != "embeddings.position_ids") and len(dst) == 103
    assert all(torch.equal(src[k], dst[k]) for k in dst)
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["pipelines split a model into stages", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(path).eval()(**batch).last_hidden_state
        got = AutoModel.from_pretrained(out).eval()(**batch).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_base_head_is_found_and_refuses_training():
    from transformers import BertModel, LlamaModel

    assert head_for_class(BertModel) is BASE_MODEL and head_for_class(LlamaModel) is BASE_MODEL
    builder = prepare(tiny_config("llama"), AutoModel)
    names = [i.name for i in builder.layers()]
    assert names[0] == "TokenEmbedding" and names[-1] == "BaseModelOutput" and builder.adapter.base_prefix == ""
    with pytest.raises(ValueError, match="has no loss; to train, load a task class"):
        BASE_MODEL.loss(torch.zeros(1, 2, 3), (), None, builder.adapter.config)


def _pipeline_hidden(model_type, stages):
    """On every rank: HF's base model and its pipeline on one padded batch; the last stage returns both."""
    import deepspeed

    from hfpipe import to_pipeline
    from hfpipe.core.batches import micro_batches
    from hfpipe.verify import ds_config

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(model_type)).eval()
    ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pipe = to_pipeline(model, num_stages=stages, partition_method="uniform")
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=0.0),
                                      config=ds_config(4, 2, 1))
    out = engine.eval_batch(iter(micro_batches({"input_ids": ids, "attention_mask": mask}, pipe, 2)),
                            compute_loss=False, reduce_output=None)
    if not engine.is_last_stage():
        return None
    return torch.cat(list(out)), ref, mask


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_pipeline_returns_last_hidden_state(dist_pool, model_type):
    got, ref, mask = dist_pool(2).run(_pipeline_hidden, model_type, 2)[-1]
    assert got.shape == ref.shape == (4, 9, 32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # padded positions too: the same ops run
