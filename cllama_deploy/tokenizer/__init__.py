"""Vocabulary extension: train (train.py), merge (merge.py), stats (stats.py), GGUF vocabularies
(gguf_vocab.py), SentencePiece-exact HF tokenizer directories (hf.py); see docs/tokenizer.md."""
