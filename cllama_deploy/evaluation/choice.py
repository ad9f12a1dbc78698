r"""``cllama-deploy eval choice``: C-Eval-style multiple choice, scored from the next-token logits.

Data layout (C-Eval's release, flat or in ``dev/``, ``val/``, ``test/`` sub-directories):
``{subject}_dev.csv`` (the few-shot examples) and ``{subject}_val.csv`` / ``{subject}_test.csv`` with the
columns ``id,question,A,B,C,D,answer`` (``answer`` empty in the test split).

The prompt is C-Eval's (and the seed's, Chinese-LLaMA-Alpaca ``scripts/ceval``)::

    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\n\n
    {k solved dev examples: question\nA. …\nB. …\nC. …\nD. …\n答案：X\n\n}
    {question\nA. …\nB. …\nC. …\nD. …\n答案：}

with the subject's Chinese name (C-Eval's subject table, or ``subject_mapping.json`` next to the data).
With ``--template alpaca`` the question ends with ``答案是什么？ `` instead of ``答案：`` and the whole text is
wrapped in the Alpaca prompt the model was fine-tuned with (the seed's ``with_prompt``).

Answer-only scoring, the seed's ``constrained_decoding``: from the logits of the token after the prompt,
each letter scores ``logit(▁X) + logit(X)`` — the letter with the SentencePiece word-start marker (what
``encode("X")`` gives) plus the bare letter (the last token of ``encode("：X")``) — and the highest wins.
The seed evaluated zero-shot without the first line; here it is always there (C-Eval's official prompt).

``--score loglikelihood`` instead scores each letter the way lm-evaluation-harness's ``multiple_choice``
tasks do (``acc``): the log-probability of the letter's tokens appended to the prompt text, with lm-eval's
split of the text into context and continuation (the tokens of ``prompt + X`` after the prompt's own
tokens; whitespace ending the prompt moves to the continuation). After ``答案：`` that continuation is the bare
``X`` piece alone, so the two methods differ: the seed's
adds the ``▁X`` logit (and compares raw logits), lm-eval's does not; on a model that is not sure of an answer
they pick different letters (docs/evaluation.md, the lm-eval section).
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cllama_deploy.errors import ConfigError, InputError
from cllama_deploy.evaluation.models import ModelOptions, model_kind, open_scorer
from cllama_deploy.evaluation.stats import log_softmax_rows, nll_of
from cllama_deploy.files import write_text_atomic
from cllama_deploy.options import option

LETTERS = ("A", "B", "C", "D")
HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
ANSWER = "\n答案："
ANSWER_WITH_TEMPLATE = "\n答案是什么？ "
TEMPLATES = ("none", "alpaca", "alpaca-2")
SCORES = ("seed", "loglikelihood")
METHODS = {
    "seed": "C-Eval prompt; answer = argmax over A-D of logit(▁X) + logit(X) after the prompt",
    "loglikelihood": "C-Eval prompt; answer = argmax over A-D of log P(tokens of X appended to the prompt), "
                     "lm-evaluation-harness's multiple_choice acc",
}

# C-Eval's 52 subjects: file key → (Chinese name used in the prompt, category). From C-Eval's
# subject_mapping.json (also shipped in Chinese-LLaMA-Alpaca scripts/ceval/subject_mapping.json).
SUBJECTS: dict[str, tuple[str, str]] = {
    "computer_network": ("计算机网络", "STEM"),
    "operating_system": ("操作系统", "STEM"),
    "computer_architecture": ("计算机组成", "STEM"),
    "college_programming": ("大学编程", "STEM"),
    "college_physics": ("大学物理", "STEM"),
    "college_chemistry": ("大学化学", "STEM"),
    "advanced_mathematics": ("高等数学", "STEM"),
    "probability_and_statistics": ("概率统计", "STEM"),
    "discrete_mathematics": ("离散数学", "STEM"),
    "electrical_engineer": ("注册电气工程师", "STEM"),
    "metrology_engineer": ("注册计量师", "STEM"),
    "high_school_mathematics": ("高中数学", "STEM"),
    "high_school_physics": ("高中物理", "STEM"),
    "high_school_chemistry": ("高中化学", "STEM"),
    "high_school_biology": ("高中生物", "STEM"),
    "middle_school_mathematics": ("初中数学", "STEM"),
    "middle_school_biology": ("初中生物", "STEM"),
    "middle_school_physics": ("初中物理", "STEM"),
    "middle_school_chemistry": ("初中化学", "STEM"),
    "veterinary_medicine": ("兽医学", "STEM"),
    "college_economics": ("大学经济学", "Social Science"),
    "business_administration": ("工商管理", "Social Science"),
    "marxism": ("马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("教育学", "Social Science"),
    "teacher_qualification": ("教师资格", "Social Science"),
    "high_school_politics": ("高中政治", "Social Science"),
    "high_school_geography": ("高中地理", "Social Science"),
    "middle_school_politics": ("初中政治", "Social Science"),
    "middle_school_geography": ("初中地理", "Social Science"),
    "modern_chinese_history": ("近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"),
    "logic": ("逻辑学", "Humanities"),
    "law": ("法学", "Humanities"),
    "chinese_language_and_literature": ("中国语言文学", "Humanities"),
    "art_studies": ("艺术学", "Humanities"),
    "professional_tour_guide": ("导游资格", "Humanities"),
    "legal_professional": ("法律职业资格", "Humanities"),
    "high_school_chinese": ("高中语文", "Humanities"),
    "high_school_history": ("高中历史", "Humanities"),
    "middle_school_history": ("初中历史", "Humanities"),
    "civil_servant": ("公务员", "Other"),
    "sports_science": ("体育学", "Other"),
    "plant_protection": ("植物保护", "Other"),
    "basic_medicine": ("基础医学", "Other"),
    "clinical_medicine": ("临床医学", "Other"),
    "urban_and_rural_planner": ("注册城乡规划师", "Other"),
    "accountant": ("注册会计师", "Other"),
    "fire_engineer": ("注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"),
    "tax_accountant": ("税务师", "Other"),
    "physician": ("医师资格", "Other"),
}


@dataclass(kw_only=True)
class ChoiceConfig(ModelOptions):
    """Options of ``cllama-deploy eval choice``."""

    model: Path = option(help="GGUF file, or an HF model directory (with --lora adapters).", argument=True,
                         metavar="MODEL")
    data: Path = option(help="C-Eval-format directory: {subject}_dev.csv and {subject}_val.csv or _test.csv "
                        "(flat, or in dev/ val/ test/).")
    split: str = option("val", "Which questions to answer: val (with answers: accuracy) or test (no answers: "
                        "only submission.json).", choices=("val", "test"))
    shots: int = option(5, "Solved dev examples before each question (0 = zero-shot).", flag=("--shots", "-k"))
    template: str = option("none", "Wrap each prompt in this instruction template (the seed's with_prompt option is "
                           "alpaca).", choices=TEMPLATES)
    score: str = option("seed", "How a letter is scored: seed (logit(▁X) + logit(X) of the token after the "
                        "prompt, the seed's answer-only method) or loglikelihood (log-probability of the letter "
                        "appended to the prompt, lm-evaluation-harness's multiple_choice acc).", choices=SCORES)
    subjects: list[str] = option([], "Only these subjects (file keys like computer_network); repeat or "
                                 "comma-separate.", flag="--subject", default_text="every subject in --data")
    ctx: int = option(0, "Context size for a GGUF model (0 = its trained context); examples are dropped from a "
                      "prompt that does not fit.")
    out: Path | None = option(None, "Directory to write submission.json (C-Eval's / the seed's format) to.",
                              default_text="no submission file")
    json_path: Path | None = option(None, "Write the report (per item, per subject, overall) as JSON to this file.",
                                    flag="--json", default_text="no JSON")
    show_progress: bool = option(True, "No progress bar on stderr.", flag=("--quiet", "-q"), invert=True)

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        model_kind(self.model)
        self._check_model_options()
        self.data = Path(self.data)
        if not self.data.is_dir():
            raise ConfigError(f"--data {self.data}: not a directory (expected C-Eval's {{subject}}_val.csv files)")
        if self.split not in ("val", "test"):
            raise ConfigError(f"--split {self.split!r}: choose val or test")
        if self.shots < 0:
            raise ConfigError(f"--shots must be >= 0, got {self.shots}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"--template {self.template!r}: choose one of {', '.join(TEMPLATES)}")
        if self.score not in SCORES:
            raise ConfigError(f"--score {self.score!r}: choose one of {', '.join(SCORES)}")
        if self.ctx < 0:
            raise ConfigError(f"--ctx must be >= 0 (0 = the model's trained context), got {self.ctx}")
        self.subjects = [s.strip() for v in (self.subjects or []) for s in str(v).split(",") if s.strip()]
        if self.out is not None:
            self.out = Path(self.out)
            if self.out.exists() and not self.out.is_dir():
                raise ConfigError(f"--out {self.out} is a file; give a directory")


# ------------------------------------------------------------------------------------ data

@dataclass
class Item:
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str | None  # None in the test split


def _find(data: Path, subject: str, split: str) -> Path | None:
    for p in (data / split / f"{subject}_{split}.csv", data / f"{subject}_{split}.csv"):
        if p.is_file():
            return p
    return None


def find_subjects(data: Path, split: str) -> list[str]:
    found = {p.name[: -len(f"_{split}.csv")] for d in (data, data / split) if d.is_dir()
             for p in d.glob(f"*_{split}.csv")}
    return sorted(found)


def read_items(path: Path, need_answer: bool) -> list[Item]:
    """Rows of a C-Eval CSV (``id,question,A,B,C,D,answer``; extra columns such as explanation ignored).

    Raises:
        InputError: a missing column, or a missing/invalid answer where one is needed.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            missing = [c for c in ("question", *LETTERS) if c not in cols]
            if missing or (need_answer and "answer" not in cols):
                missing += [] if not need_answer or "answer" in cols else ["answer"]
                raise InputError(f"{path}: missing column(s) {', '.join(missing)}; C-Eval files have "
                                 "id,question,A,B,C,D,answer")
            items = []
            for n, row in enumerate(reader):
                ans = (row.get("answer") or "").strip() or None
                if need_answer and ans not in LETTERS:
                    raise InputError(f"{path}: row {n + 2} has answer {ans!r}; expected one of A, B, C, D")
                rid = (row.get("id") or "").strip() or str(n)
                items.append(Item(rid, row["question"], tuple(row[c] for c in LETTERS), ans if ans in LETTERS else None))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 ({exc})") from exc
    return items


