"""What both examples share: the model flags, the Chinese text splitter, and an LLM-call counter.

The examples run as scripts (``python examples/langchain/doc_qa.py ...``), so this file is imported
from the script's own directory.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

# Chinese has no spaces between words: split at paragraphs, lines, then sentence and clause marks,
# keeping each mark at the end of the piece it closes.
CHINESE_SEPARATORS = ["\n\n", "\n", "。", "！", "？", "；", "，", "、", ""]


def add_model_flags(parser: argparse.ArgumentParser, *, chunk_size: int, chunk_overlap: int) -> None:
    parser.add_argument("--model", required=True, help="the chat model, a GGUF file "
                        "(for example the quickstart's demo-out/gguf/quickstart-Q4_K_M.gguf)")
    parser.add_argument("--file", required=True, type=Path, help="the Chinese text (UTF-8)")
    parser.add_argument("--chunk-size", type=int, default=chunk_size,
                        help=f"characters per chunk (default {chunk_size})")
    parser.add_argument("--chunk-overlap", type=int, default=chunk_overlap,
                        help=f"characters shared by neighbouring chunks (default {chunk_overlap})")
    parser.add_argument("--max-tokens", type=int, default=400, help="most tokens per answer (default 400)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default 0.2)")
    parser.add_argument("--n-ctx", type=int, default=0,
                        help="context window; 0 = the model's trained context (default)")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: half the CPUs)")
    parser.add_argument("--chat-template", default=None,
                        help="alpaca, alpaca-2 or a .jinja file (default: the GGUF's own template)")


def chat_model(args):
    from cllama_deploy.langchain import ChatCLlama

    return ChatCLlama(model_path=args.model, temperature=args.temperature, max_tokens=args.max_tokens,
                      n_ctx=args.n_ctx, n_threads=args.threads, chat_template=args.chat_template)


def split_text(text: str, chunk_size: int, chunk_overlap: int) -> list:
    """The text as LangChain ``Document`` chunks of at most ``chunk_size`` characters."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap,
                                              separators=CHINESE_SEPARATORS, keep_separator="end")
    return splitter.create_documents([text])


def file_chunks(args) -> list:
    """``--file`` read and split by ``--chunk-size``/``--chunk-overlap``, saying how (both examples start so)."""
    docs = split_text(read_text(args.file), args.chunk_size, args.chunk_overlap)
    print(f"split {args.file.name} into {len(docs)} chunks "
          f"(at most {args.chunk_size} characters, {args.chunk_overlap} overlapping)")
    return docs


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {exc}")
    if not text.strip():
        fail(f"{path} is empty")
    return text


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_flags(args) -> None:
    if args.chunk_size < 1 or not 0 <= args.chunk_overlap < args.chunk_size:
        fail("--chunk-size must be positive and --chunk-overlap in [0, chunk size)")
    if not Path(args.model).is_file():
        fail(f"--model {args.model} does not exist; pass a .gguf file")


def run_main(main) -> None:
    """Run ``main()``; errors a user can cause (a missing file, a prompt too long for the context)
    end with one line and exit code 2 instead of a traceback."""
    from cllama_deploy.errors import InputError

    try:
        main()
    except InputError as exc:
        fail(f"{exc} (a smaller --chunk-size or a larger --n-ctx may help)")
    except KeyboardInterrupt:
        raise SystemExit(130)


def make_counter():
    """A LangChain callback handler counting model calls (``.calls``), pass it in ``config``."""
    from langchain_core.callbacks import BaseCallbackHandler

    class LLMCalls(BaseCallbackHandler):
        def __init__(self) -> None:
            self.calls = 0
            self._lock = threading.Lock()  # batch() runs calls in threads

        def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
            with self._lock:
                self.calls += len(messages)

        def on_llm_start(self, serialized, prompts, **kwargs) -> None:
            with self._lock:
                self.calls += len(prompts)

    return LLMCalls()
