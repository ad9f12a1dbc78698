"""Session fixtures for the evaluation tests: a merged (LLaMA + Chinese) tiny tokenizer, a tiny LLaMA, a real PEFT
adapter, their F32 GGUFs written by our converter / deploy, a scoring text, and a C-Eval-format set with a model
trained to answer it."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

from tests import builders
from tests.evaluation import builders_eval as be
from tests.gguf import builders_gguf as bg


def _convert(model_dir, out):
    from cllama_deploy.gguf.convert import ConvertConfig, convert

    convert(ConvertConfig(model_dir=model_dir, out=out, outtype="f32", show_progress=False))
    return out


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def ev_tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev_tok")
    base = bg.base_tokenizer(root / "base.model")
    zh = bg.zh_tokenizer(root / "zh.model")
    return bg.merge_sp(base, zh, root / "tokenizer.model")


@pytest.fixture(scope="session")
def ev_models(tmp_path_factory, ev_tok):
    """A tiny GQA LLaMA (tamed weights), a real PEFT adapter on it, and F32 GGUFs of both: the base converted
    by `convert`, base + adapter merged and converted by `deploy`."""
    from transformers import AutoModelForCausalLM

    from cllama_deploy.pipeline import DeployConfig, deploy
    from tests.merge.builders_lora import make_adapter

    root = tmp_path_factory.mktemp("ev_models")
    base = bg.tame(builders.make_tiny_llama(root / "base", bg.sp_size(ev_tok), num_heads=4, num_kv_heads=2,
                                            max_position_embeddings=1024, tokenizer_model=ev_tok, seed=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = make_adapter(AutoModelForCausalLM.from_pretrained(str(base)), root / "lora", r=4, alpha=1, seed=4)
    base_gguf = _convert(base, root / "base-F32.gguf")
    out = deploy(DeployConfig(base=base, loras=[lora], quants=["F32"], out=root / "deploy", name="adapted",
                              show_progress=False))
    return SimpleNamespace(root=root, base=base, lora=lora, base_gguf=base_gguf, adapted_gguf=out.outputs[0].path)


@pytest.fixture(scope="session")
def ev_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("ev_text") / "text.txt"
    path.write_text(be.scoring_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def choice_case(tmp_path_factory, ev_models):
    """A C-Eval-format set (4 subjects of unequal size, 3 dev examples each), the same questions with random
    answers, and a tiny LLaMA trained until the right letter wins every zero-shot prompt, as HF and F32 GGUF."""
    from cllama_deploy.evaluation.choice import SUBJECTS, Item, build_prompt, letter_ids
    from cllama_deploy.evaluation.models import HFScorer

    root = tmp_path_factory.mktemp("ev_choice")
    val, dev = be.ceval_set(seed=0)
    data = be.write_ceval(root / "ceval", val, dev, test=val)
    shuffled = be.write_ceval(root / "ceval_shuffled", be.relabel(val, seed=1), dev)
    scorer = HFScorer(ev_models.base)
    ids = letter_ids(scorer)
    prompts, answers = [], []
    for subject, rows in val.items():
        for r in rows:
            item = Item(r["id"], r["question"], tuple(r[c] for c in be.LETTERS), r["answer"])
            prompts.append(scorer.tokenize(build_prompt(SUBJECTS[subject][0], item, []), add_bos=True))
            answers.append(be.LETTERS.index(r["answer"]))
    scorer.close()
    trained = root / "trained"
    info = be.train_to_answer(ev_models.base, trained, prompts, answers, ids)
    assert info["margin"] > 5.0, info
    return SimpleNamespace(root=root, data=data, shuffled=shuffled, val=val, dev=dev, hf=trained,
                           gguf=_convert(trained, root / "trained-F32.gguf"), train=info)
