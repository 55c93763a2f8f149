"""A LangChain chat model over a local transformers causal LM with switchable PEFT adapters."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from pydantic import BaseModel, Field, PrivateAttr
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from selftune.agent.constrained import ToolCallLogitsProcessor, grammar_cache, openai_functions
from selftune.agent.folded_lora import can_fold, fold_lora, unfold_lora
from selftune.agent.prefix_cache import PrefixCache
from selftune.agent.speculative import drafted_decode
from selftune.agent.virtual_prefix import VirtualPrefix

__all__ = ["DECODING_FILE", "AdapterDecoding", "LocalChatModel"]

DECODING_FILE = "selftune_decoding.json"
"""Decoding settings saved beside an adapter's weights (:class:`AdapterDecoding`)."""


class AdapterDecoding(BaseModel):
    """Decoding settings that belong to one adapter's weights and are applied with them."""

    no_call_bias: float = 0.0  # added to the no-call answer's score in tool calls (see ToolCallLogitsProcessor)

_GREEDY: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}

_ROLES = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}


def _role(message: BaseMessage) -> str:
    if isinstance(message, ChatMessage) and message.role in ("system", "user", "assistant"):
        return message.role
    for kind, role in _ROLES.items():
        if isinstance(message, kind):
            return role
    raise ValueError(
        f"LocalChatModel accepts system/human/AI messages only, got {type(message).__name__}; "
        "render tool turns as plain text first"
    )


def _check_adapter_dir(path: Path) -> None:
    # PEFT injects LoRA layers before it reads the weights: fail before touching the base model.
    if not (path / "adapter_config.json").is_file() or not any(path.glob("adapter_model.*")):
        raise FileNotFoundError(f"no PEFT adapter (adapter_config.json + adapter_model.*) in {path}")


