"""``cllama-deploy generate``: a file of instructions → a file of predictions (the seed's ``inference_hf.py
--data_file ... --predictions_file ...``), every prompt submitted at once so the engine's scheduler decodes
them together (continuous batching), or ``batch_size`` at a time through transformers for an HF model.

Inputs (by extension): ``.jsonl`` one JSON object per line with ``instruction`` (and optional ``input``),
``.json`` a list of such objects (Alpaca data), anything else one instruction per line (empty lines skipped).
Outputs: ``.jsonl`` one ``{"instruction", "input", "output"}`` per line (Alpaca's keys, usable as data
again), anything else the seed's ``predictions.json``: a JSON list of ``{"Input", "Output"}``. One
prediction per input, in input order; the file appears only once complete.

``--with-prompt`` wraps each instruction in the model's chat template (as one user turn, with ``--system``
if given), exactly the server's ``/v1/chat/completions`` request; without it the text itself is the prompt
(``/v1/completions``). :func:`prompt_of` and :func:`~cllama_deploy.inference.backends.request_body` say
which request each prediction is.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cllama_deploy.engine.llamacpp import DEFAULT_PARALLEL
from cllama_deploy.errors import ConfigError, InputError
from cllama_deploy.files import write_text_atomic
from cllama_deploy.inference.backends import Backend, Prompt, Reply, open_backend
from cllama_deploy.inference.options import InferenceOptions, Sampling
from cllama_deploy.options import option


@dataclass(kw_only=True)
class GenerateConfig(InferenceOptions):
    """Options of ``cllama-deploy generate``."""

    data_file: Path = option(help="Instructions: one per line, or .jsonl / .json records with instruction (and "
                             "input).")
    predictions: Path = option(Path("predictions.json"), "Where the predictions go: the seed's JSON list of "
                               "{Input, Output}, or .jsonl lines of {instruction, input, output}.")
    with_prompt: bool = option(False, "Wrap each instruction in the chat template (the seed's with_prompt); "
                               "without it the text itself is the prompt.")
    parallel: int = option(DEFAULT_PARALLEL, "Sequences a GGUF's engine decodes together.")
    batch_size: int = option(8, "Prompts per transformers generate call (HF models).")
    show_progress: bool = option(True, "No progress bar on stderr.", flag=("--quiet", "-q"), invert=True)

    def __post_init__(self) -> None:
        self._check_inference_options()
        self.data_file = Path(self.data_file)
        if not self.data_file.is_file():
            raise ConfigError(f"--data-file {self.data_file}: no such file")
        self.predictions = Path(self.predictions)
        if self.predictions.is_dir():
            raise ConfigError(f"--predictions {self.predictions} is a directory; give a file name "
                              "(predictions.json or .jsonl)")
        if self.system is not None and not self.with_prompt:
            raise ConfigError("--system goes into the chat template: give --with-prompt too")
        if not 1 <= self.parallel <= 64:
            raise ConfigError(f"--parallel must be between 1 and 64, got {self.parallel}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass
class Item:
    """One input: where it came from (``line``), its instruction and optional input."""

    line: int
    instruction: str
    input: str = ""

    @property
    def text(self) -> str:
        """The instruction with its input on the next line, as the seed joined them."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


