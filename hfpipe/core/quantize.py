"""QLoRA through the pipeline: each stage's own frozen linear weights in 4 bits (bitsandbytes), quantised while the
stage loads them.

Why a module of its own: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` loads a
whole model on one process; a pipeline rank builds only its own layers (``hfpipe.core.meta.materialize``), so the
same steps run per layer instead, with transformers' and PEFT's own pieces:

* :func:`plan` decides once, on the meta model, which linear modules stay in full precision: transformers' own rule
  (``HfQuantizer.get_modules_to_not_convert``: the output embedding / last module, tied weights,
  ``llm_int8_skip_modules``, the class's ``_keep_in_fp32_modules``) plus the modules PEFT trains in full
  (``modules_to_save``, e.g. the ``score`` / ``classifier`` head: a 4-bit weight cannot be trained).
* :func:`quantize` runs on each materialised layer before LoRA is injected: transformers'
  ``replace_with_bnb_linear`` swaps its ``nn.Linear`` / ``Conv1D`` modules for ``bnb.nn.Linear4bit``, and each
  weight becomes a ``bnb.nn.Params4bit`` quantised by bitsandbytes from the layer's own loaded weight (what
  transformers' ``Bnb4bitQuantize`` does per checkpoint tensor), on this rank's accelerator when there is one; then
  ``peft.prepare_model_for_kbit_training`` (no gradient checkpointing: that is the pipeline's
  ``activation_checkpoint_interval``) freezes the layer and casts its other half-precision parameters to fp32.
  PEFT's LoRA then wraps the ``Linear4bit`` modules with its own ``lora.bnb.Linear4bit`` (``hfpipe.core.lora``).

A rank never holds another stage's weights, and never the full-precision model: one layer's weights at a time, as
they load. The only hand-written piece is the per-layer loop (a layer is no ``PreTrainedModel``, which transformers'
loader needs).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn

#: bitsandbytes' 4-bit block size (``quantize_4bit``) and, with double quantisation, the block size of the
#: 8-bit quantised absmax (``quantize_blockwise``)
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


class QuantizationError(ValueError):
    """A 4-bit request that cannot run (no bitsandbytes, an unsupported config, no adapter to train)."""


def qlora_config():
    """The QLoRA recipe as a ``transformers.BitsAndBytesConfig``: nf4, double quantisation, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def resolve_config(load_in_4bit: bool = False, quantization_config=None):
    """The ``BitsAndBytesConfig`` that ``load_in_4bit`` / ``quantization_config`` ask for (``None``: no
    quantisation); ``load_in_4bit=True`` alone is :func:`qlora_config`. A dict is read by
    ``BitsAndBytesConfig.from_dict``; 8-bit and other quantisation methods are refused."""
    if quantization_config is None:
        return qlora_config() if load_in_4bit else None
    from transformers import BitsAndBytesConfig

    if isinstance(quantization_config, dict):
        quantization_config = BitsAndBytesConfig.from_dict(quantization_config)
    if not isinstance(quantization_config, BitsAndBytesConfig) or not quantization_config.load_in_4bit:
        raise QuantizationError(f"quantization_config={quantization_config!r}; hfpipe pipelines quantise with "
                                "bitsandbytes in 4 bits only. Fix: pass BitsAndBytesConfig(load_in_4bit=True, ...) "
                                "or load_in_4bit=True (nf4, double quantisation, bf16 compute).")
    return quantization_config


@dataclass
class QuantPlan:
    """The config and the HF module-name patterns kept in full precision (transformers' matching rule)."""

    config: object  # transformers.BitsAndBytesConfig
    skip: tuple[str, ...]

    def converts(self, full_name: str) -> bool:
        """Whether the linear module at HF name ``full_name`` is stored in 4 bits."""
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(full_name, list(self.skip))


def plan(meta_model: nn.Module, config, lora_plan=None) -> QuantPlan | None:
    """What :func:`quantize` will do with ``config`` (``None``: nothing), decided on the meta task model."""
    if config is None:
        return None
    from transformers.utils import is_bitsandbytes_available

    if not is_bitsandbytes_available():
        raise QuantizationError("load_in_4bit needs bitsandbytes, which is not installed (or finds no backend on "
                                "this machine). Fix: pip install bitsandbytes, or train without --load_in_4bit.")
    if lora_plan is None:
        raise QuantizationError("load_in_4bit quantises the frozen base, which trains only through adapters (QLoRA); "
                                "no LoRA config was given. Fix: add --lora_r R (e.g. 8) or peft_config=LoraConfig(...).")
    from transformers.quantizers.base import HfQuantizer

    skip = HfQuantizer.get_modules_to_not_convert(meta_model, config.llm_int8_skip_modules,
                                                  getattr(meta_model, "_keep_in_fp32_modules", None))
    skip = sorted(set(skip) | set(lora_plan.saved))
    return QuantPlan(config, tuple(skip))


