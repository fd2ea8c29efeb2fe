"""minimegatron.models: the one registry of model families."""
import pytest

from minimegatron.gpt import GPTModel
from minimegatron.llama import LLaMAModel
from minimegatron.models import MODEL_CLASS, MODELS, family_of, model_class
from minimegatron.training import config as training_config


def test_families_map_to_their_classes_and_back():
    assert model_class("gpt") is GPTModel and model_class("llama") is LLaMAModel
    for family in MODELS:
        assert model_class(family).__name__ == MODEL_CLASS[family]
        assert family_of(MODEL_CLASS[family]) == family
    assert family_of("BertModel") is None and family_of(None) is None


def test_unknown_family_names_the_choices():
    with pytest.raises(ValueError, match=r"model family 'bert': choose one of \('gpt', 'llama'\)"):
        model_class("bert")


def test_training_config_reads_the_same_registry():
    assert training_config.MODELS is MODELS and training_config.MODEL_CLASS is MODEL_CLASS
