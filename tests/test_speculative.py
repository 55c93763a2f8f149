"""Speculative greedy decoding (agent/speculative.py): jump-forward and prompt-lookup drafts give
token for token what plain constrained greedy ``generate`` gives, with fewer forward passes.

Real SmolLM2 in float32 (in bfloat16 a pass over several tokens rounds differently from one
token at a time; ``selftune bench inference`` reports agreement there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import DynamicCache, LogitsProcessorList

from selftune.agent.constrained import ToolCallLogitsProcessor, grammar_cache, openai_functions
from selftune.agent.generation import generate
from selftune.agent.local_chat import LocalChatModel
from selftune.agent.models import load_causal_lm
from selftune.agent.speculative import drafted_decode, lookup_draft
from selftune.bfcl import load_category
from selftune.bfcl.harness import build_messages

SMOL = "smollm2-135m-instruct"
# (category, index in the seeded sample, token budget): a budget of 20 makes the grammar close the reply early.
CASES = [("simple_python", 0, 128), ("simple_python", 1, 20), ("parallel", 0, 128), ("irrelevance", 0, 96)]


@pytest.fixture(scope="module")
def weights(model_cache: Path):
    return load_causal_lm(SMOL, model_cache, "float32")


def _case(weights, category: str, index: int):
    model, tokenizer = weights
    question, _ = load_category(category, limit=index + 1, seed=0)[index]
    several = category == "parallel"
    chat = LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL)
    prompt = chat.render_prompt(build_messages(question, several_calls=several))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return ids, openai_functions(question.tools()), (8 if several else 1)


def _processor(weights, functions, max_calls: int, budget: int) -> ToolCallLogitsProcessor:
    model, tokenizer = weights
    return grammar_cache(tokenizer, model.config.vocab_size).processor(
        functions, max_new_tokens=budget, allow_no_call=True, max_calls=max_calls,
        stop_token_ids=model.generation_config.eos_token_id)


def _plain_greedy(weights, ids, functions, max_calls: int, budget: int) -> list[int]:
    model, tokenizer = weights
    with torch.inference_mode():
        out = model.generate(
            ids, logits_processor=LogitsProcessorList([_processor(weights, functions, max_calls, budget)]),
            max_new_tokens=budget, do_sample=False, temperature=None, top_p=None, top_k=None,
            pad_token_id=tokenizer.pad_token_id)
    return out[0].tolist()


def _eos(weights) -> set[int]:
    return {weights[0].generation_config.eos_token_id}


@pytest.mark.parametrize("lookup_tokens", [0, 8])
def test_drafted_decoding_gives_the_plain_greedy_tokens_in_fewer_passes(weights, lookup_tokens: int) -> None:
    model, _ = weights
    for category, index, budget in CASES:
        ids, functions, max_calls = _case(weights, category, index)
        expected = _plain_greedy(weights, ids, functions, max_calls, budget)
        with torch.inference_mode():
            got, stats = drafted_decode(model, ids, _processor(weights, functions, max_calls, budget), budget,
                                       _eos(weights), jump_forward=True, lookup_tokens=lookup_tokens)
        assert got[0].tolist() == expected, (category, index, budget)
        generated = len(expected) - ids.shape[1]
        assert stats.accepted_tokens > 0 and stats.forward_passes <= generated - stats.accepted_tokens + 1
        assert stats.accepted_tokens <= stats.drafted_tokens


def test_without_drafts_it_is_one_pass_per_token(weights) -> None:
    model, _ = weights
    ids, functions, max_calls = _case(weights, "simple_python", 0)
    expected = _plain_greedy(weights, ids, functions, max_calls, 64)
    with torch.inference_mode():
        got, stats = drafted_decode(model, ids, _processor(weights, functions, max_calls, 64), 64, _eos(weights),
                                   jump_forward=False)
    assert got[0].tolist() == expected
    assert stats.drafted_tokens == 0 and stats.forward_passes == len(expected) - ids.shape[1]


def test_a_cached_prompt_prefix_gives_the_same_tokens_and_leaves_the_cache_like_generate(weights) -> None:
    model, _ = weights
    ids, functions, max_calls = _case(weights, "simple_python", 0)
    expected = _plain_greedy(weights, ids, functions, max_calls, 96)
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids[:, :-7], cache=cache, use_cache=True)  # a prefix-cache hit for all but 7 tokens
        got, _ = drafted_decode(model, ids, _processor(weights, functions, max_calls, 96), 96, _eos(weights), cache)
    assert got[0].tolist() == expected
    assert cache.get_seq_length() == len(expected) - 1  # every token but the last, as after generate

    with pytest.raises(ValueError, match="proper prefix"):
        drafted_decode(model, ids[:, :5], _processor(weights, functions, max_calls, 8), 8, _eos(weights), cache)


def test_local_chat_model_drafts_only_where_asked_and_says_how_many_passes(weights) -> None:
    model, tokenizer = weights
    question, _ = load_category("multiple", limit=1, seed=0)[0]
    replies = {}
    for name, options in {"plain": {"jump_forward": False, "lookup_tokens": 0}, "jump": {"lookup_tokens": 0},
                          "lookup": {"lookup_tokens": 8}}.items():
        chat = LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL, prefix_cache_entries=0, **options)
        replies[name] = generate(chat, build_messages(question), max_tokens=96, temperature=0.0,
                                 tools=question.tools(), allow_no_call=True)
    assert replies["jump"].content == replies["plain"].content == replies["lookup"].content
    tokens = replies["plain"].usage_metadata["output_tokens"]
    passes = {name: reply.response_metadata["forward_passes"] for name, reply in replies.items()}
    assert passes["plain"] == tokens and passes["lookup"] <= passes["jump"] < tokens


def test_free_greedy_decoding_with_lookup_gives_generates_tokens(weights) -> None:
    """Without a grammar (free text, unconstrained tool calls) prompt lookup alone drafts; the tokens
    are plain ``generate``'s, through a budget cut and through the repetition small models fall into."""
    model, tokenizer = weights
    passes = tokens = 0
    for category, index, budget in [("simple_python", 0, 96), ("live_simple", 0, 40)]:
        ids, _, _ = _case(weights, category, index)
        with torch.inference_mode():
            expected = model.generate(ids, max_new_tokens=budget, do_sample=False, temperature=None, top_p=None,
                                      top_k=None, pad_token_id=tokenizer.pad_token_id)[0].tolist()
            got, stats = drafted_decode(model, ids, None, budget, _eos(weights), lookup_tokens=8)
        assert got[0].tolist() == expected, (category, index)
        assert stats.forward_passes <= len(expected) - ids.shape[1] - stats.accepted_tokens + 1
        passes, tokens = passes + stats.forward_passes, tokens + len(expected) - ids.shape[1]
    assert passes < tokens

    question, _ = load_category("simple_python", limit=1, seed=0)[0]
    replies = {}
    for lookup in (0, 8):
        chat = LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL, prefix_cache_entries=0,
                              lookup_tokens=lookup)
        replies[lookup] = generate(chat, build_messages(question), max_tokens=64, temperature=0.0)
    assert replies[0].content == replies[8].content
    assert replies[8].response_metadata["forward_passes"] < replies[0].response_metadata["forward_passes"]


