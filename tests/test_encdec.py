"""Encoder-decoders through the pipeline (issue 18): T5 (v1.0 tied, v1.1 gated-GELU untied), BART, mBART and Marian
train exactly like HF -- loss, logits and every gradient <= 1e-5 relative in fp32 on padded encoder and decoder
inputs, decoder inputs shifted from the labels as HF does -- with the stage cut inside the encoder (T5: mid-stack,
so the tied relative-position table is on both stages), at the encoder/decoder seam and inside the decoder."""

import pytest
import torch

from hfpipe.verify import ModelSpec, format_report, verify

from models import family_config

CLASSES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
           "bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration", "marian": "MarianMTModel"}
# T5 v1.1 / Flan-T5: gated GELU, no output scaling (transformers 5 always ties T5's lm_head to the shared table;
# tie_word_embeddings=False only switches the scaling off)
T5_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)

# layer lists (hfpipe.core.adapters.encdec): T5  0 embed, 1 enc shell, (bias, block) x 3 at 2..7, 8 enc final,
# 9 dec shell, (bias, block) x 2 at 10..13, 14 dec final, 15 head; BART-likes  0, 1, blocks 2-4, 5, 6, blocks 7-8, 9, 10
T5_IN_ENCODER, T5_SEAM, T5_IN_DECODER = [0, 4], [0, 9], [0, 12]
BART_IN_DECODER, BART_SEAM = [0, 8], [0, 6]


def spec_for(model_type, **overrides):
    config = family_config(model_type, **overrides)
    return ModelSpec(class_name=CLASSES[model_type], config=config.to_dict(), seed=0)


def check(report):
    assert report["passed"], format_report(report)
    assert report["loss_rel_err"] <= 1e-5 and report["max_rel_grad_err"] <= 1e-5
    assert report["num_params"] >= 20


CASES = [
    ("t5", {}, 2, T5_IN_ENCODER, "left"),
    ("t5", {}, 2, T5_IN_DECODER, "right"),
    ("bart", {}, 2, BART_IN_DECODER, "right"),
    ("mbart", {}, 2, BART_SEAM, "left"),
    ("marian", {}, 2, BART_IN_DECODER, "right"),
    ("t5", T5_V11, 4, [0, 4, 9, 12], "right"),
    ("bart", {}, 1, "parameters", "right"),
]


@pytest.mark.parametrize("model_type,overrides,stages,partition,padding", CASES,
                         ids=[f"{c[0]}{'-v1.1' if c[1] else ''}-p{c[2]}-{c[3]}" for c in CASES])
def test_verify_encoder_decoder(dist_pool, model_type, overrides, stages, partition, padding):
    spec = spec_for(model_type, **overrides)
    report = verify(spec, stages=stages, micro_batches=4 if stages > 1 else 1, batch_size=8, seq_len=12,
                    partition=partition, padding=padding, pool=dist_pool(stages))
    check(report)
    if not isinstance(partition, str):
        assert report["parts"][:-1] == partition


def test_verify_untied_t5_v11_checkpoint(dist_pool, tmp_path):
    """A T5 v1.1 checkpoint with its own LM head (as on the Hub), cut at the encoder/decoder seam: the untied
    ``Seq2SeqHead`` layer trains like HF's untied ``lm_head`` (its gradient is not summed into the shared table's)."""
    _untied_t5_folder(tmp_path / "hf")
    spec = ModelSpec(class_name="T5ForConditionalGeneration", path=str(tmp_path / "hf"), seed=0)
    report = verify(spec, stages=2, micro_batches=4, batch_size=8, seq_len=12, partition=T5_SEAM, padding="right",
                    pool=dist_pool(2))
    check(report)
    assert report["parts"][:-1] == T5_SEAM