def subject_names(data: Path) -> dict[str, tuple[str, str]]:
    """C-Eval's table, overridden by a subject_mapping.json in the data directory (key → [en, zh, group])."""
    names = dict(SUBJECTS)
    for p in (data / "subject_mapping.json", data.parent / "subject_mapping.json"):
        if p.is_file():
            try:
                for key, value in json.loads(p.read_text(encoding="utf-8")).items():
                    names[key] = (value[1], value[2])
            except (ValueError, IndexError, TypeError, AttributeError) as exc:
                raise InputError(f"{p}: expected {{subject: [English name, Chinese name, category]}} ({exc})") from exc
            break
    return names


# ------------------------------------------------------------------------------------ prompts

def format_item(item: Item, answer: str | None = None, *, with_template: bool = False) -> str:
    r"""One question; with ``answer`` it is a solved example (ends ``答案：X\n\n``)."""
    text = item.question + "".join(f"\n{c}. {o}" for c, o in zip(LETTERS, item.options))
    if answer is not None:
        return text + ANSWER + answer + "\n\n"
    return text + (ANSWER_WITH_TEMPLATE if with_template else ANSWER)


def build_prompt(subject_zh: str, item: Item, examples: list[Item], template: str = "none") -> str:
    """The full prompt text (no BOS) of one question."""
    text = HEADER.format(subject=subject_zh) + "".join(format_item(e, e.answer) for e in examples)
    text += format_item(item, with_template=template != "none")
    if template != "none":
        from cllama_deploy import prompts

        text = prompts.build_prompt(text, variant=template)
    return text


