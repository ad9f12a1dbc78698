"""LoRA incremental pre-training (`train pt`) and instruction fine-tuning (`train sft`).

Public API: :func:`train_pt`, :func:`train_sft` (both :func:`cllama_deploy.training.run.train`),
:class:`PTConfig`, :class:`SFTConfig`, :func:`parse_args`. Importing this package is cheap; torch,
transformers, peft and datasets load when training starts.
"""

from cllama_deploy.training.config import PTConfig, SFTConfig, TrainConfig, parse_args

__all__ = ["PTConfig", "SFTConfig", "TrainConfig", "parse_args", "train", "train_pt", "train_sft"]


def train(cfg, callbacks=None):
    from cllama_deploy.training.run import train as _train

    return _train(cfg, callbacks)


train_pt = train
train_sft = train
