"""`eval choice`: C-Eval layout and prompt, answer-only scoring from the letters' logits, HF and GGUF alike."""

from __future__ import annotations

import json
import math

import pytest

from cllama_deploy.cli import main
from cllama_deploy.evaluation.choice import ChoiceConfig, Item, build_prompt, evaluate_choice, letter_ids
from tests.evaluation import builders_eval as be


def _run(model, data, **kw):
    kw.setdefault("shots", 0)
    return evaluate_choice(ChoiceConfig(model=model, data=data, show_progress=False, **kw))


@pytest.fixture(scope="module")
def zero_shot(choice_case):
    return {kind: _run(getattr(choice_case, kind), choice_case.data) for kind in ("hf", "gguf")}


def test_trained_model_scores_100_percent_on_hf_and_gguf(zero_shot, choice_case):
    n = sum(len(v) for v in choice_case.val.values())
    for kind, r in zero_shot.items():
        assert r.backend == kind and r.num == n
        assert r.accuracy == 100.0, (kind, [(s.subject, s.accuracy) for s in r.subjects])


def test_shuffled_answers_score_at_chance(choice_case, zero_shot):
    r = _run(choice_case.gguf, choice_case.shuffled)
    truth = {(s, row["id"]): row["answer"] for s, rows in choice_case.val.items() for row in rows}
    relabeled = {(s, row["id"]): row["answer"] for s, rows in be.relabel(choice_case.val, seed=1).items()
                 for row in rows}
    # the model still answers what it learned, so it is right exactly where the random label hits the real one
    assert all(it["prediction"] == truth[(it["subject"], it["id"])] for it in r.items)
    hits = sum(truth[k] == relabeled[k] for k in truth)
    assert r.accuracy == pytest.approx(100.0 * hits / r.num)
    sd = 100.0 * math.sqrt(0.25 * 0.75 / r.num)
    assert abs(r.accuracy - 25.0) < 3.5 * sd, r.accuracy
    # size-weighted accuracy vs the mean over subjects (the subjects have 8/12/16/12 questions)
    assert r.accuracy == pytest.approx(100.0 * sum(s.correct for s in r.subjects) / sum(s.num for s in r.subjects))
    assert r.subject_mean == pytest.approx(sum(s.accuracy for s in r.subjects) / len(r.subjects))


@pytest.mark.parametrize("shots, template, score", [(0, "none", "seed"), (2, "none", "seed"), (0, "alpaca", "seed"),
                                                   (3, "alpaca", "seed"), (2, "none", "loglikelihood"),
                                                   (0, "alpaca", "loglikelihood")])
def test_hf_and_gguf_agree_on_every_item(shots, template, score, choice_case):
    hf = _run(choice_case.hf, choice_case.data, shots=shots, template=template, score=score)
    gg = _run(choice_case.gguf, choice_case.data, shots=shots, template=template, score=score, kv_cache_type="f32")
    assert hf.score == gg.score == score
    assert hf.letter_ids == gg.letter_ids
    assert [it["prompt_tokens"] for it in hf.items] == [it["prompt_tokens"] for it in gg.items]
    assert [it["prediction"] for it in hf.items] == [it["prediction"] for it in gg.items]
    for a, b in zip(hf.items, gg.items):
        scale = max(1.0, max(abs(x) for x in a["scores"]))
        assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) < 1e-3 * scale, (a, b)
    assert all(it["shots"] == shots for it in gg.items)


def test_loglikelihood_is_the_log_probability_of_the_continuation(choice_case):
    """``--score loglikelihood`` is lm-eval's: log P(tokens of prompt + choice after the prompt's), teacher-forced;
    after 答案： each letter is its bare piece, and a longer choice sums the log-probabilities of its pieces."""
    import numpy as np

    from cllama_deploy.evaluation.choice import loglikelihoods
    from cllama_deploy.evaluation.models import HFScorer

    r = _run(choice_case.gguf, choice_case.data, score="loglikelihood", kv_cache_type="f32")
    assert all(it["continuations"] == [[t] for t in r.letter_ids["bare"]] for it in r.items)
    assert r.to_dict()["score"] == "loglikelihood" and "lm-evaluation-harness" in r.to_dict()["method"]
    # the trained model is sure of its answers: they are also the letters of highest probability
    assert r.accuracy == 100.0 and all(max(it["scores"]) > -0.1 for it in r.items)

    scorer = HFScorer(choice_case.hf)
    try:
        prompt = "以下是中国关于法学考试的单项选择题。\n答案："
        ids = scorer.tokenize(prompt)
        choices = ["A", "计算机网络", " B. 大学"]
        scores, conts = loglikelihoods(scorer, prompt, choices)
        assert [len(c) for c in conts][0] == 1 and min(len(c) for c in conts[1:]) > 1
        # lm-eval moves whitespace ending the context into the continuation: "… " + "A" scores " A" after "…"
        spaced, spaced_conts = loglikelihoods(scorer, prompt + " ", ["A"])
        assert spaced_conts == [scorer.tokenize(prompt + " A")[len(ids):]] and spaced_conts != [conts[0]]
        assert spaced == loglikelihoods(scorer, prompt, [" A"])[0]
        for score, cont in zip(scores, conts):
            rows = scorer.window_logits(ids + cont)[len(ids) - 1:-1].astype(np.float64)
            logp = rows - np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1, keepdims=True)) \
                - rows.max(1, keepdims=True)
            assert score == pytest.approx(sum(float(logp[j, t]) for j, t in enumerate(cont)), abs=1e-4)
    finally:
        scorer.close()