def loglikelihoods(scorer, prompt: str, choices: Sequence[str] = LETTERS) -> tuple[list[float], list[list[int]]]:
    """lm-evaluation-harness's ``multiple_choice`` scores: per choice, the summed log-probability of its
    continuation tokens, split as lm-eval's ``_encode_pair`` splits them: whitespace at the end of the prompt
    moves to the continuation (the Alpaca template's ``### Response: `` scores ``" X"``), the context is the
    rest with BOS, and the continuation is the tokens of ``context + continuation`` after the context's.

    Returns:
        (scores, continuations): one log-likelihood and one token-id list per choice.
    """
    context = prompt.rstrip()
    spaces = prompt[len(context):]
    ids = scorer.tokenize(context, add_bos=True)
    first = log_softmax_rows(np.asarray(scorer.last_logits(ids))[None])[0]
    scores, conts = [], []
    for c in choices:
        cont = scorer.tokenize(context + spaces + c, add_bos=True)[len(ids):]
        if len(cont) == 1:
            lp = float(first[cont[0]])
        else:  # a continuation of several pieces: teacher-forced over it
            rows = scorer.window_logits(ids + cont[:-1], first=len(ids) - 1)
            lp = float(first[cont[0]]) - float(nll_of(np.asarray(rows)[1:], cont[1:]).sum())
        scores.append(lp)
        conts.append(cont)
    return scores, conts


