"""Greedy or sampled decoding (constrained or free) with fewer forward passes and the same output
(greedy) or distribution (sampled).

On a CPU a forward pass over a handful of tokens costs little more than over one, so
tokens that can be guessed are checked together instead of generated one by one:

* **Jump-forward**: after each chosen token, the text the tool-call grammar forces next
  (JSON punctuation, keys, the rest of a tool name once its prefix is unique) is spelled in
  tokens (:meth:`ToolCallLogitsProcessor.forced_after`).
* **Prompt lookup** (optional): argument values are often copied from the prompt; when the
  last ``lookup_ngram`` tokens occurred earlier, the tokens that followed them there are
  guessed next.

The guesses are fed with the chosen token in one pass and verified position by position
through the same logits processor plain decoding uses: at each position the token is chosen
as plain decoding chooses it (the masked argmax, or a draw from the masked distribution at
``temperature``), a guess is kept only where that choice equals it, the first mismatch is
replaced by the choice, and the KV cache is cropped back to the kept tokens. Every kept token
is therefore exactly the token plain decoding (under the grammar, when there is one) picks
from the same logits, and sampling draws once per token as ``generate`` does (a guess is a
point-mass draft: accepting it when the draw equals it is exact speculative sampling). Only
rounding can differ, as between any two batch shapes of the same model (logits within ~1e-4
in float32: the tests get ``generate``'s greedy tokens, and its samples under the same seed;
greedy steps are compared on real prompts in ``selftune bench inference``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from selftune.agent.constrained import ToolCallLogitsProcessor

__all__ = ["DecodeStats", "drafted_decode", "lookup_draft"]


@dataclass
class DecodeStats:
    """Work done by one :func:`drafted_decode` call."""

    forward_passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0


def lookup_draft(ids: list[int], ngram: int, limit: int) -> list[int]:
    """Up to ``limit`` tokens that followed the latest earlier occurrence of ``ids``'s last ``ngram``."""
    if limit <= 0 or ngram <= 0 or len(ids) <= ngram:
        return []
    tail = ids[-ngram:]
    for start in range(len(ids) - ngram - 1, -1, -1):
        if ids[start:start + ngram] == tail:
            return ids[start + ngram:start + ngram + limit]
    return []


def drafted_decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    processor: ToolCallLogitsProcessor | None,
    max_new_tokens: int,
    stop_token_ids: set[int],
    cache: DynamicCache | None = None,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    jump_forward: bool = True,
    lookup_tokens: int = 0,
    lookup_ngram: int = 3,
) -> tuple[torch.Tensor, DecodeStats]:
    """Decoding of one row, under ``processor`` or free (None): ``(prompt + new tokens, stats)``.

    ``input_ids``: ``(1, n)``. ``temperature`` 0 decodes greedily; above 0 it samples as
    ``generate(do_sample=True, temperature=..., top_k=..., top_p=...)`` does (the processor, then
    transformers' warpers, one ``torch.multinomial`` draw per token from the global generator;
    ``top_k`` 0 and ``top_p`` 1 keep every token). ``cache`` may hold keys/values
    for a prefix of the prompt (a prefix-cache hit); afterwards it holds every token but the last,
    as after ``model.generate``. ``jump_forward`` drafts grammar-forced tokens (with a processor),
    ``lookup_tokens`` up to that many prompt-lookup tokens after them.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("drafted_decode handles one row")
    if temperature < 0:
        raise ValueError("temperature must be 0 (greedy) or positive")
    warpers = _sampling_warpers(temperature, top_k, top_p)
    cache = cache if cache is not None else DynamicCache()
    stats = DecodeStats()
    ids: list[int] = input_ids[0].tolist()
    prompt_len = len(ids)
    cached = cache.get_seq_length()
    if not 0 <= cached < prompt_len:
        raise ValueError("the cache must hold a proper prefix of the prompt")

    def forward(tokens: list[int], keep: int) -> torch.Tensor:
        stats.forward_passes += 1
        batch = torch.tensor([tokens], dtype=torch.long, device=input_ids.device)
        logits = model(input_ids=batch, cache=cache, use_cache=True, logits_to_keep=keep).logits
        return logits[0].float()

    def pick(logits: torch.Tensor) -> int:
        scores = logits[None]
        if processor is None and temperature == 0:
            return int(scores.argmax(-1))
        context = torch.tensor([ids], dtype=torch.long)
        if processor is not None:  # it masks in place
            scores = processor(context, scores.clone())
        if temperature == 0:
            return int(scores.argmax(-1))
        return int(torch.multinomial(torch.softmax(warpers(context, scores), dim=-1), num_samples=1))

    token = pick(forward(ids[cached:], 1)[-1])
    while True:
        ids.append(token)
        generated = len(ids) - prompt_len
        if token in stop_token_ids or generated >= max_new_tokens:
            break
        room = max_new_tokens - generated
        draft = processor.forced_after(token)[:room] if jump_forward and processor is not None else []
        if lookup_tokens and len(draft) < room:
            draft += lookup_draft(ids + draft, lookup_ngram, min(lookup_tokens, room - len(draft)))
        stats.drafted_tokens += len(draft)
        logits = forward([token] + draft, len(draft) + 1)
        token, ended = pick(logits[0]), False
        for position, guess in enumerate(draft, start=1):
            if token != guess:
                break
            stats.accepted_tokens += 1
            ids.append(guess)
            if guess in stop_token_ids or len(ids) - prompt_len >= max_new_tokens:
                ended = True
                break
            token = pick(logits[position])
        # Keep the keys/values of the kept tokens (all but the last one once decoding ends).
        surplus = cache.get_seq_length() - (len(ids) - 1 if ended else len(ids))
        if surplus:
            cache.crop(-surplus)  # a negative count: tokens to drop
        if ended:
            break
    return torch.tensor([ids], dtype=torch.long, device=input_ids.device), stats


def _sampling_warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """transformers' sampling warpers in ``generate``'s order (temperature, top-k, top-p)."""
    warpers = LogitsProcessorList()
    if temperature > 0 and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers
