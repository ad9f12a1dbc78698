"""Summarize a long Chinese text with ``ChatCLlama``, in this process on one GGUF model.

The text is split into chunks that fit the model's context, then:

* ``map_reduce`` (default): each chunk is summarized on its own (all submitted at once: the engine
  decodes them together), and the chunk summaries are combined into one; when they are too long to
  combine in one prompt (``--token-max`` tokens), they are first combined group by group;
* ``refine``: a summary of the first chunk, then one call per further chunk that extends it;
* ``stuff``: the whole text in one prompt (only for texts that fit the context).

    python examples/langchain/summarize.py --model demo-out/gguf/quickstart-Q4_K_M.gguf \\
        --file examples/langchain/qingxi_town.txt --chain-type refine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _shared  # noqa: E402

# map (and stuff, and the first refine step): one piece of text to summarize
SUMMARY_PROMPT = "请用简洁的中文概括下面这段文字的主要内容：\n\n{text}"
# reduce: the summaries of consecutive parts, to be merged
COMBINE_PROMPT = (
    "下面是同一篇文章各个部分的摘要，按原文顺序排列：\n\n"
    "{text}\n\n"
    "请把它们合并成一篇连贯、不重复的总摘要。"
)
# refine: the summary so far and the next part of the text
REFINE_PROMPT = (
    "这是前文的摘要：\n{existing_answer}\n\n"
    "下面是文章接下来的内容：\n{text}\n\n"
    "请在原摘要的基础上补充这部分的新要点；如果没有新的要点，就原样保留原摘要。只输出更新后的摘要。"
)


def _chain(llm, template: str):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    return ChatPromptTemplate.from_messages([("human", template)]) | llm | StrOutputParser()


def summarize_stuff(llm, docs: list, config: dict, **_) -> str:
    return _chain(llm, SUMMARY_PROMPT).invoke({"text": "\n".join(d.page_content for d in docs)},
                                              config=config)


def summarize_refine(llm, docs: list, config: dict, **_) -> str:
    summary = _chain(llm, SUMMARY_PROMPT).invoke({"text": docs[0].page_content}, config=config)
    refine = _chain(llm, REFINE_PROMPT)
    for i, doc in enumerate(docs[1:], start=2):
        print(f"[refine {i}/{len(docs)}] 目前的摘要：{summary}")
        summary = refine.invoke({"existing_answer": summary, "text": doc.page_content}, config=config)
    return summary


def _groups(summaries: list[str], llm, token_max: int) -> list[list[str]]:
    """Consecutive summaries in groups of at most ``token_max`` tokens (at least one each)."""
    groups: list[list[str]] = [[]]
    size = 0
    for s in summaries:
        n = llm.get_num_tokens(s)
        if groups[-1] and size + n > token_max:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += n
    return groups


def summarize_map_reduce(llm, docs: list, config: dict, *, token_max: int) -> str:
    summaries = _chain(llm, SUMMARY_PROMPT).batch([{"text": d.page_content} for d in docs],
                                                  config=config)
    for i, s in enumerate(summaries, start=1):
        print(f"[map {i}/{len(docs)}] {s}")
    combine = _chain(llm, COMBINE_PROMPT)
    rounds = 0
    while True:
        groups = _groups(summaries, llm, token_max)
        if len(groups) == 1:
            break
        rounds += 1
        if rounds > 10:
            _shared.fail(f"the summaries do not shrink below --token-max {token_max}: raise it or "
                         "lower --max-tokens")
        summaries = combine.batch([{"text": "\n\n".join(g)} for g in groups], config=config)
        print(f"[collapse round {rounds}] {len(groups)} groups -> {len(summaries)} summaries")
    print("[reduce]")
    return combine.invoke({"text": "\n\n".join(summaries)}, config=config)


def _token_max(llm, max_tokens: int) -> int:
    """Summary tokens one combine prompt can hold: the context less the answer, the template and
    the prompt's own words (and a margin: summaries joined re-tokenize a little differently)."""
    n_ctx = llm.get_engine().info.n_ctx
    overhead = llm.get_num_tokens(COMBINE_PROMPT) + 64
    room = n_ctx - max_tokens - overhead
    if room < 64:
        _shared.fail(f"the context ({n_ctx} tokens) leaves no room to combine summaries after "
                     f"--max-tokens {max_tokens}: lower --max-tokens or raise --n-ctx")
    return int(room * 0.9)


CHAINS = {"map_reduce": summarize_map_reduce, "refine": summarize_refine, "stuff": summarize_stuff}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _shared.add_model_flags(parser, chunk_size=600, chunk_overlap=100)
    parser.add_argument("--chain-type", choices=sorted(CHAINS), default="map_reduce",
                        help="map_reduce (default), refine, or stuff (one prompt)")
    parser.add_argument("--token-max", type=int, default=0,
                        help="most tokens of summaries combined in one prompt (default: what the "
                             "context leaves after --max-tokens and the prompt's own words)")
    args = parser.parse_args(argv)
    _shared.check_flags(args)
    if args.token_max < 0:
        _shared.fail("--token-max must be positive (or 0: from the context)")

    def run() -> None:
        docs = _shared.file_chunks(args)
        llm = _shared.chat_model(args)
        token_max = args.token_max or _token_max(llm, args.max_tokens)
        counter = _shared.make_counter()
        summary = CHAINS[args.chain_type](llm, docs, {"callbacks": [counter]}, token_max=token_max)
        print(f"摘要：{summary}")
        print(f"LLM calls: {counter.calls}")

    _shared.run_main(run)


if __name__ == "__main__":
    main()