def letter_ids(scorer) -> tuple[list[int], list[int]]:
    """(ids of "▁A".."▁D", ids of bare "A".."D") the seed's way: ``encode("A")[0]`` and ``encode("：A")[-1]``."""
    spaced = [scorer.tokenize(c, add_bos=False)[0] for c in LETTERS]
    bare = [scorer.tokenize("：" + c, add_bos=False)[-1] for c in LETTERS]
    return spaced, bare


# ------------------------------------------------------------------------------------ running

@dataclass
class SubjectResult:
    subject: str
    name: str
    group: str
    num: int
    correct: int | None
    shots: int
    fewer_shots: int = 0

    @property
    def accuracy(self) -> float | None:
        return 100.0 * self.correct / self.num if self.correct is not None and self.num else None

    def to_dict(self) -> dict:
        return {"subject": self.subject, "name": self.name, "group": self.group, "num": self.num,
                "correct": self.correct, "accuracy": self.accuracy, "shots": self.shots,
                "items_with_fewer_shots": self.fewer_shots}


@dataclass
class ChoiceResult:
    model: str
    backend: str
    split: str
    shots: int
    template: str
    subjects: list[SubjectResult]
    items: list[dict]
    letter_ids: dict
    seconds: float
    score: str = "seed"
    outputs: dict = field(default_factory=dict)

    @property
    def num(self) -> int:
        return sum(s.num for s in self.subjects)

    @property
    def accuracy(self) -> float | None:
        """Size-weighted accuracy in percent (correct answers over all questions; the seed's "All")."""
        if not self.subjects or any(s.correct is None for s in self.subjects):
            return None
        return 100.0 * sum(s.correct for s in self.subjects) / self.num

    @property
    def subject_mean(self) -> float | None:
        """Unweighted mean of the subjects' accuracies."""
        accs = [s.accuracy for s in self.subjects]
        if not accs or any(a is None for a in accs):
            return None
        return float(np.mean(accs))

    def groups(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for s in self.subjects:
            g = out.setdefault(s.group, {"num": 0, "correct": 0})
            g["num"] += s.num
            g["correct"] = None if s.correct is None or g["correct"] is None else g["correct"] + s.correct
        for g in out.values():
            g["accuracy"] = 100.0 * g["correct"] / g["num"] if g["correct"] is not None and g["num"] else None
        return out

    def submission(self) -> dict[str, dict[str, str]]:
        """C-Eval's submission file as the seed wrote it: {subject: {id: letter}}."""
        out: dict[str, dict[str, str]] = {}
        for it in self.items:
            out.setdefault(it["subject"], {})[it["id"]] = it["prediction"]
        return out

    def to_dict(self) -> dict:
        return {"model": self.model, "backend": self.backend, "split": self.split, "shots": self.shots,
                "template": self.template, "num": self.num, "accuracy": self.accuracy,
                "subject_mean_accuracy": self.subject_mean, "groups": self.groups(),
                "subjects": [s.to_dict() for s in self.subjects], "letter_ids": self.letter_ids,
                "seconds": round(self.seconds, 2), "items": self.items,
                "score": self.score, "method": METHODS[self.score]}


def _fit(scorer, subject_zh: str, item: Item, examples: list[Item], template: str,
         n_ctx: int) -> tuple[str, list[int], int]:
    """The prompt and its token ids with as many of the examples as fit in ``n_ctx`` (dropping from the end)."""
    k = len(examples)
    while True:
        text = build_prompt(subject_zh, item, examples[:k], template)
        ids = scorer.tokenize(text, add_bos=True)
        if not n_ctx or len(ids) < n_ctx or k == 0:
            break
        k -= 1
    if n_ctx and len(ids) >= n_ctx:
        raise InputError(f"question {item.id} does not fit the context of {n_ctx} tokens even without examples "
                         f"({len(ids)} tokens); raise --ctx")
    return text, ids, k


def evaluate_choice(config: ChoiceConfig) -> ChoiceResult:
    """``cllama-deploy eval choice``: answer every question, score per subject and overall, write the files.

    Raises:
        ConfigError / InputError: bad options, missing or malformed data files.
    """
    t0 = time.perf_counter()
    need_answer = config.split == "val"
    subjects = config.subjects or find_subjects(config.data, config.split)
    if not subjects:
        raise InputError(f"--data {config.data}: no *_{config.split}.csv files (C-Eval layout: "
                         f"{{subject}}_{config.split}.csv, flat or in {config.split}/)")
    names = subject_names(config.data)
    plan = []
    for subj in subjects:
        path = _find(config.data, subj, config.split)
        if path is None:
            raise InputError(f"--subject {subj}: no {subj}_{config.split}.csv in {config.data}")
        dev: list[Item] = []
        if config.shots:
            dev_path = _find(config.data, subj, "dev")
            if dev_path is None:
                raise InputError(f"--shots {config.shots} needs {subj}_dev.csv in {config.data} (or use --shots 0)")
            dev = read_items(dev_path, need_answer=True)[: config.shots]
        plan.append((subj, read_items(path, need_answer), dev))

    scorer = open_scorer(config.model, config, n_ctx=config.ctx)
    # the same budget on both sides (0: the trained context), so they drop the same examples; not the llama.cpp
    # context's own size, which llama.cpp rounds up (to a multiple of 256)
    n_ctx = config.ctx or scorer.n_ctx_train
    try:
        spaced, bare = letter_ids(scorer)
        results: list[SubjectResult] = []
        items: list[dict] = []
        total = sum(len(q) for _, q, _ in plan)
        with contextlib.ExitStack() as stack:
            bar = task = None
            if config.show_progress:
                from cllama_deploy.progress import progress

                bar = stack.enter_context(progress(transient=True))
                task = bar.add_task("questions", total=total)
            for subj, questions, dev in plan:
                zh, group = names.get(subj, (subj.replace("_", " "), "Other"))
                correct = 0 if need_answer else None
                fewer = 0
                for item in questions:
                    text, ids, k = _fit(scorer, zh, item, dev, config.template, n_ctx)
                    fewer += k < len(dev)
                    extra = {}
                    if config.score == "loglikelihood":
                        scores, extra["continuations"] = loglikelihoods(scorer, text)
                    else:
                        logits = scorer.last_logits(ids)
                        scores = logits[spaced] + logits[bare]
                    pred = LETTERS[int(np.argmax(scores))]
                    if need_answer:
                        correct += pred == item.answer
                    items.append({"subject": subj, "id": item.id, "answer": item.answer, "prediction": pred,
                                  "scores": [round(float(x), 5) for x in scores], "prompt_tokens": len(ids),
                                  "shots": k, **extra})
                    if bar is not None:
                        bar.advance(task)
                results.append(SubjectResult(subj, zh, group, len(questions), correct, len(dev), fewer))
    finally:
        scorer.close()
    result = ChoiceResult(
        model=str(config.model), backend=scorer.kind, split=config.split, shots=config.shots,
        template=config.template, subjects=results, items=items, seconds=time.perf_counter() - t0,
        letter_ids={"spaced": spaced, "bare": bare}, score=config.score,
    )
    if config.out is not None:
        path = config.out / "submission.json"
        write_text_atomic(path, json.dumps(result.submission(), ensure_ascii=False, indent=4) + "\n")
        result.outputs["submission"] = str(path)
    if config.json_path is not None:
        write_text_atomic(config.json_path, json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n")
        result.outputs["json"] = str(config.json_path)
    return result