@dataclass
class GenerateResult:
    """What ``generate`` wrote."""

    predictions: Path
    items: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reasons: dict[str, int] = field(default_factory=dict)
    shortened: int = 0  # prompts whose reply limit was lowered to fit the context
    backend: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def _record(obj, where: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object with an 'instruction', got {type(obj).__name__}")
    ins, inp = obj.get("instruction"), obj.get("input", "") or ""
    if not isinstance(ins, str) or not ins.strip():
        raise InputError(f"{where}: no 'instruction' (a non-empty string)")
    if not isinstance(inp, str):
        raise InputError(f"{where}: 'input' must be a string")
    return ins, inp


def read_items(path: Path) -> list[Item]:
    """The inputs of ``path`` (see the module docstring for the formats).

    Raises:
        InputError: unreadable file, bad JSON (the line is named), a record without an instruction, no inputs.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"--data-file {path}: not UTF-8 text ({exc})") from exc
    items: list[Item] = []
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"--data-file {path} line {n}: not JSON ({exc.msg})") from exc
            items.append(Item(n, *_record(obj, f"--data-file {path} line {n}")))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"--data-file {path}: not JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(data, list):
            raise InputError(f"--data-file {path}: expected a JSON list of records with 'instruction'")
        for n, obj in enumerate(data, 1):
            items.append(Item(n, *_record(obj, f"--data-file {path} record {n}")))
    else:
        items = [Item(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not items:
        raise InputError(f"--data-file {path}: no instructions in it")
    return items


def prompt_of(item: Item, with_prompt: bool, system: Optional[str] = None) -> Prompt:
    """Chat messages (``with_prompt``: one user turn, after ``system``) or the raw text."""
    if not with_prompt:
        return item.text
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": item.text}]


def plan_jobs(backend: Backend, items: list[Item], config: GenerateConfig) -> tuple[list[tuple[Prompt, Sampling]], int]:
    """Each item's prompt and sampling; a reply limit that would overflow the context is lowered to what is
    left (counted). Raises InputError naming the first input that leaves no room at all."""
    sampling = config.sampling
    jobs, shortened = [], 0
    for item in items:
        prompt = prompt_of(item, config.with_prompt, config.system)
        n = backend.prompt_tokens(prompt)
        room = backend.n_ctx - n
        if room < 1:
            raise InputError(f"--data-file {config.data_file} line {item.line}: the prompt has {n} tokens, which "
                             f"leaves no room for a reply in the {backend.n_ctx}-token context; shorten it or give "
                             "a larger --n-ctx")
        s = sampling
        if room < s.max_tokens:
            s, shortened = dataclasses.replace(s, max_tokens=room), shortened + 1
        jobs.append((prompt, s))
    return jobs, shortened


def write_predictions(path: Path, items: list[Item], replies: list[Reply]) -> None:
    """The seed's JSON list of ``{"Input", "Output"}``, or JSON Lines of ``{"instruction", "input", "output"}``."""
    if Path(path).suffix.lower() == ".jsonl":
        text = "".join(json.dumps({"instruction": i.instruction, "input": i.input, "output": r.text},
                                  ensure_ascii=False) + "\n" for i, r in zip(items, replies))
    else:
        text = json.dumps([{"Input": i.text, "Output": r.text} for i, r in zip(items, replies)],
                          ensure_ascii=False, indent=2) + "\n"
    write_text_atomic(path, text)


def generate(config: GenerateConfig, *, backend: Optional[Backend] = None,
             on_done: Optional[Callable[[int, Reply], None]] = None) -> GenerateResult:
    """Predict every input of ``config.data_file`` and write ``config.predictions``.

    Args:
        config: the options.
        backend: a loaded model to use (default: opened from ``config`` and closed at the end).
        on_done: called with (index, reply) as each prediction finishes (in any order).
    """
    items = read_items(config.data_file)
    own = backend is None
    if own:
        backend = open_backend(config, parallel=config.parallel, batch_size=config.batch_size)
    try:
        jobs, shortened = plan_jobs(backend, items, config)
        t0 = time.perf_counter()
        replies = _run(backend, jobs, config.show_progress, on_done)
        seconds = time.perf_counter() - t0
    finally:
        if own:
            backend.close()
    write_predictions(config.predictions, items, replies)
    reasons: dict[str, int] = {}
    for r in replies:
        reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
    return GenerateResult(config.predictions, len(items), sum(r.prompt_tokens for r in replies),
                          sum(r.completion_tokens for r in replies), seconds, reasons, shortened,
                          f"{backend.name} ({backend.kind})")


def _run(backend: Backend, jobs, show_progress: bool, on_done) -> list[Reply]:
    import contextlib

    from cllama_deploy.progress import progress

    with (progress() if show_progress else contextlib.nullcontext()) as bar:
        task = bar.add_task("generating", total=len(jobs)) if bar is not None else None

        def done(i: int, reply: Reply) -> None:
            if bar is not None:
                bar.advance(task)
            if on_done is not None:
                on_done(i, reply)

        return backend.run_all(jobs, done)
