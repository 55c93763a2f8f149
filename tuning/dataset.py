"""Supervised fine-tuning examples from stored episodes.

One example per episode: the transcript rendered exactly as the agent prompts
the model (``to_prompt_messages`` + the tokenizer's chat template), with loss
only on the assistant turns marked ``trainable`` (content plus the template's
end-of-turn tokens, so the model learns to stop).

Turn spans are found by rendering prefixes: the conversation up to a turn with
the generation prompt must tokenize to a prefix of the conversation through that
turn, and every rendering must be a prefix of the next. Templates that rewrite
earlier turns break this and raise :class:`ChatTemplateError`.

Length policy: an example keeps the earliest turns and ends after the last
whole trainable turn that fits in ``max_seq_len`` (later turns are cut, history
is never cut from the left). Episodes whose first trainable turn does not fit,
or that have no trainable turn, give no example; counts are logged.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, model_validator

from selftune.agent.transcript import to_prompt_messages
from selftune.memory.records import ChatMessage, Episode

__all__ = ["IGNORE_INDEX", "ChatTemplateError", "SFTExample", "anchor_examples", "build_examples", "collate",
           "training_fingerprint"]

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The chat template does not render conversations prefix-stably."""


class SFTExample(BaseModel):
    """Token ids of one episode and its labels (``IGNORE_INDEX`` outside trained turns)."""

    episode_id: str
    input_ids: list[int]
    labels: list[int]
    trainable_turns: int
    cut_turns: int = 0  # trainable turns dropped because they did not fit max_seq_len
    distill: bool = False  # a replay-file conversation: also pulled towards the base model (tuning.kl_weight)
    anchor: bool = False  # a passage of plain prose: only pulled towards the base model, never trained on

    @model_validator(mode="after")
    def _same_length(self) -> SFTExample:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels differ in length")
        return self


def _tokens(tokenizer: Any, transcript: list[ChatMessage], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        to_prompt_messages(transcript), tokenize=False, add_generation_prompt=generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _require_prefix(prefix: list[int], ids: list[int], what: str, episode_id: str) -> None:
    if ids[: len(prefix)] != prefix:
        raise ChatTemplateError(
            f"episode {episode_id}: {what} is not a token prefix of the longer rendering; "
            "this chat template rewrites earlier turns, so assistant spans cannot be located"
        )


def _spans(episode: Episode, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids through the last trainable turn and the (start, end) span of each trainable turn."""
    transcript = episode.messages
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for index, step in enumerate(episode.steps):
        if not (step.trainable and step.message.role == "assistant"):
            continue
        prompt = _tokens(tokenizer, transcript[:index], generation_prompt=True)
        through = _tokens(tokenizer, transcript[: index + 1], generation_prompt=False)
        _require_prefix(ids, prompt, f"rendering before turn {index}", episode.id)
        _require_prefix(prompt, through, f"generation prompt of turn {index}", episode.id)
        if len(through) > len(prompt):
            spans.append((len(prompt), len(through)))
        ids = through
    return ids, spans


def build_examples(episodes: list[Episode], tokenizer: Any, max_seq_len: int) -> list[SFTExample]:
    """One example per episode with a trainable assistant turn (see the module doc for length policy)."""
    examples: list[SFTExample] = []
    untrainable = too_long = shortened = 0
    for episode in episodes:
        ids, spans = _spans(episode, tokenizer)
        kept = [span for span in spans if span[1] <= max_seq_len]
        if not spans:
            untrainable += 1
            continue
        if not kept:
            too_long += 1
            continue
        shortened += len(kept) < len(spans)
        ids = ids[: kept[-1][1]]
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in kept:
            labels[start:end] = ids[start:end]
        examples.append(
            SFTExample(
                episode_id=episode.id, input_ids=ids, labels=labels,
                trainable_turns=len(kept), cut_turns=len(spans) - len(kept), distill=episode.origin == "replay",
            )
        )
    log.info(
        "built %d examples from %d episodes: %d without trainable turns, %d dropped "
        "(first trainable turn beyond max_seq_len=%d), %d shortened",
        len(examples), len(episodes), untrainable, too_long, max_seq_len, shortened,
    )
    return examples


def anchor_examples(path: Path | None, tokenizer: Any, max_tokens: int) -> list[SFTExample]:
    """One example per blank-line-separated passage of the plain text at ``path`` (no chat template),
    at most ``max_tokens`` long, every token a target: where the trainer holds the candidate's
    next-token distribution to the base model's (``tuning.anchor_file``; None: no passages)."""
    if path is None:
        return []
    passages = [passage.strip() for passage in Path(path).read_text().split("\n\n") if passage.strip()]
    examples = []
    for number, passage in enumerate(passages):
        ids = list(tokenizer(passage, add_special_tokens=False)["input_ids"])[:max_tokens]
        if len(ids) >= 2:
            examples.append(SFTExample(episode_id=f"anchor-{number}", input_ids=ids, labels=ids,
                                       trainable_turns=0, anchor=True))
    return examples


def collate(batch: list[SFTExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``labels`` (padded with ``IGNORE_INDEX``) and ``attention_mask``."""
    width = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def training_fingerprint(examples: list[SFTExample], *context: str) -> str:
    """A hash of what a training run learns from: every example's tokens, labels and distillation
    flag, in order, plus ``context`` (settings, starting point). Equal fingerprints train equal adapters."""
    digest = hashlib.sha256()
    for part in context:
        digest.update(part.encode() + b"\0")
    for example in examples:
        digest.update(example.model_dump_json(include={"input_ids", "labels", "distill"}).encode()
                      + (b"anchor" if example.anchor else b"") + b"\0")
    return digest.hexdigest()
