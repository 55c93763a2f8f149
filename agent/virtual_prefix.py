"""Prompt-learning adapters decoded as a key/value-cache prefix.

Prompt tuning puts learned embeddings in front of every prompt; prefix tuning puts learned
keys and values in front of it in every layer. Either way, what the model sees is a fixed
prefix of ``length`` positions before the first prompt token. :class:`VirtualPrefix` writes
that prefix into a :class:`~transformers.DynamicCache` and the prompt's token ids get one
placeholder id per virtual position, so the prompt is decoded with the base model exactly as
PEFT's forward pass (what training optimises) computes it, and prefix reuse and drafting work
as without an adapter. PEFT's own ``generate`` is not used: with this transformers version it
drops prefix tuning's keys/values and drifts on prompt tuning (``docs/tuning.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel, PeftType
from transformers import DynamicCache

__all__ = ["VirtualPrefix"]


@dataclass(frozen=True)
class VirtualPrefix:
    """The virtual positions of one prompt-learning adapter: embeddings or per-layer keys/values."""

    length: int
    embeddings: torch.Tensor | None = None  # prompt tuning: (1, length, hidden)
    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # prefix tuning: per layer (1, heads, length, dim)

    @classmethod
    def of(cls, adapter: PeftModel, dtype: torch.dtype) -> VirtualPrefix:
        """The prefix of ``adapter``'s active prompt-learning config; ValueError for kinds not handled."""
        config = adapter.active_peft_config
        with torch.inference_mode():
            prompt = adapter.get_prompt(batch_size=1)
        if config.peft_type == PeftType.PROMPT_TUNING:
            return cls(length=config.num_virtual_tokens, embeddings=prompt.to(dtype))
        if config.peft_type == PeftType.PREFIX_TUNING and isinstance(prompt, DynamicCache):
            layers = tuple((layer.keys.to(dtype), layer.values.to(dtype)) for layer in prompt.layers)
            return cls(length=config.num_virtual_tokens, key_values=layers)
        raise ValueError(f"{config.peft_type.value} adapters are not supported; use LoRA, prompt or prefix tuning")

    def placeholders(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``prompt_ids`` (1, n) behind one placeholder id per virtual position.

        The placeholders are never embedded: :meth:`fill` always puts the virtual positions into
        the cache, so decoding, prefix matching and the grammar see one consistent sequence.
        """
        return torch.cat([torch.zeros((1, self.length), dtype=prompt_ids.dtype), prompt_ids], dim=1)

    def fill(self, model: torch.nn.Module, cache: DynamicCache | None) -> DynamicCache:
        """``cache`` if it already holds the virtual positions (a prefix-cache hit), else a new cache
        holding exactly them, computed with the base ``model``."""
        if cache is not None and cache.get_seq_length() >= self.length:
            return cache
        cache = DynamicCache()
        if self.embeddings is not None:
            with torch.inference_mode():
                model(inputs_embeds=self.embeddings, cache=cache, use_cache=True, logits_to_keep=1)
        for layer, (keys, values) in enumerate(self.key_values):
            cache.update(keys, values, layer)
        return cache
