"""LoRA adapters folded into the base model's linear layers for inference, reversibly.

PEFT runs a LoRA adapter as a wrapper around every targeted linear layer: the base matmul, two
low-rank matmuls and Python dispatch per layer, on every forward pass. Folding computes each
layer's ``W + scale * B @ A`` once (float32 models only, see :func:`can_fold`) and swaps it in as the
layer's weight, so decoding with the adapter costs what decoding without it does. The original
weight tensors are kept on the model untouched and swapped back by :func:`unfold_lora`: switching
adapters never accumulates rounding in the base weights. The price is memory: while an adapter
is folded, every weight it changes is held twice.

The folded state belongs to the model (several chat models may share one), so folding or
unfolding on any of them changes the weights all of them decode with.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear

__all__ = ["can_fold", "fold_lora", "folded", "unfold_lora"]

_ORIGINALS = "_selftune_unfolded_weights"  # attribute of the base model: [(linear layer, its own weight)]


def can_fold(adapter: PeftModel) -> bool:
    """Whether ``adapter`` is plain LoRA on float32 linear layers only, which folds into their weights
    up to float32 rounding. bfloat16 weights are not folded: rounding ``W + update`` to bfloat16 loses
    much of a trained update (measured in ``docs/tuning.md``)."""
    config = adapter.active_peft_config
    if not isinstance(config, LoraConfig) or config.use_dora or config.modules_to_save or config.lora_bias:
        return False
    layers = [module for module in adapter.modules() if hasattr(module, "lora_A")]
    return bool(layers) and all(
        isinstance(module, LoraLinear) and not module.fan_in_fan_out
        and module.get_base_layer().weight.dtype == torch.float32 for module in layers)


def fold_lora(adapter: PeftModel) -> torch.nn.Module:
    """Fold ``adapter``'s active LoRA weights into the base model it wraps, take the LoRA layers out
    again, and return the base model; ValueError where :func:`can_fold` is false."""
    if not can_fold(adapter):
        raise ValueError("only plain LoRA adapters on float32 linear layers can be folded into the weights")
    name = adapter.active_adapter
    with torch.no_grad():
        folded_weights = []
        for module in adapter.modules():
            if isinstance(module, LoraLinear) and name in module.lora_A:
                base = module.get_base_layer()
                delta = module.get_delta_weight(name)
                folded_weights.append((base, base.weight + delta))
    model = adapter.base_model.unload()  # the original linear layers, with their own weights, back in place
    originals = []
    for layer, weight in folded_weights:
        originals.append((layer, layer.weight))
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    setattr(model, _ORIGINALS, originals)
    return model


def folded(model: torch.nn.Module) -> bool:
    """Whether ``model`` decodes with a folded adapter's weights."""
    return bool(getattr(model, _ORIGINALS, None))


def unfold_lora(model: torch.nn.Module) -> None:
    """Put the base weights back where :func:`fold_lora` swapped them out (nothing if none was folded)."""
    for layer, weight in getattr(model, _ORIGINALS, None) or []:
        layer.weight = weight
    if hasattr(model, _ORIGINALS):
        delattr(model, _ORIGINALS)
