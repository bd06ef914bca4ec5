"""hfpipe leans on DeepSpeed and transformers internals; these tests fail loudly, naming the internal, when an
upgrade changes one of them (setup.py pins deepspeed 0.19.x and transformers 5.x)."""

import inspect
import re

import deepspeed
import pytest
import transformers
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.engine import PipelineEngine
from transformers import masking_utils


def _params(fn):
    return list(inspect.signature(fn).parameters)


def _version(v):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def test_installed_versions_are_in_the_pinned_ranges():
    assert _version(deepspeed.__version__)[:2] == (0, 19), (
        f"deepspeed {deepspeed.__version__} is outside the 0.19.x range hfpipe is tested with (setup.py)")
    assert _version(transformers.__version__)[0] == 5, (
        f"transformers {transformers.__version__} is outside the 5.x range hfpipe is tested with (setup.py)")


def test_pipeline_module_internals():
    msg = "DeepSpeed changed PipelineModule internals that hfpipe.pipeline.HFPipelineModule overrides: "
    assert _params(PipelineModule._partition_layers) == ["self", "method"], msg + "_partition_layers(self, method)"
    src = inspect.getsource(PipelineModule.__init__)
    assert "self._partition_layers(method=partition_method)" in src, msg + "__init__ no longer calls _partition_layers"
    for attr in ("_build", "_set_bounds", "forward_funcs", "tied_modules", "_local_start", "stage_id", "num_stages"):
        assert attr in inspect.getsource(PipelineModule), msg + attr
    assert _params(PipelineModule._is_checkpointable) == ["self", "funcs"], msg + "_is_checkpointable(self, funcs)"
    assert "self._is_checkpointable(funcs)" in inspect.getsource(PipelineModule), msg + "_is_checkpointable not called"
    assert _params(TiedLayerSpec.__init__)[:3] == ["self", "key", "typename"], msg + "TiedLayerSpec(key, typename)"
    for kw in ("forward_fn", "tied_weight_attr"):
        assert kw in _params(TiedLayerSpec.__init__), msg + f"TiedLayerSpec({kw}=)"
    # tied layers with a forward_fn are not saved in layer files: hfpipe relies on the embedding side saving it
    assert "hasattr(layer, 'state_dict')" in inspect.getsource(PipelineModule.save_state_dict), msg + "save_state_dict"


def test_pipeline_engine_eval_batch_returns_outputs():
    params = _params(PipelineEngine.eval_batch)
    for kw in ("compute_loss", "reduce_output", "num_micro_batches"):
        assert kw in params, f"PipelineEngine.eval_batch lost `{kw}=`; hfpipe's evaluation gathers raw outputs with it"


@pytest.mark.parametrize("name", ["create_causal_mask", "create_sliding_window_causal_mask",
                                  "create_chunked_causal_mask", "create_bidirectional_mask"])
def test_masking_utils_builders(name):
    fn = getattr(masking_utils, name, None)
    assert fn is not None, f"transformers.masking_utils.{name} is gone; hfpipe.core.adapters.base builds block masks with it"
    params = _params(fn)
    for kw in ("config", "inputs_embeds", "attention_mask"):
        assert kw in params, f"masking_utils.{name} lost `{kw}=`"
    if name != "create_bidirectional_mask":
        assert "cache" in params and "position_ids" in params, f"masking_utils.{name}: cache/position_ids"


def test_sequence_classification_pools_on_pad_token_id():
    src = inspect.getsource(transformers.modeling_layers.GenericForSequenceClassification.forward)
    assert "pad_token_id" in src and "input_ids" in src, (
        "GenericForSequenceClassification no longer pools on the last non-pad input id; hfpipe carries input_ids to "
        "the last stage for that")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma", "gpt_neox"])
def test_base_model_pp_plan_declared(model_type):
    config = transformers.AutoConfig.for_model(model_type)
    plan = getattr(config, "base_model_pp_plan", None)
    assert plan, f"{model_type} no longer declares base_model_pp_plan; hfpipe's automatic adapter needs it"
    assert "layers" in plan, f"{model_type}'s base_model_pp_plan has no 'layers' entry: {list(plan)}"


def test_loss_functions():
    from transformers.loss import loss_utils

    for name in ("ForCausalLMLoss", "ForSequenceClassificationLoss", "ForTokenClassification", "fixed_cross_entropy"):
        assert hasattr(loss_utils, name), f"transformers.loss.loss_utils.{name} is gone; hfpipe.core.heads uses it"
    assert "num_items_in_batch" in _params(loss_utils.fixed_cross_entropy)
