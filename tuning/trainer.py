"""Train one PEFT adapter on SFT examples and save it atomically.

The caller's base model is wrapped for training and handed back pristine
afterwards (same weights, modules, ``requires_grad`` flags and train/eval mode)
whether training succeeds, fails or is interrupted: the agent keeps serving it.
The adapter appears at ``out_dir`` only when training and saving both succeed.
"""

from __future__ import annotations

import math
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, PeftType, get_peft_model, load_peft_weights, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTuner
from pydantic import BaseModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from selftune.agent.folded_lora import folded
from selftune.settings import TuningSettings
from selftune.tuning.dataset import IGNORE_INDEX, SFTExample, collate
from selftune.tuning.methods import get_method

__all__ = ["TrainResult", "train_adapter"]

MAX_GRAD_NORM = 1.0


class TrainResult(BaseModel):
    method: str
    steps: int
    epochs: float  # optimizer steps / steps per epoch
    losses: list[float]  # one per optimizer step
    train_seconds: float
    examples: int
    tokens: int  # non-padding tokens fed through the model
    trainable_params: int
    total_params: int
    adapter_bytes: int
    peak_rss_mb: float  # peak resident memory of this process so far
    learning_rate: float
    dtype: str | None = None  # the weights' dtype while training (None in reports written before it was kept)


def _batches(examples: list[SFTExample], batch_size: int, seed: int) -> Iterator[list[SFTExample]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


def _target_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss is taken on (position ``t`` predicts label ``t + 1``)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is a target in any row: the only logits the loss reads."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()[:, 0]


def _prepended_positions(model: PeftModel) -> int:
    """Positions prompt tuning puts in front of every sequence (0 for the other methods)."""
    config = model.active_peft_config
    return config.num_virtual_tokens if config.peft_type == PeftType.PROMPT_TUNING else 0


def _logits_at(model: torch.nn.Module, inputs: dict[str, torch.Tensor], positions: torch.Tensor,
               offset: int = 0) -> torch.Tensor:
    """``(rows, positions, vocabulary)`` logits at ``positions`` of the input sequence (shifted by
    ``offset`` prepended positions). The language-model head and its gradient run there only, not on
    every prompt token: most of an episode's tokens are prompt, and the head is a fifth of the model's
    multiply-adds."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 logits_to_keep=positions + offset).logits


def _kl_to_base(model: PeftModel, inputs: dict[str, torch.Tensor], positions: torch.Tensor,
                logits: torch.Tensor) -> torch.Tensor:
    """Per row, the summed KL(base || candidate) of the next-token distributions at its target positions;
    ``logits`` are the candidate's at ``positions`` (:func:`_logits_at`). The base distribution comes
    from a second, gradient-free pass over the same inputs with the adapter switched off."""
    with torch.no_grad(), model.disable_adapter():
        base = torch.log_softmax(_logits_at(model, inputs, positions).float(), dim=-1)
    candidate = torch.log_softmax(logits.float(), dim=-1)
    per_position = (base.exp() * (base - candidate)).sum(dim=-1)
    return (per_position * (inputs["labels"][:, positions + 1] != IGNORE_INDEX)).sum(dim=-1)


def _accumulate(model: PeftModel, batch: list[SFTExample], micro_batch_size: int, pad_token_id: int,
                device: torch.device, kl_weight: float = 0.0, anchor_weight: float = 0.0) -> torch.Tensor:
    """Backward over ``batch`` in micro-batches; gradients and the returned loss equal the whole batch's
    token-mean loss: cross-entropy, plus KL to the base model on the tokens of ``distill`` examples
    (x ``kl_weight``) and ``anchor`` examples (x ``anchor_weight``), over the same count of cross-entropy
    targets (``anchor`` examples take no cross-entropy). Only one micro-batch's logits (target
    positions x vocabulary) are alive at a time, which is what bounds peak memory on large vocabularies."""
    micro_batches = [batch[i : i + micro_batch_size] for i in range(0, len(batch), micro_batch_size)]
    collated = [collate(micro, pad_token_id) for micro in micro_batches]
    anchors = [torch.tensor([example.anchor for example in micro]) for micro in micro_batches]
    total_targets = max(1, sum(_target_tokens(inputs["labels"][~anchor])
                               for inputs, anchor in zip(collated, anchors)))
    offset = _prepended_positions(model)
    loss_sum = torch.zeros(())
    for micro, inputs, anchor in zip(micro_batches, collated, anchors):
        positions = _target_positions(inputs["labels"])
        if positions.numel() == 0:
            continue
        inputs = {k: v.to(device) for k, v in inputs.items()}
        positions, anchor = positions.to(device), anchor.to(device)
        logits = _logits_at(model, inputs, positions, offset)
        trained_labels = inputs["labels"][:, positions + 1].masked_fill(anchor[:, None], IGNORE_INDEX)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), trained_labels.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum") / total_targets
        weights = torch.tensor([kl_weight * example.distill + anchor_weight * example.anchor for example in micro],
                               device=device)
        if bool((weights > 0).any()):
            loss = loss + (weights * _kl_to_base(model, inputs, positions, logits)).sum() / total_targets
        loss.backward()
        loss_sum += loss.detach().float().cpu()
    return loss_sum


def _fit(
    model: PeftModel, examples: list[SFTExample], settings: TuningSettings, method: str, lr: float, pad_token_id: int
) -> tuple[list[float], int]:
    """The training loop; returns the loss of every optimizer step and the tokens processed."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    anchors = [example for example in examples if example.anchor]
    examples = [example for example in examples if not example.anchor]
    steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    device = next(model.parameters()).device
    losses: list[float] = []
    tokens = 0
    model.train()
    with tqdm(total=total, desc=f"tuning ({method})", unit="step") as bar:
        for epoch in range(math.ceil(total / steps_per_epoch)):
            for batch in _batches(examples, settings.batch_size, settings.seed + epoch):
                if len(losses) == total:
                    break
                if anchors:  # one passage of prose joins every step, in turn
                    batch = batch + [anchors[len(losses) % len(anchors)]]
                loss = _accumulate(model, batch, settings.micro_batch_size, pad_token_id, device,
                                   settings.kl_weight, settings.anchor_weight)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {len(losses) + 1}")
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                tokens += sum(len(example.input_ids) for example in batch)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses, tokens


