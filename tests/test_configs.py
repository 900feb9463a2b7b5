"""configs/pythia.py and configs/smoke.py: every Pythia hyperparameter, CLI overrides, and the
checkpoint schedule policy."""

import math

import pytest

from conftest import REPO
from pythia_jax import train
from pythia_jax.config import get_preset
from pythia_jax.configs import pythia as pythia_cfgs
from pythia_jax.configs import smoke as smoke_cfgs

SIZES = ["14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]
# Reference doc 2.1 (peak lr, min lr); 6.9b / 12b are not in the shared ymls.
DOC_LR = {"14m": 1e-3, "31m": 1e-3, "70m": 1e-3, "160m": 6e-4, "410m": 3e-4, "1b": 2.5e-4,
          "1.4b": 2e-4, "2.8b": 1.6e-4, "6.9b": 1.2e-4, "12b": 1.2e-4}


@pytest.mark.parametrize("size", SIZES)
def test_common_pythia_hyperparameters(size):
    c = pythia_cfgs.get_config(size)
    assert c.name == f"pythia-{size}"
    assert c.train.num_steps == 143_000
    assert c.train.batch_size == 1024 and c.train.seq_len == 2048
    assert c.train.seed == 1234
    assert c.optim.warmup_steps == 1430 and c.optim.decay_steps == 143_000
    assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.95, 1e-8)
    assert c.optim.weight_decay == 0.1 and c.optim.grad_clip == 1.0
    assert c.optim.peak_lr == DOC_LR[size]
    assert c.optim.min_lr == pytest.approx(0.1 * DOC_LR[size], rel=1e-12)
    assert tuple(c.checkpoint.extra_steps) == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert c.checkpoint.every == 1000 and c.checkpoint.save_final
    # the model section is the preset's architecture, fp32 master weights, bf16 compute
    mcfg = train.model_config_from(c)
    preset = get_preset(size)
    for f in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
              "rotary_pct", "rotary_emb_base", "layer_norm_eps", "use_parallel_residual",
              "init_method", "output_init_method", "init_std"):
        assert getattr(mcfg, f) == getattr(preset, f), f
    assert mcfg.param_dtype == "float32" and mcfg.dtype == "bfloat16"
    assert mcfg.gelu_approximate  # bias-gelu-fusion: NeoX trained with the tanh GELU
    big = size in ("6.9b", "12b")
    assert (mcfg.init_method, mcfg.output_init_method) == (
        ("normal", "scaled_normal") if big else ("small_init", "wang_init"))
    assert mcfg.vocab_size == {"6.9b": 50432, "12b": 50688}.get(size, 50304)
    train.validate_config(c)


@pytest.mark.parametrize("yml", ["pythia-14m", "pythia-31m", "pythia-70m", "pythia-70m-deduped",
                                 "pythia-160m", "pythia-160m-deduped", "pythia-410m-deduped"])
def test_matches_the_shared_neox_ymls(shared_data, yml):
    """Each field read from EleutherAI's own training yml."""
    yaml = pytest.importorskip("yaml")
    y = yaml.safe_load((shared_data / "pythia_configs" / f"{yml}.yml").read_text())
    c = pythia_cfgs.get_config(yml.removeprefix("pythia-"))
    assert c.name == yml
    assert ("deduped" in c.data.path) == yml.endswith("-deduped")
    assert c.model.num_layers == y["num-layers"]
    assert c.model.hidden_size == y["hidden-size"]
    assert c.model.num_heads == y["num-attention-heads"]
    assert c.model.rotary_pct == y["rotary-pct"]
    assert c.train.seq_len == y["seq-length"]
    assert c.model.init_method == y["init_method"]
    assert c.model.output_init_method == y["output_layer_init_method"]
    opt = y["optimizer"]["params"]
    assert c.optim.peak_lr == opt["lr"] and c.optim.min_lr == y["min_lr"]
    assert [c.optim.b1, c.optim.b2] == opt["betas"] and c.optim.eps == opt["eps"]
    assert c.optim.weight_decay == y["weight-decay"]
    assert c.optim.grad_clip == y["gradient_clipping"]
    assert c.train.num_steps == y["train-iters"]
    assert c.optim.decay_steps == y["lr-decay-iters"]
    assert c.optim.warmup_steps == round(y["warmup"] * y["lr-decay-iters"])
    assert list(c.checkpoint.extra_steps) == y["extra-save-iters"]
    assert c.checkpoint.every == y["checkpoint-factor"]
    assert c.train.log_every == y["log-interval"]
    assert c.train.eval_every == y["eval-interval"] and c.train.eval_steps == y["eval-iters"]
    assert c.neox.train_micro_batch_size_per_gpu == y["train_micro_batch_size_per_gpu"]
    assert c.neox.gradient_accumulation_steps == y.get("gas", 1)
    assert c.neox.hidden_dropout == y["hidden-dropout"]
    assert c.neox.attention_dropout == y["attention-dropout"]
    assert c.neox.fp16_initial_scale_power == y["fp16"]["initial_scale_power"]
    assert c.neox.zero_stage == y["zero_optimization"]["stage"]
    assert y["lr-decay-style"] == "cosine" and y["optimizer"]["type"] == "Adam"


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown size"):
        pythia_cfgs.get_config("3b")


