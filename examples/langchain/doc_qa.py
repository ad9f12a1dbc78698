"""Question answering over a Chinese document, all in this process on one GGUF model.

The text is split into chunks, embedded with ``CLlamaEmbeddings``, kept in LangChain's in-memory
vector store; for each question the closest chunks are retrieved and ``ChatCLlama`` answers:

* ``stuff``: all retrieved chunks in one prompt, one model call;
* ``refine``: an answer from the first chunk, then one call per further chunk that improves it.

    python examples/langchain/doc_qa.py --model demo-out/gguf/quickstart-Q4_K_M.gguf \\
        --file examples/langchain/qingxi_town.txt --question "雾里青是在什么时候采摘的？"

Without ``--question`` it asks for questions until an empty line. ``--embedding-model`` embeds with
another GGUF (default: the chat model itself, mean-pooled; a dedicated embedding model retrieves
better). The prompts go through the model's chat template (the GGUF's own, or ``--chat-template``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _shared  # noqa: E402

# The prompts: the retrieved text first, then the question; refine adds the question, the answer so
# far and one new chunk, and asks for an improved answer.
STUFF_PROMPT = (
    "下面是从资料中找到的相关内容：\n"
    "{context}\n\n"
    "请只根据以上内容回答问题，内容中没有的信息不要编造。\n"
    "问题：{question}"
)
INITIAL_QA_PROMPT = (
    "参考资料：\n"
    "{context_str}\n\n"
    "请依据这段参考资料回答下面的问题。\n"
    "问题：{question}"
)
REFINE_QA_PROMPT = (
    "问题：{question}\n"
    "目前的回答：{existing_answer}\n\n"
    "这里有一段新的参考资料，可能有用，也可能无关：\n"
    "{context_str}\n\n"
    "如果新资料能让回答更完整或更准确，请据此修改回答；否则保留目前的回答。"
    "请直接给出修改后的完整回答。"
)


def build_retriever(docs: list, embeddings, k: int):
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore.from_documents(docs, embeddings)
    return store.as_retriever(search_kwargs={"k": k})


def answer_stuff(llm, docs: list, question: str, config: dict) -> str:
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    chain = ChatPromptTemplate.from_messages([("human", STUFF_PROMPT)]) | llm | StrOutputParser()
    context = "\n\n".join(d.page_content for d in docs)
    return chain.invoke({"context": context, "question": question}, config=config)


def answer_refine(llm, docs: list, question: str, config: dict) -> str:
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    initial = ChatPromptTemplate.from_messages([("human", INITIAL_QA_PROMPT)]) | llm | StrOutputParser()
    refine = ChatPromptTemplate.from_messages([("human", REFINE_QA_PROMPT)]) | llm | StrOutputParser()
    answer = initial.invoke({"context_str": docs[0].page_content, "question": question}, config=config)
    for i, doc in enumerate(docs[1:], start=2):
        print(f"[refine {i}/{len(docs)}] 目前的回答：{answer}")
        answer = refine.invoke({"question": question, "existing_answer": answer,
                                "context_str": doc.page_content}, config=config)
    return answer


CHAINS = {"stuff": answer_stuff, "refine": answer_refine}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _shared.add_model_flags(parser, chunk_size=600, chunk_overlap=100)
    parser.add_argument("--chain-type", choices=sorted(CHAINS), default="refine",
                        help="stuff: one call with all retrieved chunks; refine (default): one call per chunk")
    parser.add_argument("--k", type=int, default=2, help="chunks retrieved per question (default 2)")
    parser.add_argument("--question", action="append", default=None,
                        help="a question (repeatable); without it, questions are read from the terminal")
    parser.add_argument("--embedding-model", default=None,
                        help="a GGUF to embed with (default: --model)")
    args = parser.parse_args(argv)
    _shared.check_flags(args)
    if args.k < 1:
        _shared.fail("--k must be at least 1")

    def run() -> None:
        from cllama_deploy.langchain import CLlamaEmbeddings

        docs = _shared.file_chunks(args)
        for i, d in enumerate(docs):
            d.metadata["chunk"] = i
        llm = _shared.chat_model(args)
        # the same file and options as the chat model: one loaded model serves both
        embeddings = CLlamaEmbeddings(model_path=args.embedding_model or args.model, n_ctx=args.n_ctx,
                                      n_threads=args.threads, chat_template=args.chat_template)
        retriever = build_retriever(docs, embeddings, min(args.k, len(docs)))
        print(f"embedded {len(docs)} chunks into an in-memory vector store")
        questions = args.question if args.question is not None else _ask()
        for question in questions:
            counter = _shared.make_counter()
            found = retriever.invoke(question)
            print(f"问题：{question}")
            print(f"retrieved chunks: {', '.join('#%d' % d.metadata['chunk'] for d in found)}")
            answer = CHAINS[args.chain_type](llm, found, question, {"callbacks": [counter]})
            print(f"回答：{answer}")
            print(f"LLM calls: {counter.calls}")

    _shared.run_main(run)


def _ask():
    while True:
        try:
            question = input("请输入问题（空行结束）：").strip()
        except EOFError:
            return
        if not question:
            return
        yield question


if __name__ == "__main__":
    main()
