"""Every config composes; bad values are one clear error before any work starts."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

from occ_exp.config import ConfigError
from occ_exp.validation import validate
from tests.conftest import CONF, compose_cfg

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith(("_", "hydra")))


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes_and_validates(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    validate(cfg)


def test_default_is_tiny_occ():
    cfg = compose_cfg()
    assert cfg.model.name == "tiny" and cfg.regime.name == "occ"
    assert cfg.algorithm.clip_low == 0.2 and cfg.algorithm.clip_high == 0.28
    assert cfg.algorithm.num_mini_batches == 4


def test_unknown_option_lists_choices():
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as e:
        compose_cfg(["regime=nope"])
    msg = str(e.value)
    assert "nope" in msg and "occ" in msg and "detach" in msg


def test_unknown_key_is_an_error():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        compose_cfg(["regime.coeff=0.2"])
    assert "coeff" in str(e.value)


def test_wrong_type_is_an_error():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose_cfg(["algorithm.group_size=many"])
    assert "group_size" in str(e.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("regime.coef=-0.1", "regime.coef"),
        ("regime.coef=nan", "regime.coef"),
        ("regime.lambda_plus=inf", "regime.lambda_plus"),
        ("regime.eps=0", "regime.eps"),
        ("algorithm.group_size=-4", "algorithm.group_size"),
        ("algorithm.clip_low=1.5", "algorithm.clip_low"),
        ("algorithm.num_mini_batches=3", "algorithm.num_mini_batches"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("regime.estimator=magic", "regime.estimator"),
        ("regime.eps=-1e-8", "regime.eps"),
        ("algorithm.group_size=0", "algorithm.group_size"),
        ("algorithm.group_size=1", "algorithm.group_size"),
        ("algorithm.clip_high=-0.3", "algorithm.clip_high"),
        ("algorithm.clip_high=0", "algorithm.clip_high"),
        ("algorithm.clip_low=-0.2", "algorithm.clip_low"),
        ("algorithm.clip_low=nan", "algorithm.clip_low"),
        ("algorithm.adv_eps=0", "algorithm.adv_eps"),
        ("optimizer.eps=0", "optimizer.eps"),
        ("optimizer.eps=-1", "optimizer.eps"),
        ("trainer.max_consecutive_skips=0", "trainer.max_consecutive_skips"),
        ("trainer.keep_last=0", "trainer.keep_last"),
        ("logger.mode=bogus", "logger.mode"),
        ("rollout.min_new_tokens=-1", "rollout.min_new_tokens"),
    ],
)
def test_out_of_range_values_are_refused(override, key):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith(key)
    assert "\n" not in str(e.value)  # one line


def test_clip_parametrisation():
    """The ratio is clipped to [1 - clip_low, 1 + clip_high]: any clip_high > 0 keeps the upper bound
    above the lower one, so clip_high < clip_low is a valid (tighter) upper clip, not an error;
    clip_high <= 0 would put the upper bound at or below the lower one and is refused."""
    validate(compose_cfg(["algorithm.clip_low=0.3", "algorithm.clip_high=0.1"]))
    with pytest.raises(ConfigError, match=r"\[1-clip_low, 1\+clip_high\]"):
        validate(compose_cfg(["algorithm.clip_high=-0.5"]))



@pytest.mark.parametrize(
    "overrides,key",
    [
        (["diagnostics.taylor_check=true"], "diagnostics.taylor_check"),
        (["diagnostics.exact_every=1", "diagnostics.taylor_check=true", "diagnostics.taylor_eta=-1"],
         "diagnostics.taylor_eta"),
        (["regime=frozen", "regime.head_ce=0.1"], "regime.head_ce"),
        (["diagnostics.exact_every=-2"], "diagnostics.exact_every"),
        (["diagnostics.exact_every=1", "diagnostics.taylor_check=true", "model.compile=true"], "diagnostics.taylor_check"),
    ],
)
def test_diagnostics_and_head_ce_rules(overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(overrides))
    assert str(e.value).startswith(key)