def test_command_line_overrides():
    from absl import flags
    from ml_collections import config_flags

    argv = ["train.py", f"--config={REPO / 'configs' / 'pythia.py'}:160m",
            "--config.train.num_steps=2000", "--config.optim.peak_lr=5e-4",
            "--config.model.remat=full", "--config.data.path=/data/pile/document",
            "--config.mesh.shape.fsdp=4"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    c = fv.config
    assert c.name == "pythia-160m"
    assert c.train.num_steps == 2000
    # a shorter run keeps the full-length schedule unless told otherwise
    assert c.optim.decay_steps == 143_000 and c.optim.warmup_steps == 1430
    assert c.optim.peak_lr == 5e-4 and c.optim.min_lr == 6e-5
    assert c.model.remat == "full" and c.data.path == "/data/pile/document"
    assert c.mesh.shape.fsdp == 4
    argv = ["train.py", f"--config={REPO / 'configs' / 'pythia.py'}:70m",
            "--config.train.no_such_field=1"]
    fv2 = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv2, lock_config=True,
                                    sys_argv=argv)
    with pytest.raises((flags.Error, KeyError, AttributeError), match="no_such_field"):
        fv2(argv)


def test_bad_model_field_names_the_field():
    c = pythia_cfgs.get_config("70m")
    c.model.remat = "sometimes"
    with pytest.raises(train.TrainConfigError, match="remat"):
        train.validate_config(c)
    c = pythia_cfgs.get_config("70m")
    c.train.num_steps = -5
    with pytest.raises(train.TrainConfigError, match=r"config\.train\.num_steps"):
        train.validate_config(c)


PYTHIA_154 = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] + list(range(1000, 143001, 1000))


def test_checkpoint_schedule_is_pythias_154_steps():
    c = pythia_cfgs.get_config("70m")
    ck = c.checkpoint
    steps = train.checkpoint_steps(c.train.num_steps, ck.extra_steps, ck.every, ck.save_final)
    assert len(PYTHIA_154) == 154
    assert steps == PYTHIA_154
    # the per-step decision the loop uses agrees everywhere (and never saves a rolling
    # checkpoint unless rolling_every is set)
    ck.rolling_every = 0
    saved = [s for s in range(0, 143_001) if any(train.should_save(s, 143_000, ck))]
    assert saved == PYTHIA_154


def test_checkpoint_schedule_short_run_and_rolling():
    c = pythia_cfgs.get_config("70m")
    ck = c.checkpoint
    # a 2,500-step run: the grid up to 2000 plus the final step
    assert train.checkpoint_steps(2500, ck.extra_steps, ck.every, True) == \
        [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 2500]
    ck.rolling_every = 250
    assert train.should_save(750, 2500, ck) == (False, True)
    assert train.should_save(1000, 2500, ck) == (True, True)
    assert train.should_save(999, 2500, ck) == (False, False)


def test_smoke_config_is_small_and_self_contained():
    c = smoke_cfgs.get_config()
    mcfg = train.model_config_from(c)
    assert c.name == "smoke"
    assert mcfg.vocab_size == 50304 and mcfg.use_parallel_residual  # Pythia-shaped
    assert mcfg.param_counts()["total"] < 10_000_000
    assert c.data.build_from_text.endswith("tinyshakespeare.txt")
    import os
    assert os.path.isfile(c.data.build_from_text)
    assert "{workdir}" in c.data.path
    assert 100 <= c.train.num_steps <= 1000
    assert c.sample.max_new_tokens > 0
    # same schedule formula, sized for the run
    assert c.optim.decay_steps == c.train.num_steps and c.optim.warmup_steps > 0
    assert math.isclose(c.optim.min_lr, 0.1 * c.optim.peak_lr)
    train.validate_config(c)


def _config_from_flag(spec: str):
    """The config `--config=SPEC` gives on the command line (ml_collections' config_flags, as
    scripts/train.py reads it)."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["train.py", f"--config={spec}"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


@pytest.mark.parametrize("spec,from_package", [
    ("pythia.py:410m", lambda: pythia_cfgs.get_config("410m")),
    ("pythia.py:pythia-70m-deduped", lambda: pythia_cfgs.get_config("70m-deduped")),
    ("pythia.py", lambda: pythia_cfgs.get_config()),
    ("smoke.py", lambda: smoke_cfgs.get_config()),
])
def test_configs_import_as_a_package_equal_to_the_config_files(spec, from_package):
    """`configs/*.py` (the README's --config= paths) and the package modules shipped in
    `pythia_jax.configs` give the same config, field for field; the package's own files load by
    path too (for installed CLIs that have no repository)."""
    import importlib.resources

    import pythia_jax.configs
    want = from_package().to_dict()
    assert _config_from_flag(f"{REPO / 'configs' / spec}").to_dict() == want
    name, sep, arg = spec.partition(":")
    shipped = importlib.resources.files("pythia_jax.configs") / name
    assert shipped.is_file()
    assert _config_from_flag(f"{shipped}{sep}{arg}").to_dict() == want
    assert set(pythia_jax.configs.__all__) == {"pythia", "smoke"}


def test_smoke_config_takes_no_argument():
    with pytest.raises(ValueError, match=r"configs/smoke.py takes no argument, got '70m'"):
        smoke_cfgs.get_config("70m")