def test_lora_matches_peft_t5(dist_pool):
    """LoRA (r=8 on T5's q/v in every encoder and decoder block, PEFT's SEQ_2_SEQ_LM task type) through 2 stages cut
    inside the encoder: loss, logits and every trainable gradient equal ``peft.get_peft_model``'s, and the pipeline
    trains exactly PEFT's parameters."""
    from peft import LoraConfig

    report = verify(spec_for("t5"), stages=2, micro_batches=2, batch_size=4, seq_len=10, partition=T5_IN_ENCODER,
                    pool=dist_pool(2), lora=LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]))
    assert report["passed"], format_report(report)
    assert report["loss_rel_err"] <= 1e-5 and report["max_rel_grad_err"] <= 1e-5
    # A and B of q and v: self-attention in 3 + 2 blocks, cross-attention in the 2 decoder blocks
    assert report["num_params"] == 2 * 2 * (3 + 2 + 2), format_report(report)
    assert report["trainable_pipeline"] == report["trainable_hf"] > 0


def _builder(model_type, **overrides):
    import transformers

    from hfpipe.core.builder import prepare

    config = family_config(model_type, **overrides)
    return prepare(config, transformers.AutoModelForSeq2SeqLM, device="meta")


def test_cost_model_counts_source_and_target_tokens():
    """Encoder layers cost per source token, decoder layers per target token; a decoder block's cross-attention
    (keys/values from every source token, every target token attending to every source token) grows with the
    source: exactly 2 x d x d per K/V projection per extra source token plus 4 x head_dim + 5 per head per
    (target, source) pair, x3 for forward + backward."""
    from hfpipe.core.costs import Workload, layer_costs

    b = _builder("bart")
    short = layer_costs(b, Workload(seq_len=16, target_len=8, dtype="fp32"))
    long = layer_costs(b, Workload(seq_len=48, target_len=8, dtype="fp32"))
    names = [c.name for c in short]
    enc, dec = names.index("EncoderBlock"), names.index("DecoderBlock")
    d, heads = 32, 4
    expected = 3 * ((48 - 16) * 2 * (2 * d * d) + 8 * (48 - 16) * heads * (4 * (d // heads) + 5))
    assert long[dec].flops - short[dec].flops == pytest.approx(expected)
    assert long[enc].flops > 2.9 * short[enc].flops  # per source token, plus attention over the longer source
    head = names.index("TiedHead")
    assert long[head].flops == short[head].flops  # the LM head and loss run on the 8 target tokens either way
    assert long[0].flops - short[0].flops == pytest.approx(2 * (48 - 16) * d)  # embedding gathers both streams


def test_plan_encoder_decoder_target_len():
    """``hfpipe plan --target-len``: short targets leave most work in the encoder, so the balanced cut moves into it
    (equal lengths: inside the decoder, whose blocks also cross-attend)."""
    import transformers

    from hfpipe.plan import format_plan, plan

    config = family_config("t5", num_layers=4, num_decoder_layers=4)
    cls = transformers.T5ForConditionalGeneration
    equal = plan(config, model_class=cls, stages=2, seq_len=64, micro_batches=4, dtype="fp32")
    short = plan(config, model_class=cls, stages=2, seq_len=64, target_len=4, micro_batches=4, dtype="fp32")
    assert short["parts"][1] < 10 < equal["parts"][1]  # layer 10: the encoder's final norm
    assert "target_len=4" in format_plan(short)
    assert short["stage_rows"][0]["layers"].startswith("embed, B0")


# ------------------------------------------------------------------------------------------------------ generation
def _seq2seq(model_type, overrides):
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(family_config(model_type, **overrides)).eval()


def _sources(batch=4, length=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([3, 0, 1, 5][:batch]):  # right padding, lengths differ
        if pad:
            mask[row, -pad:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _rank_generate(model_type, overrides, stages, partition, ids, mask, kwargs):
    from hfpipe import to_pipeline
    from hfpipe.generation import generate

    pipe = to_pipeline(_seq2seq(model_type, overrides), num_stages=stages, partition_method=partition)
    return pipe.stage_id, generate(pipe, ids, mask, **kwargs)


GEN_CASES = [("t5", {}, 1, "parameters"), ("t5", T5_V11, 2, T5_IN_DECODER), ("t5", {}, 4, [0, 4, 9, 12]),
             ("bart", {"forced_eos_token_id": None, "eos_token_id": 127}, 2, BART_IN_DECODER),
             ("marian", {"forced_eos_token_id": None, "eos_token_id": 127}, 4, [0, 3, 6, 8]),
             ("mbart", {"forced_eos_token_id": None, "eos_token_id": 127}, 2, BART_SEAM)]


@pytest.mark.parametrize("model_type,overrides,stages,partition", GEN_CASES,
                         ids=[f"{c[0]}-p{c[2]}" for c in GEN_CASES])
def test_greedy_generation_equals_hf(dist_pool, model_type, overrides, stages, partition):
    """The encoder runs once, every decoder stage keeps its self- and cross-attention caches: greedy output equals
    ``model.generate`` token for token (T5's bias for each new query position, BART's positions past the cache)."""
    ids, mask = _sources()
    expected = _seq2seq(model_type, overrides).generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                          do_sample=False, num_beams=1)
    results = dist_pool(stages).run(_rank_generate, model_type, overrides, stages, partition, ids, mask,
                                    {"max_new_tokens": 8})
    for stage, out in results:
        assert torch.equal(out, expected), (stage, out, expected)
    assert expected.shape[1] >= 5


def _rank_generate_from(path, stages, partition, ids, mask, kwargs):
    from hfpipe import to_pipeline
    from hfpipe.generation import generate

    pipe = to_pipeline(path, num_stages=stages, partition_method=partition)
    return pipe.stage_id, generate(pipe, ids, mask, **kwargs)


def test_greedy_generation_untied_head_equals_hf(dist_pool, tmp_path):
    """A T5 v1.1 folder with its own LM head (the untied ``Seq2SeqHead`` layer on the last stage), loaded
    stage-locally from the folder: greedy output equals HF's ``generate`` from the same folder."""
    hf = _untied_t5_folder(tmp_path / "hf")
    ids, mask = _sources()
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=1)
    results = dist_pool(2).run(_rank_generate_from, str(tmp_path / "hf"), 2, T5_IN_DECODER, ids, mask,
                               {"max_new_tokens": 8})
    for stage, out in results:
        assert torch.equal(out, expected), (stage, out, expected)


def test_beam_search_is_refused(dist_pool):
    ids, mask = _sources(2)
    with pytest.raises(Exception, match="num_beams=2: beam search is not implemented"):
        dist_pool(1).run(_rank_generate, "t5", {}, 1, "parameters", ids, mask, {"max_new_tokens": 2, "num_beams": 2})


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_models_are_one_clear_error():
    import transformers

    from hfpipe.core.builder import prepare
    from hfpipe.core.meta import UnsupportedModelError

    config = family_config("t5")
    del config.decoder_start_token_id
    with pytest.raises(UnsupportedModelError, match="no config.decoder_start_token_id.*Set it"):
        prepare(config, transformers.AutoModelForSeq2SeqLM, device="meta")
    classifier = prepare(family_config("bart"), transformers.AutoModelForSequenceClassification, device="meta")
    with pytest.raises(UnsupportedModelError, match="encoder-decoder with a sequence-classification head; hfpipe "
                       r"runs bart only as a sequence-to-sequence LM \(BartForConditionalGeneration\): load it with "
                       "AutoModelForSeq2SeqLM"):
        classifier.layers()
    # an encoder-decoder's class without the encoder + decoder (a decoder alone, an encoder + classifier)
    with pytest.raises(UnsupportedModelError, match=r"BartForCausalLM lacks model.encoder, model.decoder or "
                       r"model.shared; hfpipe runs bart only as a sequence-to-sequence LM"):
        prepare(family_config("bart"), transformers.AutoModelForCausalLM, device="meta")
    with pytest.raises(UnsupportedModelError, match="T5ForTokenClassification lacks encoder, decoder or shared"):
        prepare(family_config("t5"), transformers.AutoModelForTokenClassification, device="meta")


def test_encoder_decoder_and_decoder_tasks_swapped(tmp_path):
    """A T5 folder given to a decoder task (finetune_causal_lm.py loads AutoModelForCausalLM) and a Llama given as
    a seq2seq LM: one line saying which class to use instead."""
    import transformers

    from hfpipe.core.builder import prepare
    from hfpipe.core.meta import UnsupportedModelError

    config = family_config("t5", architectures=["T5ForConditionalGeneration"])
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedModelError, match=r"AutoModelForCausalLM has no model for config type T5Config "
                       r"\(model_type='t5'\); it is an encoder-decoder, which hfpipe runs as AutoModelForSeq2SeqLM "
                       r"only \(summarization / translation: recipes/finetune_summarization.py"):
        prepare(str(tmp_path / "t5"), transformers.AutoModelForCausalLM, device="meta")
    with pytest.raises(UnsupportedModelError, match=r"AutoModelForSeq2SeqLM has no model for config type LlamaConfig "
                       r"\(model_type='llama'\); it is not an encoder-decoder .*: a decoder-only model runs as "
                       "AutoModelForCausalLM"):
        prepare(family_config("llama"), transformers.AutoModelForSeq2SeqLM, device="meta")


def _t2t(tmp_path, model_type="t5", **data):
    from hfpipe.tasks.base import ModelArguments
    from hfpipe.tasks.decoder import TOKENIZER_DIR
    from hfpipe.tasks.text2text import Text2TextDataArguments, Text2TextTask, build_text2text

    config = family_config(model_type, vocab_size=1000)
    config.save_pretrained(tmp_path / model_type)
    task = Text2TextTask(Text2TextDataArguments(max_train_samples=4, max_eval_samples=4, **data))
    raw = task.load_raw()
    _, tok = build_text2text(task, raw, ModelArguments(str(tmp_path / model_type), TOKENIZER_DIR), 0)
    return task, raw, tok


def test_seq2seq_features_and_bad_input(tmp_path):
    """Source (with --source_prefix) to the encoder, target + EOS as labels, decoder inputs = labels shifted right
    behind decoder_start_token_id; sources --max_seq_length wide, the decoder side --max_target_length wide (eval:
    --val_max_target_length), kept so by the task's collator; too-long targets / sources refused."""
    task, raw, tok = _t2t(tmp_path, source_prefix="summarize : ", max_target_length=12, val_max_target_length=16)
    assert task.encoder_decoder and task.auto_class.__name__ == "AutoModelForSeq2SeqLM"
    train, evald = task.prepare(tok, raw, 48)
    row = train[0]
    assert len(row["input_ids"]) == len(row["attention_mask"]) == 48
    assert len(row["labels"]) == len(row["decoder_input_ids"]) == len(row["decoder_attention_mask"]) == 12
    assert len(evald[0]["labels"]) == len(evald[0]["decoder_input_ids"]) == 16
    batch = task.data_collator(tok, 48)([train[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 48) and batch["labels"].shape == batch["decoder_input_ids"].shape == (4, 12)
    assert tok.decode(row["input_ids"], skip_special_tokens=True).startswith("summarize : ")
    n = sum(row["decoder_attention_mask"])
    assert row["labels"][n - 1] == tok.eos_token_id and row["labels"][n] == -100
    assert row["decoder_input_ids"][0] == 0 and row["decoder_input_ids"][1:n] == row["labels"][:n - 1]
    assert tok.decode(row["labels"][:n], skip_special_tokens=True) == raw["train"][0]["target"]
    with pytest.raises(ValueError, match="> --max_target_length=3.*--truncate_targets"):
        task.encode_seq2seq(tok, raw["train"], 48, 3)
    bart, raw, tok = _t2t(tmp_path, "bart", max_source_length=100)
    with pytest.raises(ValueError, match="--max_source_length=100 exceeds the model's 64 source positions"):
        bart.prepare(tok, raw, 128)
    with pytest.raises(ValueError, match="neither a decoder nor an encoder-decoder"):
        _t2t(tmp_path, "bert")
    from hfpipe.tasks.text2text import Text2TextDataArguments, Text2TextTask

    with pytest.raises(ValueError, match="--num_beams=4: beam search"):
        Text2TextTask(Text2TextDataArguments(num_beams=4))


def test_t5_tables_initialised_from_config():
    """Built from a config (no weights), T5's shared table and relative-position tables get HF's init (std
    ``initializer_factor`` and ``d_model ** -0.5``): both sit in init branches of their parent modules in HF, so on
    their own they were left as uninitialised memory, and a T5 trained from scratch did not learn."""
    import transformers

    from hfpipe.core.builder import prepare

    b = prepare(family_config("t5"), transformers.AutoModelForSeq2SeqLM)
    infos = b.layers()
    embed, bias = infos[0].spec.build(), infos[2].spec.build()
    assert float(embed.embed.weight.std()) == pytest.approx(1.0, rel=0.1)
    assert float(bias.relative_attention_bias.weight.std()) == pytest.approx(32 ** -0.5, rel=0.3)
    block = infos[3].spec.build().layer  # T5Attention's branch: q ~ (d_model * d_kv) ** -0.5, not the Linear default
    assert float(block.layer[0].SelfAttention.q.weight.std()) == pytest.approx((32 * 8) ** -0.5, rel=0.2)
    assert float(block.layer[1].DenseReluDense.wo.weight.std()) == pytest.approx(64 ** -0.5, rel=0.2)


# ------------------------------------------------------------------------------------------------------ round trips
def _untied_t5_folder(folder):
    """A T5 v1.1 folder as the Hub's (Flan-)T5 v1.1 / mT5 checkpoints are: ``lm_head.weight`` stored beside, and
    different from, ``shared.weight`` (transformers 5 builds every T5 tied; ``from_pretrained`` unties such files)."""
    from safetensors.torch import save_file
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    config = family_config("t5", **T5_V11, architectures=["T5ForConditionalGeneration"])
    state = {k: v.clone().contiguous() for k, v in T5ForConditionalGeneration(config).state_dict().items()
             if not k.endswith("embed_tokens.weight")}
    state["lm_head.weight"] = torch.randn_like(state["shared.weight"]) * 0.1
    folder.mkdir()
    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return T5ForConditionalGeneration.from_pretrained(folder).eval()


@pytest.mark.parametrize("model_type", ["t5-v1.1-untied", "bart"])
def test_convert_export_round_trip(tmp_path, model_type):
    """HF folder -> ``convert`` (2 stages) -> ``export``: ``from_pretrained`` of the export is HF's model, every
    tensor and the logits bit for bit. T5 v1.1's stored LM head stays its own (the untied Seq2SeqHead layer; before,
    the pipeline silently used the shared table as the head)."""
    from transformers import AutoModelForSeq2SeqLM

    from hfpipe.checkpoint import convert, export

    folder = tmp_path / "hf"
    if model_type == "bart":
        torch.manual_seed(0)
        hf = AutoModelForSeq2SeqLM.from_config(family_config("bart"))
        hf.save_pretrained(folder)
        hf.eval()
    else:
        hf = _untied_t5_folder(folder)
        assert hf.lm_head.weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()
    manifest = convert(folder, tmp_path / "ckpt", num_stages=2, progress=False)
    head = manifest["layers"][-1]["name"]
    assert head == ("TiedHead" if model_type == "bart" else "Seq2SeqHead"), manifest["layers"][-1]
    assert manifest["missing_keys"] == [] and manifest["unused_keys"] == []
    out = AutoModelForSeq2SeqLM.from_pretrained(export(tmp_path / "ckpt", tmp_path / "out", progress=False)).eval()
    theirs = dict(out.state_dict())
    for name, t in hf.state_dict().items():
        assert torch.equal(t, theirs[name]), name
    tied = out.lm_head.weight.data_ptr() == out.get_input_embeddings().weight.data_ptr()
    assert tied == (model_type == "bart")
    ids, mask = _sources()
    dec = torch.randint(3, 128, (4, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(out(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, rtol=0, atol=0)
