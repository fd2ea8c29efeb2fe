"""TrainConfig validation (training/args.py): bad runs fail in the parent, before any rank starts."""
import numpy as np
import pytest

from minimegatron.config import gpt_config, llama_config
from minimegatron.data.indexed_dataset import IndexedDatasetBuilder
from minimegatron.training.args import TrainConfig, validate

TINY = dict(steps=2, num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128, seq_len=16,
            micro_batch_size=2, global_batch_size=4, progress=False)
SMALL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, max_seq_len=16)


@pytest.mark.parametrize("model,config,family", [("gpt", llama_config, "llama"),
                                                 ("llama", gpt_config, "gpt")])
def test_model_config_of_the_other_family_is_rejected(model, config, family):
    with pytest.raises(ValueError, match=rf"model='{model}' but model_config is a {family} config.*"
                                         rf"set model='{family}'"):
        validate(TrainConfig(**TINY, model=model, model_config=config(**SMALL)))
    validate(TrainConfig(**TINY, model=family, model_config=config(**SMALL)))  # the right pairing
    validate(TrainConfig(**TINY, model=model, model_config=config(**SMALL).replace(name="custom")))


def test_model_config_must_be_a_model_config():
    with pytest.raises(ValueError, match="model_config must be a minimegatron.config.ModelConfig, got dict"):
        validate(TrainConfig(**TINY, model_config=dict(SMALL)))


@pytest.mark.parametrize("field,value", [("tp", True), ("pp", 1.0), ("dp", "2"), ("micro_batch_size", True),
                                         ("num_layers", 2.0), ("warmup_steps", True), ("zero_stage", 1.0),
                                         ("eval_interval", False), ("seed", 1.5), ("num_kv_heads", True)])
def test_integer_fields_reject_bools_and_non_ints(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be .*int.*got {value!r} \({type(value).__name__}\)"):
        validate(TrainConfig(**{**TINY, field: value}))


def _dataset(prefix, tokens, dtype):
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in tokens:
            builder.add_document(doc)
    return str(prefix)


def test_indexed_dataset_token_ids_must_fit_the_vocab(tmp_path):
    prefix = _dataset(tmp_path / "wide", [np.arange(40) % 100, np.array([3, 130, 7] * 10)], np.uint16)
    with pytest.raises(ValueError, match=r"holds token id 130 but the model's vocab_size=128.*"
                                         r"--vocab-size 131 or more"):
        validate(TrainConfig(**TINY, data=prefix))
    validate(TrainConfig(**{**TINY, "vocab_size": 131}, data=prefix))  # now every id fits
    fits = _dataset(tmp_path / "narrow", [np.arange(60) % 128], np.uint8)  # uint8 ids are all < 256
    validate(TrainConfig(**{**TINY, "vocab_size": 256}, data=fits))  # skipped: the dtype cannot overflow
    validate(TrainConfig(**TINY, data=fits))
