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


def test_checkpoint_and_log_paths_must_be_directories(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for name, flag in (("save", "--save"), ("out_dir", "--out-dir"), ("load", "--load")):
        with pytest.raises(ValueError, match=rf"{flag} {a_file} is a file; give a directory"):
            validate(TrainConfig(**TINY, **{name: str(a_file)}))


def test_load_must_exist_unless_it_is_the_save_directory(tmp_path):
    missing = str(tmp_path / "nonexistent")
    with pytest.raises(ValueError, match=rf"--load {missing} does not exist.*leave it out"):
        validate(TrainConfig(**TINY, load=missing))
    validate(TrainConfig(**TINY, load=missing, save=missing))  # first run of "rerun resumes": from scratch


def test_evaluation_needs_a_nonempty_valid_split(tmp_path):
    prefix = _dataset(tmp_path / "docs", [np.arange(40) % 100] * 20, np.uint16)
    with pytest.raises(ValueError, match=r"split='100,0,0' leaves the valid split .* empty.*"
                                         r"--eval-interval 0"):
        validate(TrainConfig(**TINY, data=prefix, split="100,0,0", eval_interval=1))
    validate(TrainConfig(**TINY, data=prefix, split="100,0,0", eval_interval=0))  # no evaluation: fine
    validate(TrainConfig(**TINY, data=prefix, split="90,10,0", eval_interval=1))
    two = _dataset(tmp_path / "two", [np.arange(40) % 100] * 2, np.uint16)  # 949,50,1 of 2 docs: 0 valid
    with pytest.raises(ValueError, match=r"\(2 documents\) empty"):
        validate(TrainConfig(**TINY, data=two, eval_interval=1))


def test_timeout_defaults_to_no_limit():
    from minimegatron.training.cli import build_parser, parse_args

    assert TrainConfig().timeout == 0 and parse_args([]).timeout == 0
    assert "(0: none)" in build_parser().format_help()


def test_moe_flags_reach_the_model_config(monkeypatch):
    """Every MoE flag lands in the ModelConfig; --ep alone (no launcher) carves dp = ep replicas."""
    from minimegatron.training.cli import parse_args

    monkeypatch.delenv("RANK", raising=False)
    cfg = parse_args(["--num-experts", "8", "--moe-top-k", "1", "--moe-every", "2", "--moe-capacity-factor",
                      "1.5", "--moe-aux-loss-coeff", "0.02", "--ep", "4"])
    assert (cfg.ep, cfg.dp, cfg.world_size) == (4, 4, 4)
    model = validate(cfg, preflight=False)
    assert (model.num_experts, model.moe_top_k, model.moe_every, model.moe_capacity_factor,
            model.moe_aux_loss_coeff) == (8, 1, 2, 1.5, 0.02)
    assert [model.is_moe_layer(i) for i in range(model.num_layers)] == [True, False]
    assert parse_args(["--ep", "2", "--dp", "6"]).dp == 6  # an explicit --dp stays


def test_fused_lm_loss_flag_reaches_the_model_config():
    from minimegatron.training.cli import parse_args

    assert parse_args([]).to_model_config().fused_lm_loss is True  # the default: fused
    cfg = parse_args(["--no-fused-lm-loss"])
    assert cfg.fused_lm_loss is False and validate(TrainConfig(**TINY, fused_lm_loss=False)).fused_lm_loss is False
