"""The server scores prompts for lm-evaluation-harness's local-completions: `echo` with `logprobs` returns the
prompt tokens' log-probabilities (OpenAI's legacy shape), `max_tokens: 0` and token-id prompts are accepted; and
the real lm-eval, run against a live `cllama-deploy serve`, gets `eval choice --score loglikelihood`'s numbers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from cllama_deploy.engine import requests as rl
from tests.evaluation import builders_eval as be

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


def _hf_tokenizer_from_gguf(gguf: Path, out: Path) -> Path:
    """The HF tokenizer directory lm-eval tokenizes with: the SentencePiece model rebuilt from the GGUF's own
    vocabulary (so lm-eval's ids are the server's), in our exact-SentencePiece HF layout."""
    from cllama_deploy.tokenizer.gguf_vocab import write_sp_model_from_gguf
    from cllama_deploy.tokenizer.hf import write_hf_tokenizer_dir

    out.mkdir(parents=True, exist_ok=True)
    write_sp_model_from_gguf(gguf, out / "source.model")
    return write_hf_tokenizer_dir(out / "source.model", out, chat_template=None)


@contextlib.contextmanager
def _serve(gguf: Path, model_id: str):
    """A live `cllama-deploy serve` subprocess (1 thread); yields its base URL."""
    env = {**os.environ, "CLLAMA_N_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cllama_deploy", "serve", f"{model_id}={gguf}", "--port", "0",
                             "--threads", "1", "--n-ctx", "1024", "--kv-cache-type", "f32", "--no-access-log"],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("listening on" in x for x in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        url = "http://127.0.0.1:" + re.search(r"listening on http://127\.0\.0\.1:(\d+)", "".join(lines)).group(1)
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _lm_eval(url: str, model_id: str, tokenizer: Path, tasks: Path, task: str, out: Path) -> tuple[dict, list[dict]]:
    """Run the real lm-evaluation-harness CLI (offline) against the server; returns (results, samples)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(out / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    args = ",".join([f"model={model_id}", f"base_url={url}/v1/completions", "tokenizer_backend=huggingface",
                     f"tokenizer={tokenizer}", "tokenized_requests=True", "add_bos_token=True", "num_concurrent=1",
                     "max_retries=1", "max_length=1024"])
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
           "--tasks", task, "--include_path", str(tasks), "--output_path", str(out), "--log_samples",
           "--batch_size", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text(encoding="utf-8"))
    samples = [json.loads(line) for p in out.rglob(f"samples_{task}_*.jsonl")
               for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return results, samples


def _lm_eval_choices(samples: list[dict]) -> dict[tuple[str, str], list[float]]:
    """Per item (subject, id): lm-eval's four log-likelihoods, in the order of the choices."""
    return {(x["doc"]["subject"], x["doc"]["id"]): [float(r[0][0]) for r in x["resps"]] for x in samples}


def test_a_scored_prompt_that_ends_generation_keeps_its_last_token(engine, teacher_forced):
    """lm-eval reads a prompt's scores as every entry but the generated one (``token_logprobs[ctxlen:-1]``): when
    the token generated after the prompt is EOS it must still be there, or the prompt's last token is dropped."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the test extra")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    ids, logp = teacher_forced
    eos = engine.info.metadata.get("tokenizer.ggml.eos_token_id", 2)
    r = rl.complete(engine, [ids], max_tokens=1, echo=True, logprobs=1, temperature=0, logit_bias={eos: 100})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == rl.detokenize(engine, ids)
    assert len(c.logprobs.token_logprobs) == len(ids) + 1
    _check_scores(c.logprobs, ids, logp, engine, 1)
    ctxlen = len(ids) - 2  # the last two prompt tokens are the "continuation"
    [(ll, _)] = LocalCompletionsAPI.parse_logprobs(outputs=r.model_dump(), ctxlens=[ctxlen])
    assert ll == pytest.approx(float(logp[ctxlen - 1, ids[ctxlen]] + logp[ctxlen, ids[ctxlen + 1]]), abs=4e-4)


@pytest.mark.parametrize("which", ["trained", "base"])
def test_lm_eval_against_serve_equals_eval_choice(which, ev_models, choice_case, tmp_path):
    """The real lm-evaluation-harness (``local-completions``, HF tokenizer written from the GGUF, offline) on a
    local multiple-choice task over ``eval choice``'s zero-shot items, against a live ``serve``.

    lm-eval's ``acc`` is ``eval choice --score loglikelihood``'s on every item (the same log-likelihoods). On the
    model trained to answer, the seed's score (logit(▁X) + logit(X)) picks the same letters too; on the untrained
    base it does not: the two definitions differ (docs/evaluation.md)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the test extra")
    from cllama_deploy.evaluation.choice import ChoiceConfig, evaluate_choice

    gguf = choice_case.gguf if which == "trained" else ev_models.base_gguf
    task = "cllama_ceval_local"
    tasks = be.write_lm_eval_task(tmp_path / "tasks", choice_case.val, name=task)
    tok = _hf_tokenizer_from_gguf(gguf, tmp_path / "hf_tok")
    prompts = [json.loads(line)["prompt"] for line in (tasks / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]
    with _serve(gguf, "m") as url:
        # lm-eval sends token ids from the HF tokenizer: they must be the server's own
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tok))
        for p in prompts[:8]:
            served = httpx.post(url + "/tokenize", json={"content": p + "B", "add_special": True}, timeout=30)
            assert hf(p + "B", add_special_tokens=True).input_ids == served.json()["tokens"]
        results, samples = _lm_eval(url, "m", tok, tasks, task, tmp_path / "lm_eval_out")
    theirs = _lm_eval_choices(samples)
    n = sum(len(v) for v in choice_case.val.values())
    assert len(theirs) == n and results["results"][task]["sample_len"] == n

    ours = {score: evaluate_choice(ChoiceConfig(model=gguf, data=choice_case.data, shots=0, threads=1,
                                                kv_cache_type="f32", show_progress=False, score=score))
            for score in ("loglikelihood", "seed")}
    ll = ours["loglikelihood"]
    for it in ll.items:
        lm = theirs[(it["subject"], it["id"])]
        assert lm == pytest.approx(it["scores"], abs=1e-4), it
        assert "ABCD"[int(np.argmax(lm))] == it["prediction"], it
    acc = results["results"][task]["acc,none"]
    assert 100.0 * acc == pytest.approx(ll.accuracy)
    same_as_seed = sum(a["prediction"] == b["prediction"] for a, b in zip(ll.items, ours["seed"].items))
    if which == "trained":
        assert acc == 1.0 and ours["seed"].accuracy == 100.0 and same_as_seed == n
    else:
        assert same_as_seed < n, "the seed's score and lm-eval's differ on a model that is unsure"
