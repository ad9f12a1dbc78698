"""Details of the components not covered by the standard suites."""

from __future__ import annotations

from cllama_deploy.langchain import ChatCLlama, CLlamaEmbeddings, CLlamaLLM, shared_engine


def test_token_counts_are_the_models_own(engine_gguf):
    """get_num_tokens counts this model's tokens (LangChain's default would load GPT-2's tokenizer),
    and the components on one file share one engine whether options are given at their defaults
    or left out."""
    path = str(engine_gguf)
    chat, llm = ChatCLlama(model_path=path), CLlamaLLM(model_path=path, n_ctx=0, parallel=4)
    engine = shared_engine(path)
    assert chat.get_engine() is llm.get_engine() is CLlamaEmbeddings(model_path=path).get_engine() is engine
    text = "青溪镇的雾里青 green tea"
    ids = chat.get_token_ids(text)
    assert ids == llm.get_token_ids(text) == engine.tokenize(text, add_bos=False, special=False)
    assert engine.detokenize(ids).removeprefix(" ") == text  # (the tokenizer's dummy prefix space)
    assert chat.get_num_tokens(text) == len(ids) > len(text.split())
    # one prompt through the LLM: its usage counts the same tokens (+ BOS)
    out = llm.generate([text], max_tokens=1)
    assert out.llm_output["token_usage"]["prompt_tokens"] == len(ids) + 1
