"""Terminal inference: ``cllama-deploy chat`` (an interactive, multi-turn chat with streamed replies and a
history trimmed to the context) and ``cllama-deploy generate`` (a file of instructions → predictions, all
submitted at once to the batching engine), on a GGUF or on an HF model with LoRA adapters.

- :mod:`~cllama_deploy.inference.options`: the shared options; sampling defaults are the seed's
  (``inference_hf.py``).
- :mod:`~cllama_deploy.inference.backends`: GGUF (engine + request layer, no torch) and HF (transformers
  + peft) behind one interface.
- :mod:`~cllama_deploy.inference.session`: a chat's history and its token budget.
- :mod:`~cllama_deploy.inference.chat`: the terminal loop.
- :mod:`~cllama_deploy.inference.generate`: batch predictions.
"""
