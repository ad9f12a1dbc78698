"""Builders for the evaluation tests: a scoring text, C-Eval-format data sets, a tiny LLaMA trained to answer
them, and the independent perplexity reference (plain transformers, written here from llama.cpp's rules)."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np

from cllama_deploy.quickstart.corpus import chinese_lines, english_lines

LETTERS = "ABCD"
# C-Eval keys (their Chinese names and categories come from evaluation.choice.SUBJECTS); unequal sizes so
# the size-weighted accuracy differs from the mean over subjects
CEVAL_SIZES = {"computer_network": 8, "high_school_physics": 12, "law": 16, "accountant": 12}


def assert_one_line_error(capsys, message: str) -> None:
    """The CLI's user-error contract: the last stderr line is ``error: ...`` and names the problem."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and message in err[-1], err


def scoring_text(n_en: int = 150, n_zh: int = 60, seed: int = 5) -> str:
    """Mixed English / Chinese lines, shuffled (the kind of text `eval ppl` is run on)."""
    lines = english_lines(n_en, seed=seed) + chinese_lines(n_zh, seed=seed + 1)
    random.Random(seed).shuffle(lines)
    return "\n".join(lines) + "\n"


def ceval_items(n: int, seed: int) -> list[dict]:
    """``n`` questions in C-Eval's columns, each with four distinct options and a random answer."""
    rng = random.Random(seed)
    words = sorted({w[:4] for line in chinese_lines(400, seed=seed + 100) for w in line.replace("。", "，").split("，")
                    if len(w) >= 2})
    rows = []
    for i in range(n):
        q = f"{rng.choice(words)}{rng.choice(words)}，第{i}题？"
        opts = rng.sample(words, 4)
        rows.append({"id": str(i), "question": q, **dict(zip(LETTERS, opts)), "answer": rng.choice(LETTERS)})
    return rows


def write_csv(path: Path, rows: list[dict], with_answer: bool = True) -> Path:
    cols = ["id", "question", *LETTERS] + (["answer"] if with_answer else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def write_ceval(root: Path, val: dict[str, list[dict]], dev: dict[str, list[dict]] | None = None,
                test: dict[str, list[dict]] | None = None) -> Path:
    """C-Eval's release layout: dev/{s}_dev.csv, val/{s}_val.csv, test/{s}_test.csv (no answers)."""
    for s, rows in val.items():
        write_csv(root / "val" / f"{s}_val.csv", rows)
    for s, rows in (dev or {}).items():
        write_csv(root / "dev" / f"{s}_dev.csv", rows)
    for s, rows in (test or {}).items():
        write_csv(root / "test" / f"{s}_test.csv", rows, with_answer=False)
    return root


def ceval_set(seed: int = 0) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(val, dev) item sets over CEVAL_SIZES (3 dev examples per subject)."""
    val, dev = {}, {}
    for k, (subject, n) in enumerate(CEVAL_SIZES.items()):
        items = ceval_items(n + 3, seed=seed + 17 * k)
        dev[subject] = [dict(r, id=str(i)) for i, r in enumerate(items[:3])]
        val[subject] = [dict(r, id=str(i)) for i, r in enumerate(items[3:])]
    return val, dev


def relabel(val: dict[str, list[dict]], seed: int) -> dict[str, list[dict]]:
    """The same questions with answers drawn uniformly at random (a model that knows the real answers scores
    at chance, 25 %, on it)."""
    rng = random.Random(seed)
    return {s: [dict(r, answer=rng.choice(LETTERS)) for r in rows] for s, rows in val.items()}


def train_to_answer(base_dir: Path, out_dir: Path, prompts: list[list[int]], answers: list[int],
                    letter_ids: tuple[list[int], list[int]], steps: int = 400, lr: float = 1e-2,
                    seed: int = 0) -> dict:
    """Teach a tiny LLaMA the answer of every prompt, on the token after the prompt only: cross-entropy of the
    bare letter over the vocabulary plus cross-entropy of the seed's four choice scores (logit(▁X) + logit(X)),
    until the right letter wins every prompt by a margin; save it with the base's tokenizer.model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.train()
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
        mask[i, :len(p)] = 1
    last = torch.tensor([len(p) - 1 for p in prompts])
    spaced, bare = (torch.tensor(x) for x in letter_ids)
    target = torch.tensor(answers)  # index 0..3
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = margin = None
    for step in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(n), last]
        choice = logits[:, spaced] + logits[:, bare]
        loss = torch.nn.functional.cross_entropy(choice, target) + \
            torch.nn.functional.cross_entropy(logits, bare[target])
        with torch.no_grad():
            right = choice[torch.arange(n), target]
            other = choice.clone()
            other[torch.arange(n), target] = -torch.inf
            margin = float((right - other.max(dim=1).values).min())
        if margin > 5.0:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    shutil.copy(Path(base_dir) / "tokenizer.model", Path(out_dir) / "tokenizer.model")
    return {"steps": step + 1, "loss": float(loss.detach()), "margin": margin}


def reference_perplexity(model_dir: Path, tokens: list[int], ctx: int, bos_id: int) -> tuple[float, int]:
    """An independent perplexity in plain transformers from llama.cpp's rules: non-overlapping windows of
    ``ctx`` tokens, BOS in front, logits of positions ctx/2 .. ctx-2 scored against the next tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    first = ctx // 2
    with torch.no_grad():
        for i in range(len(tokens) // ctx):
            w = list(tokens[i * ctx:(i + 1) * ctx])
            w[0] = bos_id
            logp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), dim=-1)
            for pos in range(first, ctx - 1):
                nll -= float(logp[pos, w[pos + 1]])
                count += 1
    return float(np.exp(nll / count)), count


def write_lm_eval_task(root: Path, val: dict[str, list[dict]], name: str = "cllama_ceval_local") -> Path:
    """A local lm-evaluation-harness multiple-choice task over the same items (a JSONL data file and a task
    YAML; no hub download): the prompt is ``eval choice``'s zero-shot prompt, the choices are the letters.

    ``lm_eval --model local-completions --tasks NAME --include_path ROOT`` scores the log-likelihood of "A".."D"
    right after ``答案：`` (``target_delimiter: ""``; lm-eval's default " " would score "▁A", a different piece),
    which is ``eval choice --score loglikelihood``.
    """
    from cllama_deploy.evaluation.choice import SUBJECTS, Item, build_prompt

    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for subject, rows in val.items():
            zh = SUBJECTS[subject][0]
            for r in rows:
                item = Item(r["id"], r["question"], tuple(r[c] for c in LETTERS), r["answer"])
                fh.write(json.dumps({"subject": subject, "id": r["id"], "prompt": build_prompt(zh, item, []),
                                     "label": LETTERS.index(r["answer"])}, ensure_ascii=False) + "\n")
    (root / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{prompt}}\"\n"
        "doc_to_choice: [\"A\", \"B\", \"C\", \"D\"]\n"
        "doc_to_target: label\n"
        "target_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    return root
