"""The no-call bias: choosing it from margins, and its effect on real greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selftune.agent.constrained import NO_CALL_TOOL, grammar_cache
from selftune.agent.generation import generate
from selftune.agent.local_chat import LocalChatModel
from selftune.agent.models import load_causal_lm
from selftune.bfcl import load_category
from selftune.bfcl.harness import build_messages
from selftune.tuning.calibration import calibrate, calibration_target, no_call_margin, refusal_share

SMOL = "smollm2-135m-instruct"


def test_calibration_picks_the_smallest_bias_that_refuses_enough() -> None:
    abstain = [-1.6, -0.6, 0.4, 1.4]  # refused at bias 0: 2 of 4
    call = [-3.0, -1.1, 0.2]
    assert refusal_share(abstain, 0.0) == 0.5 and refusal_share(abstain, 0.75) == 0.75
    chosen = calibrate(abstain, call, target=0.75)
    assert chosen.bias == 0.75 and chosen.refused == 0.75 and chosen.target == 0.75
    assert chosen.called == pytest.approx(2 / 3)  # -1.1 + 0.75 and -3.0 + 0.75 still call
    assert chosen.abstain_questions == 4 and chosen.call_questions == 3
    # A candidate that already refuses enough keeps its weights' threshold: the grid starts at 0.
    assert calibrate(abstain, call, target=0.25).bias == 0.0
    assert calibrate(abstain, [], target=0.25).called is None


def test_calibration_that_cannot_reach_its_target_takes_the_largest_bias() -> None:
    chosen = calibrate([-10.0, -9.0], [-1.0], target=1.0, grid=(0.0, 1.0, 2.0))
    assert chosen.bias == 2.0 and chosen.refused == 0.0


def test_calibration_target_is_the_strictest_model_less_the_slack() -> None:
    abstain = [-1.6, -0.6, 0.4, 1.4]
    assert calibration_target(0.5, 0.75, slack=0.0) == 0.75
    assert calibration_target(0.5, 0.75, slack=0.25) == 0.5
    assert calibration_target(0.1, slack=0.5) == 0.0
    # The slack lowers the bias a candidate needs: here from +0.75 to 0.
    assert calibrate(abstain, [], calibration_target(0.5, 0.75, slack=0.25)).bias == 0.0
    assert calibrate(abstain, [], calibration_target(0.5, 0.75, slack=0.0)).bias == 0.75


def test_calibration_needs_abstention_questions() -> None:
    with pytest.raises(ValueError, match="at least one abstention question"):
        calibrate([], [0.0], target=0.5)


@pytest.fixture(scope="module")
def chat(model_cache: Path) -> LocalChatModel:
    # float32 on every CPU: bfloat16 logits are a step of 0.06 apart at these magnitudes, wider than
    # the 0.05 the flip is checked at, and two prefill paths of one prompt round differently.
    model, tokenizer = load_causal_lm(SMOL, model_cache, dtype="float32")
    return LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL)


def test_the_margin_predicts_where_the_bias_flips_greedy_decoding(chat: LocalChatModel) -> None:
    """Through the real model and grammar: just above -margin the reply is the no-call answer, just
    below it a call. The margin is read on the decoder's own tokens, so "just" is float noise (the
    probe and the reply may prefill the prompt differently: one of them can hit the prefix cache)."""
    for question, _ in load_category("simple_python", limit=2, seed=0):
        margin = no_call_margin(chat, question)

        def tool(bias: float) -> str:
            chat.no_call_bias = bias
            reply = generate(chat, build_messages(question), max_tokens=64, temperature=0.0,
                             tools=question.tools(), allow_no_call=True)
            return json.loads(reply.content)["tool"]

        try:
            assert tool(-margin + 0.05) == NO_CALL_TOOL
            assert tool(-margin - 0.05) in {t["function"]["name"] for t in question.tools()}
        finally:
            chat.no_call_bias = 0.0


def test_the_margin_ignores_the_active_bias_and_the_probe_stops_at_the_choice(chat: LocalChatModel) -> None:
    question = load_category("simple_python", limit=1, seed=0)[0][0]
    margin = no_call_margin(chat, question)
    chat.no_call_bias = 3.0
    try:
        assert no_call_margin(chat, question) == pytest.approx(margin, abs=1e-3)
    finally:
        chat.no_call_bias = 0.0
    grammar = grammar_cache(chat.tokenizer, chat.model.config.vocab_size)
    probe = grammar.processor(question.tools(), max_new_tokens=64, allow_no_call=True, stop_at_choice=True,
                              stop_token_ids=chat.model.generation_config.eos_token_id)
    prompt = chat.tokenizer(chat.render_prompt(build_messages(question)), return_tensors="pt")["input_ids"]
    output = chat.model.generate(prompt, max_new_tokens=64, do_sample=False, logits_processor=[probe])
    reply = chat.tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True)
    assert reply.startswith('{"tool": "') and '"arguments"' not in reply  # stopped once the name began
    assert probe.no_call_margins[0] == pytest.approx(margin, abs=0.05)
