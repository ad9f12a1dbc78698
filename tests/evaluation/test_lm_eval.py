"""The server scores prompts for lm-evaluation-harness's local-completions: `echo` with `logprobs` returns the
prompt tokens' log-probabilities (OpenAI's legacy shape), `max_tokens: 0` and token-id prompts are accepted."""

from __future__ import annotations


import numpy as np
import pytest

from cllama_deploy.engine import requests as rl

TEXT = "The quick brown fox 跳过了懒狗。 Then it ran home"


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    m = rows.max(axis=1, keepdims=True)
    return rows - m - np.log(np.exp(rows - m).sum(axis=1, keepdims=True))


@pytest.fixture(scope="module")
def engine(ev_models):
    from cllama_deploy.engine.llamacpp import LlamaCppConfig, LlamaCppEngine

    eng = LlamaCppEngine(LlamaCppConfig(model_path=str(ev_models.base_gguf), model_id="tiny", n_ctx=256,
                                        parallel=2, n_threads=1, kv_cache_type="f32"))
    yield eng
    eng.close(30)


@pytest.fixture(scope="module")
def teacher_forced(ev_models, engine):
    """Reference log-probabilities of TEXT's tokens: llama.cpp's logits of every position, computed by the
    evaluation scorer in a context of its own (no server, no scheduler)."""
    from cllama_deploy.evaluation.models import LlamaCppScorer

    ids = engine.tokenize(TEXT)
    scorer = LlamaCppScorer(ev_models.base_gguf, n_ctx=256, n_threads=1, kv_type="f32")
    try:
        assert scorer.tokenize(TEXT) == ids
        logp = _log_softmax(scorer.window_logits(ids))
    finally:
        scorer.close()
    return ids, logp


def _check_scores(lp, ids, logp, engine, k):
    n = len(ids)
    assert lp.tokens[:n] == [engine.token_piece(t).decode("utf-8", "replace") for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [float(logp[i, ids[i + 1]]) for i in range(n - 1)]
    assert lp.token_logprobs[1:n] == pytest.approx(want, abs=2e-4)
    for i in range(1, n):
        top = lp.top_logprobs[i]
        assert 1 <= len(top) <= k and max(top.values()) == pytest.approx(float(logp[i - 1].max()), abs=2e-4)


def test_echo_with_max_tokens_0_scores_the_prompt(engine, teacher_forced):
    ids, logp = teacher_forced
    r = rl.complete(engine, TEXT, max_tokens=0, echo=True, logprobs=3)
    c = r.choices[0]
    assert c.text == TEXT and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    assert len(c.logprobs.tokens) == len(ids)
    _check_scores(c.logprobs, ids, logp, engine, 3)
    # offsets index the echoed text: each token's text starts there (the dummy-prefix space is not shown)
    offs = c.logprobs.text_offset
    assert offs == sorted(offs) and offs[-1] < len(TEXT)
    assert TEXT[offs[-1]:] == c.logprobs.tokens[-1].lstrip(" ") or TEXT.endswith(c.logprobs.tokens[-1])


def test_token_id_prompts_score_the_same_and_generate_after(engine, teacher_forced):
    ids, logp = teacher_forced
    # lm-eval's request: a list of token-id prompts, max_tokens 1, logprobs 1, greedy
    r = rl.complete(engine, [ids, ids[:5]], max_tokens=1, echo=True, logprobs=1, temperature=0)
    a, b = r.choices
    assert len(a.logprobs.tokens) == len(ids) + 1 and len(b.logprobs.tokens) == 6
    _check_scores(a.logprobs, ids, logp, engine, 1)
    _check_scores(b.logprobs, ids[:5], logp, engine, 1)
    greedy = int(np.argmax(logp[len(ids) - 1]))
    assert a.logprobs.tokens[-1] == engine.token_piece(greedy).decode("utf-8", "replace")
    assert a.logprobs.token_logprobs[-1] == pytest.approx(float(logp[len(ids) - 1, greedy]), abs=2e-4)
    assert a.text.startswith(rl.detokenize(engine, ids)) and a.logprobs.text_offset[-1] == len(rl.detokenize(engine, ids))
    # the prefix cache now holds this prompt: scoring it again computes it again, with the same numbers
    again = rl.complete(engine, [ids], max_tokens=0, echo=True, logprobs=1)
    assert again.choices[0].logprobs.token_logprobs == pytest.approx(a.logprobs.token_logprobs[:-1], abs=1e-4)


def test_streamed_echo_carries_the_prompt_scores_first(engine, teacher_forced):
    ids, logp = teacher_forced
    whole = rl.complete(engine, TEXT, max_tokens=4, echo=True, logprobs=2, temperature=0)
    chunks = list(rl.stream_complete(engine, TEXT, max_tokens=4, echo=True, logprobs=2, temperature=0))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0] == TEXT and "".join(texts) == whole.choices[0].text
    lps = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(lps[0].tokens) == len(ids)
    assert sum((lp.token_logprobs for lp in lps), []) == pytest.approx(whole.choices[0].logprobs.token_logprobs)
    assert sum((lp.text_offset for lp in lps), []) == whole.choices[0].logprobs.text_offset


def test_scoring_beside_a_running_generation(engine, teacher_forced):
    """A scored prompt prefilled in chunks next to a generating sequence gets the same numbers."""
    ids, logp = teacher_forced
    it = rl.stream_complete(engine, "Once upon a time", max_tokens=60, temperature=0, logit_bias={2: -100})
    first = next(iter(it))
    try:
        r = rl.complete(engine, [ids], max_tokens=0, echo=True, logprobs=1)
    finally:
        it.close()
    assert first is not None
    _check_scores(r.choices[0].logprobs, ids, logp, engine, 1)


def test_echo_without_logprobs_and_max_tokens_0_alone(engine):
    r = rl.complete(engine, TEXT, max_tokens=0, echo=True)
    assert r.choices[0].text == TEXT and r.choices[0].logprobs is None and r.usage.completion_tokens == 0
    r = rl.complete(engine, TEXT, max_tokens=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length"
    with pytest.raises(rl.InvalidRequest) as exc:
        rl.complete(engine, TEXT, max_tokens=-1)
    assert exc.value.param == "max_tokens"


# ------------------------------------------------------------------------------------ lm-eval against serve