def test_drafted_sampling_draws_generates_samples_in_fewer_passes(weights) -> None:
    """At a temperature each kept token is one draw from the masked distribution, as in ``generate``
    (which samples from the best 50 by default): with the same seed the two give the same tokens
    (several seeds, so calls and refusals with sampled arguments occur), and drafted guesses
    (grammar-forced and prompt lookup) still save passes. Budgets leave the closing guard idle:
    near the end of a budget it checks the best tokens in score order, and there a rounding
    difference between pass shapes can change which tokens it bans."""
    model, tokenizer = weights
    passes = tokens = 0
    for category, index, budget in [CASES[0], CASES[3]]:
        ids, functions, max_calls = _case(weights, category, index)
        for seed in range(3):
            with torch.inference_mode():
                torch.manual_seed(seed)
                expected = model.generate(
                    ids, logits_processor=LogitsProcessorList([_processor(weights, functions, max_calls, budget)]),
                    max_new_tokens=budget, do_sample=True, temperature=0.7, pad_token_id=tokenizer.pad_token_id)
                torch.manual_seed(seed)
                got, stats = drafted_decode(model, ids, _processor(weights, functions, max_calls, budget), budget,
                                            _eos(weights), temperature=0.7, top_k=50, lookup_tokens=8)
            assert got[0].tolist() == expected[0].tolist(), (category, index, seed)
            passes, tokens = passes + stats.forward_passes, tokens + expected.shape[1] - ids.shape[1]
    assert passes < tokens * 0.8


