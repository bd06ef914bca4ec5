"""Generation through the pipeline equals HF ``generate``: greedy token for token on a left-padded batch at
p = 1, 2, 4 stages, with and without data parallelism (each replica generates its own rows); sampling with a
seed is reproducible and equals HF's sampling under the same seed; EOS stops rows one by one."""

import pytest
import torch

from models import tiny_config

PROMPT_LEN, NEW = 9, 10


def _model(model_type):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def _prompts(batch=4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (batch, PROMPT_LEN), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([3, 1, 0, 5, 2, 0, 4, 1][:batch]):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _rank_generate(model_type, stages, ids, mask, kwargs):
    """Runs on every rank: build the same model, pipeline it, generate this replica's rows."""
    import torch.distributed as dist

    from hfpipe import to_pipeline
    from hfpipe.generation import generate

    pipe = to_pipeline(_model(model_type), num_stages=stages)
    dp = dist.get_world_size() // stages
    replica = pipe._topo.get_coord(dist.get_rank()).data
    rows = ids.shape[0] // dp
    sl = slice(replica * rows, (replica + 1) * rows)
    out = generate(pipe, ids[sl], mask[sl], **kwargs)
    return replica, pipe.stage_id, out


def _gathered(results):
    """Rows of every replica in order; every stage of a replica must return the same ids."""
    by_replica = {}
    for replica, _stage, out in results:
        if replica in by_replica:
            assert torch.equal(by_replica[replica], out), "stages of one replica disagree on the generated ids"
        by_replica[replica] = out
    width = max(o.shape[1] for o in by_replica.values())
    assert all(o.shape[1] == width for o in by_replica.values()) or len(by_replica) > 1
    return [by_replica[r] for r in sorted(by_replica)]


# (family, world size, stages): p = 1, 2, 4 without data parallelism, p = 1 and 2 with dp = 2; GPT-2 adds learned
# absolute positions (the embedding stage must see HF generate's left-padding positions) and Conv1D blocks.
CASES = [("llama", 1, 1), ("llama", 2, 2), ("llama", 4, 4), ("llama", 2, 1), ("llama", 4, 2), ("gpt2", 2, 2),
         ("gpt2", 4, 2)]


@pytest.mark.parametrize("model_type,world,stages", CASES)
def test_greedy_equals_hf_generate(dist_pool, model_type, world, stages):
    ids, mask = _prompts()
    model = _model(model_type)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    kwargs = dict(max_new_tokens=NEW, eos_token_id=None)
    per_replica = _gathered(dist_pool(world).run(_rank_generate, model_type, stages, ids, mask, kwargs))
    rows = ids.shape[0] // len(per_replica)
    for r, out in enumerate(per_replica):
        expected = ref[r * rows:(r + 1) * rows]
        assert out.shape == expected.shape == (rows, PROMPT_LEN + NEW)
        assert torch.equal(out, expected), f"replica {r}:\n{out[:, PROMPT_LEN:]}\nHF:\n{expected[:, PROMPT_LEN:]}"


@pytest.mark.parametrize("model_type", ["mistral", "gpt_neox"])
def test_greedy_other_families(dist_pool, model_type):
    """Sliding-window cache layers (mistral, window 6 < prompt + new) and GPT-NeoX's ``layer_past`` cache kwarg."""
    ids, mask = _prompts()
    ref = _model(model_type).generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
    out, = _gathered(dist_pool(2).run(_rank_generate, model_type, 2, ids, mask,
                                      dict(max_new_tokens=NEW, eos_token_id=None)))
    assert torch.equal(out, ref)


def test_without_cache_equals_with_cache(dist_pool):
    ids, mask = _prompts()
    cached, = _gathered(dist_pool(2).run(_rank_generate, "llama", 2, ids, mask, dict(max_new_tokens=NEW)))
    plain, = _gathered(dist_pool(2).run(_rank_generate, "llama", 2, ids, mask,
                                        dict(max_new_tokens=NEW, use_cache=False)))
    assert torch.equal(cached, plain)


def test_eos_stops_each_row_like_hf(dist_pool):
    ids, mask = _prompts()
    model = _model("llama")
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    eos = int(free[0, PROMPT_LEN + 2])  # row 0 emits it at its 3rd new token: rows then stop at different steps
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    out, = _gathered(dist_pool(2).run(_rank_generate, "llama", 2, ids, mask,
                                      dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)))
    assert torch.equal(out, ref)
    assert int((out[0, PROMPT_LEN + 3:] == 0).sum()) == out.shape[1] - PROMPT_LEN - 3  # padded after its EOS


def test_sampling_seeded_reproducible_and_equals_hf(dist_pool):
    ids, mask = _prompts()
    kwargs = dict(max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, eos_token_id=None)
    pool = dist_pool(2)
    first, = _gathered(pool.run(_rank_generate, "llama", 2, ids, mask, dict(kwargs, seed=7)))
    again, = _gathered(pool.run(_rank_generate, "llama", 2, ids, mask, dict(kwargs, seed=7)))
    other, = _gathered(pool.run(_rank_generate, "llama", 2, ids, mask, dict(kwargs, seed=8)))
    greedy, = _gathered(pool.run(_rank_generate, "llama", 2, ids, mask, dict(max_new_tokens=NEW)))
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, greedy)
    model = _model("llama")
    torch.manual_seed(7)  # HF samples from the global generator; ours from a generator seeded the same way
    ref = model.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs)
    assert torch.equal(first, ref)


def test_prompts_from_training_batch():
    from hfpipe.generation import prompts_from_batch

    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 8, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]),
             "labels": torch.tensor([[-100, -100, 7, 8, 9, -100], [-100, -100, -100, 8, -100, -100]])}
    ids, mask = prompts_from_batch(batch, pad_token_id=0)
    assert ids.tolist() == [[0, 5, 6], [5, 6, 7]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]
