"""Evaluation: the same measurements on an HF model (with PEFT adapters) and on its GGUFs.

- ``perplexity``: llama.cpp's perplexity method (``eval ppl``); :func:`perplexity.perplexity_of_text` for
  in-process use.
- ``quant``: quantize to several types and compare each with the reference (``eval quant``): size, bits per
  weight, PPL ratio, KL divergence with percentiles, same top p, RMS Δp, speed.
- ``choice``: C-Eval-style multiple choice from the option letters' logits (``eval choice``).
- ``bench``: llama-bench's pp/tg, batched decoding, the memory-bandwidth bound (``bench``).
- ``models``: the GGUF (llama.cpp through ``engine.llama_api``) and HF (transformers + peft) scorers.
- ``stats``: llama.cpp's statistics (uncertainties, KL divergence, percentiles).

Modules import llama.cpp, torch and transformers only inside functions.
"""