@torch.no_grad()
def _scale_lora_update(model: PeftModel, scale: float) -> None:
    """Multiply every LoRA update ``B @ A`` by ``scale`` (through ``B``): weight-space interpolation
    between the base model (0) and the trained adapter (1)."""
    if scale != 1.0:
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)


def _save_atomically(model: PeftModel, out_dir: Path) -> int:
    """Save into a temp dir beside ``out_dir`` and rename it into place; returns the adapter's size."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, save_embedding_layers=False)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())


def _load_start_weights(model: PeftModel, adapter_dir: Path) -> None:
    """Start from a saved adapter's weights; it must be of the method being trained."""
    saved, wanted = PeftConfig.from_pretrained(str(adapter_dir)).peft_type, model.peft_config["default"].peft_type
    if saved != wanted:
        raise ValueError(f"cannot continue a {wanted.value} adapter from {adapter_dir}: it is {saved.value}")
    set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir)))


def train_adapter(
    model: PreTrainedModel,
    tokenizer: Any,
    examples: list[SFTExample],
    settings: TuningSettings,
    out_dir: Path,
    method: str | None = None,
    start_from: Path | None = None,
) -> TrainResult:
    """Train a ``method`` (default ``settings.method``) adapter on ``examples`` and save it to ``out_dir``;
    from fresh adapter weights, or from the saved adapter ``start_from`` (continued training).
    ``anchor`` examples (:func:`~selftune.tuning.dataset.anchor_examples`) are not trained on: one joins
    each optimizer step, held to the base model through ``settings.anchor_weight`` x KL."""
    spec = get_method(method or settings.method)
    out_dir = Path(out_dir)
    if isinstance(model, PeftModel) or folded(model):
        raise TypeError("train_adapter needs the bare base model; unload the adapter it is serving first")
    if out_dir.exists():
        raise FileExistsError(f"adapter directory already exists: {out_dir}")
    trained = sum(not example.anchor for example in examples)
    if not trained:
        raise ValueError("no training examples")
    if settings.lora_scale != 1.0 and spec.name != "lora":
        raise ValueError(f"lora_scale {settings.lora_scale} applies to LoRA adapters only, not {spec.name}")
    lr = spec.learning_rate(settings)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    peft_model: PeftModel | None = None
    try:
        with torch.random.fork_rng():  # seeded init and dropout without touching the caller's RNG
            torch.manual_seed(settings.seed)
            with tempfile.TemporaryDirectory() as tokenizer_dir:
                tokenizer.save_pretrained(tokenizer_dir)  # prompt tuning's text init reads it
                peft_model = get_peft_model(model, spec.build(settings, tokenizer_dir))
            if start_from is not None:
                _load_start_weights(peft_model, Path(start_from))
            trainable_params, total_params = peft_model.get_nb_trainable_parameters()
            start = time.perf_counter()
            losses, tokens = _fit(peft_model, examples, settings, spec.name, lr, pad_token_id)
            seconds = time.perf_counter() - start
            _scale_lora_update(peft_model, settings.lora_scale)
        adapter_bytes = _save_atomically(peft_model, out_dir)
    finally:
        if peft_model is not None and isinstance(peft_model.base_model, BaseTuner):
            peft_model.base_model.unload()  # removes injected layers (LoRA); prompt tuning injects none
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)
    return TrainResult(
        method=spec.name,
        steps=len(losses),
        epochs=len(losses) / math.ceil(trained / settings.batch_size),
        losses=losses,
        train_seconds=seconds,
        examples=trained,
        tokens=tokens,
        trainable_params=trainable_params,
        total_params=total_params,
        adapter_bytes=adapter_bytes,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        learning_rate=lr,
        dtype=str(model.dtype).removeprefix("torch."),
    )
