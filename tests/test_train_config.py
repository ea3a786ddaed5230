"""Config tree: every group option and experiment composes and validates; typos and bad
values stop the run with a message naming the key, before anything starts."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

import trainer.train  # noqa: F401  registers the schema
from trainer.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ["model", "attention", "parallel", "precision", "optim", "data", "logger", "experiment"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _yaml(group, opt):
    """An option's own values, read from its file (a `defaults:` list of an experiment kept apart)."""
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{opt}.yaml"))


def _assert_holds(section, values, where):
    for k, v in values.items():
        got = getattr(section, k)
        if isinstance(v, dict):
            _assert_holds(got, v, f"{where}{k}.")
        else:
            assert got == v, f"{where}{k}: load_config gave {got!r}, the file says {v!r}"


def _differs(section, values):
    return any(_differs(getattr(section, k), v) if isinstance(v, dict) else getattr(section, k) != v
               for k, v in values.items())


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_validates(group):
    opts = _options(group)
    assert opts, f"configs/{group} has no options"
    default = load_config(_compose([]))
    for opt in opts:
        extra = [f"data.paths=[{CONFIGS}]"] if (group, opt) == ("data", "text") else []
        tc = load_config(_compose([f"{group}={opt}"] + extra))
        values = _yaml(group, opt)
        if group == "experiment":  # global: its keys name groups, its defaults swap group options
            overrides = [next(iter(d.items())) for d in values.pop("defaults", [])]
            for target, option in overrides:  # "override /attention": "gau"
                g = target.split()[-1].lstrip("/")
                own = values.get(g, {})
                _assert_holds(getattr(tc, g), {k: v for k, v in _yaml(g, option).items() if k not in own}, f"{g}.")
            _assert_holds(tc, values, "")
            assert overrides and _differs(default, values)
        else:
            _assert_holds(getattr(tc, group), values, f"{group}.")
            # the option was applied: what it sets is not all the default option's values
            assert _differs(getattr(default, group), values) or values == _yaml(group, _default_option(group)), opt


def _default_option(group):
    entries = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml"))["defaults"]
    return next(e[group] for e in entries if isinstance(e, dict) and group in e)


def test_defaults():
    tc = load_config(_compose([]))
    assert (tc.attention.kind, tc.parallel.name, tc.precision.name, tc.data.kind) == ("softmax", "ddp", "fp32", "stdlib")
    assert tc.logger._target_ == "trainer.loggers.ConsoleLogger" and tc.engine == "native"


def test_experiment_holds_only_differences():
    tc = load_config(_compose(["experiment=gau_bf16_ring"]))
    assert tc.attention.kind == "gau" and tc.precision.name == "bf16" and tc.parallel.bucket_mb == 4.0
    assert tc.optim.lr == load_config(_compose([])).optim.lr  # untouched keys keep the defaults


def test_instantiate_logger_groups(tmp_path, monkeypatch):
    from trainer.loggers import ConsoleLogger, WandbLogger, build_logger
    monkeypatch.setenv("WANDB_MODE", "offline")  # for this test only
    for opt, cls in [("console", ConsoleLogger), ("wandb", WandbLogger)]:
        tc = load_config(_compose([f"logger={opt}"]))
        lg = build_logger(tc.logger, run_dir=tmp_path, config={"a": 1})
        try:
            assert type(lg) is cls
            lg.log({"step": 1, "loss": 2.5})
        finally:
            lg.close()
    assert list(tmp_path.glob("wandb/offline-run-*")), "wandb must log offline into the run directory"


@pytest.mark.parametrize("override, key", [
    ("trainer.max_stepz=5", "max_stepz"),
    ("+model.d_modle=64", "d_modle"),
])
def test_misspelt_key_is_refused(override, key):
    # Hydra refuses most typos while composing; whatever slips through (a forced `+key`)
    # is refused by load_config, which runs before any process group exists
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError, ValueError)) as e:
        load_config(_compose([override]))
    assert key in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override, message", [
    ("attention.kind=softmx", "attention.kind"),
    ("parallel.algorithm=butterfly", "parallel.algorithm"),
    ("precision.name=fp8", "precision.name"),
    ("trainer.grad_accum=0", "trainer.grad_accum"),
    ("optim.lr=-1", "optim.lr"),
    ("model.n_heads=3", "model."),
    ("data.val_fraction=2.0", "data.val_fraction"),
    ("logger._target_=os.system", "logger._target_"),
    ("precision.backoff_factor=2", "precision.backoff_factor"),
    ("precision.hysteresis=0", "precision.hysteresis"),
    ("precision.grad_reduce=fp8", "precision.grad_reduce"),
    ("model.moe.top_k=3", "model.moe.top_k"),
])
def test_bad_value_names_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_config(_compose([override]))


@pytest.mark.parametrize("overrides, keys", [
    (["model.moe.num_experts=6", "parallel.ep_size=4"], ["model.moe.num_experts", "parallel.ep_size"]),
    (["model.moe.num_experts=2", "model.moe.top_k=3"], ["model.moe.top_k"]),
    (["model.moe.num_experts=8", "parallel.ep_size=2", "engine=deepspeed"], ["parallel.ep_size", "engine=deepspeed"]),
])
def test_impossible_moe_layouts_name_the_keys(overrides, keys):
    with pytest.raises(ValueError) as e:
        load_config(_compose(overrides))
    assert all(k in str(e.value) for k in keys), str(e.value)


def test_wrong_type_is_refused_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        _compose(["trainer.max_steps=lots"])
    assert "max_steps" in str(e.value) + str(e.value.__cause__)