def test_local_chat_model_samples_through_the_drafting_decoder(weights) -> None:
    """Drafted sampling draws what sampling through ``generate`` (drafting off) draws under the same
    seed: the same warpers, including ``generate``'s default top-k, which the model's config leaves unset."""
    model, tokenizer = weights
    question, _ = load_category("simple_python", limit=1, seed=0)[0]
    chats = {"drafted": LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL, prefix_cache_entries=0),
             "plain": LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL, prefix_cache_entries=0,
                                     jump_forward=False, lookup_tokens=0)}
    replies: dict[str, list] = {name: [] for name in chats}
    for seed in range(4):
        for name, chat in chats.items():
            got = replies[name]
            torch.manual_seed(seed)
            got.append(generate(chat, build_messages(question), max_tokens=96, temperature=1.0,
                                tools=question.tools(), allow_no_call=True))
    assert [r.content for r in replies["drafted"]] == [r.content for r in replies["plain"]]
    assert len({reply.content for reply in replies["drafted"]}) > 1  # it samples
    assert all(reply.response_metadata["forward_passes"] == reply.usage_metadata["output_tokens"]
               for reply in replies["plain"])
    assert any(reply.response_metadata["forward_passes"] < reply.usage_metadata["output_tokens"]
               for reply in replies["drafted"])
    with pytest.raises(ValueError, match="temperature"):
        drafted_decode(model, torch.tensor([[1, 2, 3]]), None, 4, _eos(weights), temperature=-1.0)


def _prompt_learning_adapter(kind: str, weights, model_cache: Path, path: Path) -> PeftModel:
    """A saved ``kind`` adapter (prompt: text-like virtual tokens; prefix: PEFT's random keys/values),
    returned wrapped around a model of its own."""
    _, tokenizer = weights
    scratch, _ = load_causal_lm(SMOL, model_cache, "float32")
    if kind == "prompt":
        tuned = get_peft_model(scratch, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6))
        words = tokenizer("Answer with one precise tool call.", add_special_tokens=False)["input_ids"][:6]
        with torch.no_grad():
            tuned.prompt_encoder["default"].embedding.weight.copy_(scratch.get_input_embeddings().weight[words])
    else:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            tuned = get_peft_model(scratch, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6))
    tuned.save_pretrained(path)
    return tuned.eval()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_adapters_decode_through_the_caches_as_peft_computes_them(
        kind: str, weights, model_cache: Path, tmp_path: Path) -> None:
    """The virtual positions go into the KV cache once; replies are greedy decoding through PEFT's
    forward (what training optimises), token for token, with fewer forward passes and prefix
    reuse across calls. (PEFT's own ``generate`` is no reference: under this transformers version
    it drops prefix tuning's keys/values and drifts into repeating prompt tuning's virtual text.)"""
    model, tokenizer = weights
    tuned = _prompt_learning_adapter(kind, weights, model_cache, tmp_path)
    question, _ = load_category("simple_python", limit=1, seed=0)[0]
    ids, functions, _ = _case(weights, "simple_python", 0)
    processor, sequence = _processor(weights, functions, 1, 96), ids
    with torch.inference_mode():
        for _ in range(96):
            logits = tuned(input_ids=sequence).logits[:, -1].float()
            token = processor(sequence, logits).argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=1)
            if int(token) in _eos(weights):
                break
    expected = sequence[0, ids.shape[1]:]

    chat = LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL)
    chat.use_adapter(tmp_path, f"{kind}-v1")
    try:
        replies = [generate(chat, build_messages(question), max_tokens=96, temperature=0.0,
                            tools=question.tools(), allow_no_call=True) for _ in range(2)]
    finally:
        chat.use_adapter(None, None)
    assert replies[0].content == replies[1].content == tokenizer.decode(expected, skip_special_tokens=True)
    assert replies[0].usage_metadata["input_tokens"] == ids.shape[1]  # virtual positions are not prompt tokens
    assert replies[0].response_metadata["forward_passes"] < len(expected)
    assert chat.prefix_cache.stats.hits == 1 and chat.prefix_cache.stats.reused_tokens > ids.shape[1]


def test_lookup_draft_copies_what_followed_the_last_ngram_before() -> None:
    ids = [5, 1, 2, 3, 9, 8, 7, 4, 1, 2, 3]
    assert lookup_draft(ids, ngram=3, limit=2) == [9, 8]
    assert lookup_draft(ids, ngram=3, limit=50) == [9, 8, 7, 4, 1, 2, 3]
    assert lookup_draft([1, 2, 3, 1, 2, 3, 1, 2, 3], ngram=3, limit=4) == [1, 2, 3]  # the latest occurrence
    assert lookup_draft(ids, ngram=3, limit=0) == []
    assert lookup_draft([4, 5, 6, 7], ngram=2, limit=3) == []  # never seen before
    assert lookup_draft([1, 2], ngram=3, limit=3) == []