class _StopStrings(StoppingCriteria):
    """Stop once the decoded continuation contains a stop string.

    Cheaper per call than transformers' ``stop_strings``, which scans the whole
    vocabulary on every ``generate`` (~0.3 s for Qwen's 152k tokens).
    """

    def __init__(self, tokenizer: Any, stops: list[str], prompt_len: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class LocalChatModel(BaseChatModel):
    """Chat model over ``model``/``tokenizer`` (see ``load_causal_lm``).

    Invocation kwargs: ``max_new_tokens`` (alias ``max_tokens``), ``temperature``
    (0 = greedy), ``stop`` (strings; the reply is cut before the first one) and
    ``assistant_prefix`` (text the reply is started with; it is part of the
    returned content), and for grammar-constrained tool calls ``tools`` (LangChain
    tools or OpenAI function dicts), ``allow_no_call`` and ``max_calls`` (above 1 the
    reply may be a JSON list of calls). Generation and adapter switches are
    serialised by a lock. ``no_call_bias`` comes with the active adapter (its :data:`DECODING_FILE`).
    """

    model: Any = Field(exclude=True)  # transformers PreTrainedModel: the base weights
    tokenizer: Any = Field(exclude=True)
    model_id: str
    adapter_version: str | None = None
    max_new_tokens: int = Field(192, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    threads: int | None = Field(None, ge=1)
    prefix_cache_entries: int = Field(4, ge=0)  # 0 turns prefix KV-cache reuse off
    # Tool calls: draft grammar-forced tokens / up to this many prompt-lookup tokens
    # and verify them in one forward pass (same output or sampling distribution, fewer passes; agent/speculative.py).
    jump_forward: bool = True
    lookup_tokens: int = Field(8, ge=0)
    # LoRA adapters folded into a copy of the weights they change: decoding costs what it does without
    # an adapter, and those weights are held twice while one is active (agent/folded_lora.py).
    fold_lora: bool = True
    no_call_bias: float = 0.0

    _active: Any = PrivateAttr(None)  # the base model (its LoRA adapter folded in, or none) or a PeftModel wrapping it
    _virtual: VirtualPrefix | None = PrivateAttr(None)  # a prompt/prefix-tuning adapter's virtual positions
    _lock: threading.RLock = PrivateAttr(default_factory=threading.RLock)
    _prefix_cache: PrefixCache = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        self._active = self.model
        self._prefix_cache = PrefixCache(max_entries=self.prefix_cache_entries)

    @property
    def prefix_cache(self) -> PrefixCache:
        """KV caches of recent prompts, reused by prompts that start with the same tokens."""
        return self._prefix_cache

    @property
    def _llm_type(self) -> str:
        return "selftune-local"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "adapter_version": self.adapter_version,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }

    def use_adapter(self, path: Path | None, version: str | None = None) -> None:
        """Activate the PEFT adapter (LoRA, prompt or prefix tuning) saved at ``path``; None restores base weights.

        ``version`` defaults to the adapter directory's name. If loading fails the
        base weights stay active. The adapter's :data:`DECODING_FILE`, if any, sets ``no_call_bias``
        (0 without one and for the base weights).
        """
        with self._lock:
            if isinstance(self._active, PeftModel) and isinstance(self._active.base_model, BaseTuner):
                # LoRA layers live inside the base modules: take them out again (prompt
                # tuning leaves the base model untouched).
                self._active.base_model.unload()
            unfold_lora(self.model)
            self._active, self.adapter_version, self._virtual = self.model, None, None
            self.no_call_bias = 0.0
            self._prefix_cache.clear()  # keys and values change with the weights
            if path is not None:
                _check_adapter_dir(Path(path))
                decoding = Path(path) / DECODING_FILE
                settings = AdapterDecoding.model_validate_json(decoding.read_text()) if decoding.is_file() else None
                adapter = PeftModel.from_pretrained(self.model, str(path)).eval()
                if adapter.active_peft_config.is_prompt_learning:  # leaves the base modules untouched
                    self._virtual = VirtualPrefix.of(adapter, self.model.dtype)
                elif self.fold_lora and can_fold(adapter):
                    adapter = fold_lora(adapter)
                self._active, self.adapter_version = adapter, version or Path(path).name
                self.no_call_bias = settings.no_call_bias if settings else 0.0

    def render_prompt(self, messages: list[BaseMessage], prefix: str = "") -> str:
        """The model's chat-template text for ``messages``, opened for the assistant's reply."""
        chat = [{"role": _role(m), "content": m.text} for m in messages]
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + prefix

    def cross_entropy(self, text: str, max_tokens: int = 1024) -> float:
        """Mean next-token cross-entropy (nats) of raw ``text`` under the active adapter: how well the
        model still predicts general language (a forgetting measure)."""
        with self._lock, torch.inference_mode():
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
            if ids.shape[1] < 2:
                raise ValueError("cross_entropy needs a text of at least two tokens")
            return float(self._active(input_ids=ids, labels=ids).loss)

    def next_token_logits(self, text: str) -> torch.Tensor:
        """Float32 logits of the token after raw ``text``, with the active adapter."""
        with self._lock, torch.inference_mode():
            encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
            return self._active(**encoded).logits[0, -1].float()

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        max_new_tokens = int(kwargs.pop("max_new_tokens", kwargs.pop("max_tokens", self.max_new_tokens)))
        temperature = float(kwargs.pop("temperature", self.temperature))
        prefix = str(kwargs.pop("assistant_prefix", ""))
        tools = kwargs.pop("tools", None)
        allow_no_call = bool(kwargs.pop("allow_no_call", False))
        max_calls = int(kwargs.pop("max_calls", 1))
        if kwargs:
            raise TypeError(f"unsupported generation arguments: {', '.join(sorted(kwargs))}")
        stop = [s for s in (stop or []) if s]

        prompt_ids, input_ids = self._prompt_ids(messages, prefix)
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature)
        else:
            options.update(_GREEDY)
        processor = None
        if tools:
            # Grammar-constrained decoding: the reply is always a valid call of one of ``tools``.
            processor = self._tool_processor(
                tools, max_new_tokens, prefix=prefix, allow_no_call=allow_no_call, max_calls=max_calls)
            options["logits_processor"] = LogitsProcessorList([processor])
            stop = []  # a stop string could cut the JSON the grammar guarantees
        if stop:
            options["stopping_criteria"] = StoppingCriteriaList(
                [_StopStrings(self.tokenizer, stop, input_ids.shape[1])])

        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            output, forward_passes = self._decode(input_ids, processor, options)
            latency = time.perf_counter() - start
            adapter_version = self.adapter_version

        new_tokens = output[0, input_ids.shape[1]:]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        if processor is not None:
            text += processor.completion(new_tokens)  # closes the call if the budget ran out
        cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
        ended = bool(cuts) or self._ended_with_eos(new_tokens)
        if cuts:
            text = text[: min(cuts)]
        n_in, n_out = int(prompt_ids.shape[1]), int(new_tokens.shape[0])
        message = AIMessage(
            content=prefix + text,
            usage_metadata={"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out},
            response_metadata={
                "model_id": self.model_id,
                "adapter_version": adapter_version,
                "latency_s": round(latency, 4),
                "forward_passes": forward_passes,
                "finish_reason": "stop" if ended or n_out < max_new_tokens else "length",
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def no_call_margin(self, messages: list[BaseMessage], tools: list[Any]) -> float:
        """How far the greedy reply to ``messages`` is from answering that none of ``tools`` fits, with
        the active adapter and before its ``no_call_bias``: it answers so exactly when margin + bias > 0
        (:attr:`ToolCallLogitsProcessor.no_call_margins`, read on the decoder's own tokens; decoding
        stops once the reply has chosen)."""
        _, input_ids = self._prompt_ids(messages)
        processor = self._tool_processor(tools, self.max_new_tokens, allow_no_call=True, stop_at_choice=True)
        options = {"max_new_tokens": self.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                   **_GREEDY, "logits_processor": LogitsProcessorList([processor])}
        with self._lock, torch.inference_mode():
            self._decode(input_ids, processor, options)
        margin = processor.no_call_margins[0]
        if margin is None:
            raise RuntimeError("the reply never chose between the tools and the no-call answer")
        return margin

    def _prompt_ids(self, messages: list[BaseMessage], prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's token ids, and the ids to decode from (with a prompt-tuning adapter's placeholders)."""
        prompt = self.render_prompt(messages, prefix)
        prompt_ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return prompt_ids, self._virtual.placeholders(prompt_ids) if self._virtual else prompt_ids

    def _tool_processor(self, tools: list[Any], max_new_tokens: int, **options: Any) -> ToolCallLogitsProcessor:
        return grammar_cache(self.tokenizer, self.model.config.vocab_size).processor(
            openai_functions(tools), max_new_tokens=max_new_tokens, no_call_bias=self.no_call_bias,
            stop_token_ids=self.model.generation_config.eos_token_id, **options)

    def _decode(self, input_ids: torch.Tensor, processor: ToolCallLogitsProcessor | None,
                options: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """``(prompt + new tokens, forward passes)`` under ``options`` (``generate``'s keyword
        arguments); greedy and sampled replies without stop strings take the drafting decoder.
        The caller holds the lock."""
        # Virtual positions live in the cache; the base model decodes after them.
        decoder = self.model if self._virtual else self._active
        cache = self._prefix_cache.take(input_ids[0]) if self.prefix_cache_entries > 0 else None
        cache = self._virtual.fill(self.model, cache) if self._virtual else cache
        if "stopping_criteria" not in options and self._drafts(constrained=processor is not None):
            output, stats = drafted_decode(
                decoder, input_ids, processor, options["max_new_tokens"], self._eos_ids(), cache,
                temperature=options["temperature"] if options.get("do_sample") else 0.0, **self._sampling_limits(),
                jump_forward=self.jump_forward, lookup_tokens=self.lookup_tokens)
            forward_passes = stats.forward_passes
        else:
            if cache is not None:
                options["cache"] = cache
            output = decoder.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options)
            forward_passes = output.shape[1] - input_ids.shape[1]
        if cache is not None and self.prefix_cache_entries > 0:
            self._prefix_cache.put(output[0], cache)
        return output, forward_passes

    def _sampling_limits(self) -> dict[str, Any]:
        """The model's top-k/top-p, with ``generate``'s defaults where its generation config sets none."""
        config = self.model.generation_config
        return {"top_k": 50 if config.top_k is None else config.top_k,
                "top_p": 1.0 if config.top_p is None else config.top_p}

    def _drafts(self, constrained: bool) -> bool:
        """Whether decoding has drafts to check: grammar-forced tokens or prompt lookup."""
        return self.jump_forward and constrained or self.lookup_tokens > 0

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    def _ended_with_eos(self, tokens: torch.Tensor) -> bool:
        return tokens.numel() > 0 and int(tokens[-1]) in self._eos_ids()