def _device(builder) -> torch.device:
    """Where bitsandbytes quantises: this rank's accelerator when there is one (as ``device_map`` puts the weights
    with transformers), else the builder's device."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(builder.device)


def _is_linear(module: nn.Module) -> bool:
    """What transformers' ``replace_with_bnb_linear`` converts: a plain ``nn.Linear`` or a ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return type(module) is nn.Linear or isinstance(module, Conv1D)


def _linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if n and _is_linear(m)]


def quantize(module: nn.Module, builder, hf_prefix: str) -> nn.Module:
    """Apply the builder's 4-bit plan to one materialised layer whose HF names start with ``hf_prefix`` (before
    LoRA wraps it): its linear modules become ``bnb.nn.Linear4bit`` holding their own weights quantised, the layer is
    frozen and its other fp16/bf16 parameters cast to fp32 (``prepare_model_for_kbit_training``). No plan, or a
    meta-device builder (names and shapes only): ``module`` unchanged."""
    qplan = getattr(builder, "quantization", None)
    if qplan is None or torch.device(builder.device).type == "meta":
        return module
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.pytorch_utils import Conv1D

    linears = _linears(module)
    convert = {n: m for n, m in linears if qplan.converts(hf_prefix + n)}
    if convert:
        # exact local names of the linears that stay (a regex anchored at both ends under transformers' rule)
        keep = [re.escape(n) + "$" for n, _ in linears if n not in convert]
        replace_with_bnb_linear(module, modules_to_not_convert=keep, quantization_config=qplan.config)
        device = _device(builder)
        for name, old in convert.items():
            new = module.get_submodule(name)
            value = old.weight.data.T if isinstance(old, Conv1D) else old.weight.data  # Conv1D stores (in, out)
            new.weight = bnb.nn.Params4bit(value, requires_grad=False, **new.weight.__dict__).to(device)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.data.to(device), requires_grad=False)
            # bitsandbytes' CPU inference path repacks the weight in place on the first no-grad forward and has no
            # backward; a pipeline alternates evaluation and training, so keep the one layout that does both
            new.support_avx512bf16_for_cpu = False
        # what from_pretrained marks on a 4-bit model: PEFT's LoRA then dispatches its bitsandbytes layer
        # (peft.tuners.lora.bnb.Linear4bit) instead of the plain one around the Linear4bit
        module.is_loaded_in_4bit = True
    prepare_model_for_kbit_training(module, use_gradient_checkpointing=False, auto_clear_cache=False)
    return module


def adapters_in_fp32(module: nn.Module, builder) -> nn.Module:
    """After LoRA wrapped a 4-bit layer: its adapter weights in fp32, as ``get_peft_model`` leaves them
    (``autocast_adapter_dtype``: PEFT's bitsandbytes LoRA layer creates them in the bf16 compute dtype, and
    ``inject_adapter_in_model`` does not cast them back). No 4-bit plan: ``module`` unchanged."""
    if getattr(builder, "quantization", None) is None or torch.device(builder.device).type == "meta":
        return module
    from peft.tuners.tuners_utils import cast_adapter_dtype

    from hfpipe.core.lora import ADAPTER

    cast_adapter_dtype(module, adapter_name=ADAPTER, autocast_adapter_dtype=True)
    return module


# -------------------------------------------------------------------------------------------------- budgeting
def bytes_per_param(config) -> float:
    """Bytes one 4-bit weight costs with its quantisation statistics: 0.5 for the weight, plus one absmax per
    :data:`BLOCKSIZE` weights -- fp32, or with double quantisation 8 bits plus one fp32 per
    :data:`NESTED_BLOCKSIZE` absmax (QLoRA: 4.127 bits per weight)."""
    stats = (1 + 4 / NESTED_BLOCKSIZE) / BLOCKSIZE if config.bnb_4bit_use_double_quant else 4 / BLOCKSIZE
    return 0.5 + stats


def quantized_params(builder, infos=None) -> list[int] | None:
    """Parameters of each layer stored in 4 bits under the builder's plan (``None``: no plan): every layer built on
    the meta device as its stage builds it, the weights of its linear modules that :meth:`QuantPlan.converts`."""
    qplan = getattr(builder, "quantization", None)
    if qplan is None:
        return None
    if torch.device(builder.device).type != "meta":
        raise ValueError(f"builder.device={builder.device!r}; counting 4-bit parameters builds every layer, so it "
                         "expects a meta-device builder. Fix: prepare(..., device='meta').")
    from hfpipe.core.lora import is_adapter_key

    counts = []
    for info in infos if infos is not None else builder.layers():
        layer = info.spec.build()
        names = layer.hf_names() if hasattr(layer, "hf_names") else {}
        n = 0
        for local, module in _linears(layer):  # a LoRA-wrapped linear's base_layer; its lora_A/B are adapter keys
            hf = names.get(local + ".weight")
            if hf is not None and not is_adapter_key(hf) and qplan.converts(hf[: -len(".weight")]):
                n += module.weight.numel()
        counts.append(n)
    return counts


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` (a pipeline stage, a layer) holds 4-bit weights."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(p, bnb.nn.Params4bit) for p in module.parameters())