def test_examples_that_do_not_fit_are_dropped_alike(choice_case):
    hf = _run(choice_case.hf, choice_case.data, shots=3, ctx=200)
    gg = _run(choice_case.gguf, choice_case.data, shots=3, ctx=200)
    shots = [it["shots"] for it in gg.items]
    assert shots == [it["shots"] for it in hf.items] and max(shots) < 3 and all(it["prompt_tokens"] < 200
                                                                                  for it in gg.items)
    assert sum(s.fewer_shots for s in gg.subjects) == sum(k < 3 for k in shots)
    assert [it["prediction"] for it in hf.items] == [it["prediction"] for it in gg.items]


def test_prompt_is_c_eval_s():
    item = Item("0", "1+1=?", ("1", "2", "3", "4"), "B")
    ex = Item("9", "2+2=?", ("4", "5", "6", "7"), "A")
    assert build_prompt("高中数学", item, []) == (
        "以下是中国关于高中数学考试的单项选择题，请选出其中的正确答案。\n\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    assert build_prompt("高中数学", item, [ex]) == (
        "以下是中国关于高中数学考试的单项选择题，请选出其中的正确答案。\n\n"
        "2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：A\n\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    # the seed's --with_prompt: the question asks for the answer, the whole text goes into the Alpaca prompt
    assert build_prompt("高中数学", item, [], template="alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n以下是中国关于高中数学考试的单项选择题，请选出其中的正确答案。\n\n"
        "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案是什么？ \n\n### Response: ")


def test_letter_ids_are_the_seed_s(choice_case):
    from cllama_deploy.evaluation.models import HFScorer

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(choice_case.hf / "tokenizer.model"))
    scorer = HFScorer(choice_case.hf)
    spaced, bare = letter_ids(scorer)
    assert spaced == [sp.encode(c)[0] for c in "ABCD"]  # "▁A" (or "▁" where the vocabulary has no "▁B")
    assert bare == [sp.encode("：" + c)[-1] for c in "ABCD"] and [sp.id_to_piece(i) for i in bare] == list("ABCD")


def test_submission_and_report_files(choice_case, tmp_path):
    out = tmp_path / "out"
    rc = main(["eval", "choice", str(choice_case.gguf), "--data", str(choice_case.data), "--shots", "0",
               "--out", str(out), "--json", str(tmp_path / "r.json"), "-q"])
    assert rc == 0
    sub = json.loads((out / "submission.json").read_text(encoding="utf-8"))
    assert set(sub) == set(choice_case.val)
    for subject, rows in choice_case.val.items():
        assert sub[subject] == {r["id"]: r["answer"] for r in rows}
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["accuracy"] == 100.0 and report["num"] == sum(len(v) for v in choice_case.val.values())
    assert {s["subject"]: s["name"] for s in report["subjects"]}["computer_network"] == "计算机网络"
    assert report["groups"]["STEM"]["num"] == len(choice_case.val["computer_network"]) + \
        len(choice_case.val["high_school_physics"])


def test_test_split_has_no_accuracy_but_a_submission(choice_case, tmp_path):
    r = evaluate_choice(ChoiceConfig(model=choice_case.gguf, data=choice_case.data, split="test", shots=0,
                                     out=tmp_path, show_progress=False, subjects=["law,accountant"]))
    assert r.accuracy is None and [s.subject for s in r.subjects] == ["law", "accountant"]
    assert set(json.loads((tmp_path / "submission.json").read_text())) == {"law", "accountant"}


def test_lm_eval_task_builder_writes_the_same_items(choice_case, tmp_path):
    root = be.write_lm_eval_task(tmp_path / "task", choice_case.val)
    docs = [json.loads(line) for line in (root / "cllama_ceval_local.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(docs) == sum(len(v) for v in choice_case.val.values())
    assert docs[0]["prompt"].endswith("答案：") and docs[0]["prompt"].startswith("以下是中国关于计算机网络考试")


@pytest.mark.parametrize("setup, args, message", [
    ("none", ["--data", "nowhere"], "--data nowhere: not a directory"),
    ("empty", [], "no *_val.csv files"),
    ("nodev", ["--shots", "2"], "needs computer_network_dev.csv"),
    ("badcol", [], "missing column(s) D"),
    ("badans", [], "expected one of A, B, C, D"),
    ("nodev", ["--subject", "physics"], "--subject physics: no physics_val.csv"),
])
def test_user_errors_are_one_line_exit_2(setup, args, message, choice_case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    rows = be.ceval_items(3, seed=0)
    if setup == "nodev":
        be.write_csv(data / "computer_network_val.csv", rows)
    elif setup == "badcol":
        (data / "computer_network_val.csv").write_text("id,question,A,B,C,answer\n0,q,a,b,c,A\n", encoding="utf-8")
    elif setup == "badans":
        be.write_csv(data / "computer_network_val.csv", [dict(r, answer="E") for r in rows])
    argv = ["eval", "choice", str(choice_case.gguf), "-q"] + ([] if "--data" in args else ["--data", str(data)])
    argv += [] if "--shots" in args else ["--shots", "0"]
    assert main(argv + args) == 2
    be.assert_one_line_error(capsys, message)
