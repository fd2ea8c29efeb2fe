"""RopeScaling's validation: each wrong value refused with a line naming the field and the fix."""
from __future__ import annotations

import pytest

from minimegatron.config import gpt_config, llama_config
from minimegatron.rope_scaling import RopeScaling

GOOD = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192)


@pytest.mark.parametrize("kw,match", [
    (dict(GOOD, rope_type="dynamic"), "rope_type='dynamic' is not implemented"),
    (dict(GOOD, rope_type="yarn"), "'dynamic' and 'yarn' are not supported"),
    (dict(GOOD, factor=0.5), "factor=0.5 must be a number >= 1"),
    (dict(GOOD, factor=float("nan")), "factor=nan"),
    (dict(GOOD, low_freq_factor=4.0), "0 < low_freq_factor < high_freq_factor"),
    (dict(GOOD, original_max_position_embeddings=8192.0), "original_max_position_embeddings"),
    (dict(GOOD, original_max_position_embeddings=None), "original_max_position_embeddings"),
    (dict(rope_type="linear", factor=2.0, low_freq_factor=1.0), r"RopeScaling\('linear'\) takes only factor"),
])
def test_bad_scaling_is_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling(**kw)


def test_model_config_takes_scaling_or_its_dict_and_round_trips():
    config = llama_config(rope_scaling=GOOD)  # a dict (to_dict / config.json) becomes a RopeScaling
    assert config.rope_scaling == RopeScaling(**GOOD)
    assert type(config).from_dict(config.to_dict()) == config
    assert llama_config(rope_scaling=RopeScaling("linear", 2.0)).rope_scaling.factor == 2.0
    with pytest.raises(ValueError, match="unknown RopeScaling fields \\['beta_fast'\\]"):
        llama_config(rope_scaling=dict(GOOD, beta_fast=32))
    with pytest.raises(ValueError, match="needs position_embedding='rope', not 'learned'"):
        gpt_config(rope_scaling=GOOD)
    with pytest.raises(TypeError, match="must be a RopeScaling, its dict or None"):
        llama_config(rope_scaling=8.0)
