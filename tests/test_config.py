import pytest
import yaml

from ofs_scale.config import OPTIM_DEFAULTS, ConfigError, OptimConfig, dump_yaml, load_config

ADAMW = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
SOAP = {"lr": 3e-3, "betas": (0.95, 0.95), "eps": 1e-8, "weight_decay": 0.01}
PER_OPTIMIZER = ("lr", "betas", "eps", "weight_decay")


def _numbers(optim: OptimConfig) -> dict:
    return {k: getattr(optim, k) for k in PER_OPTIMIZER}


def test_defaults_and_typed_overrides():
    cfg = load_config(
        None,
        [
            "model.n_layers=6",
            "optim.lr=3e-4",
            "model.beta_trainable=true",
            "optim.betas=[0.9, 0.99]",
            "model.beta=auto",
            "train.stages=[{name: a, steps: 3}, {name: b, steps: 5, lr_schedule: linear}]",
            "train.stages.1.steps=7",
        ],
    )
    assert cfg.model.n_layers == 6 and isinstance(cfg.model.n_layers, int)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.beta_trainable is True
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.model.beta == "auto"
    assert [s.steps for s in cfg.train.stages] == [3, 7]
    assert cfg.total_steps == 10
    assert "n_layers: 6" in dump_yaml(cfg)


def test_smoke_config_loads():
    cfg = load_config("configs/smoke.yaml")
    assert cfg.run.name == "smoke"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.n_head=8", "unknown config key 'model.n_head' (did you mean model.n_heads?)"),
        ("model.lr=1e-3", "did you mean optim.lr?"),
        ("modle.d_model=8", "did you mean model"),
        ("model.d_model=wide", "model.d_model='wide' should be an integer"),
        ("model.beta_trainable=maybe", "should be true or false"),
        ("model.block=opp", "choose one of ['pre', 'post', 'op'] (did you mean 'op'?)"),
        ("optim.name=sgd", "choose one of ['adamw', 'soap', 'shampoo', 'muon']"),
        ("optim.lr=fast", "optim.lr='fast' should be a number"),
        ("optim.betas=[0.9]", "optim.betas=[0.9] should be a list of 2 values"),
        ("optim.lr=0", "optim.lr must be positive"),
        ("optim.betas=[0.9, 1.0]", "optim.betas must be in [0, 1)"),
        ("model.n_heads=3", "model.n_heads=3 must divide model.d_model"),
        ("train.micro_batch=5", "must be a multiple of train.micro_batch=5"),
        ("train.stages.0.stepz=4", "did you mean train.stages.N.steps?"),
    ],
)
def test_config_errors_name_the_problem(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modell: 64\n")
    with pytest.raises(ConfigError, match=r"did you mean model\.d_model"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("name", "expected"), [("adamw", ADAMW), ("soap", SOAP), ("shampoo", SOAP)]
)
def test_optimizer_defaults_follow_optim_name(name, expected, tmp_path):
    assert OPTIM_DEFAULTS[name] == expected
    by_override = load_config(None, [f"optim.name={name}"]).optim
    assert _numbers(by_override) == expected
    assert isinstance(by_override.lr, float) and isinstance(by_override.betas, tuple)
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  name: {name}\n")
    assert _numbers(load_config(path).optim) == expected
    # a direct construction (tests, tools) resolves the same way
    assert _numbers(OptimConfig(name=name)) == expected
    assert _numbers(OptimConfig(name=name, max_precond_dim=4)) == expected


def test_default_optimizer_is_adamw_with_its_defaults():
    assert load_config(None).optim.name == "adamw"
    assert _numbers(load_config(None).optim) == ADAMW


def test_optim_name_from_the_last_source_picks_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name: soap\n")
    assert _numbers(load_config(path, ["optim.name=adamw"]).optim) == ADAMW
    assert _numbers(load_config(None, ["optim.name=soap", "optim.name=adamw"]).optim) == ADAMW
    path.write_text("optim:\n  name: adamw\n")
    assert _numbers(load_config(path, ["optim.name=shampoo"]).optim) == SOAP


def test_explicit_optimizer_values_win_even_when_equal_to_other_defaults(tmp_path):
    # overrides: SOAP with AdamW's numbers, AdamW with SOAP's
    soap = load_config(
        None,
        ["optim.name=soap", "optim.lr=1e-3", "optim.betas=[0.9, 0.95]", "optim.weight_decay=0.1"],
    ).optim
    assert _numbers(soap) == ADAMW  # eps unset: 1e-8 for both
    adamw = load_config(
        None, ["optim.lr=3e-3", "optim.betas=[0.95, 0.95]", "optim.weight_decay=0.01"]
    ).optim
    assert _numbers(adamw) == SOAP
    # only some fields set: the others come from the chosen optimizer
    one = load_config(None, ["optim.name=soap", "optim.weight_decay=0.1"]).optim
    assert _numbers(one) == {**SOAP, "weight_decay": 0.1}
    eps = load_config(None, ["optim.name=shampoo", "optim.eps=1e-6"]).optim
    assert _numbers(eps) == {**SOAP, "eps": 1e-6}
    # YAML values win too, also when the optimizer is switched by an override
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name: adamw\n  lr: 1.0e-3\n  weight_decay: 0.1\n")
    switched = load_config(path, ["optim.name=soap"]).optim
    assert _numbers(switched) == {**SOAP, "lr": 1e-3, "weight_decay": 0.1}
    path.write_text("optim:\n  name: soap\n  betas: [0.9, 0.95]\n")
    assert _numbers(load_config(path).optim) == {**SOAP, "betas": (0.9, 0.95)}
    # an override beats the YAML value
    assert load_config(path, ["optim.betas=[0.95, 0.99]"]).optim.betas == (0.95, 0.99)


def test_null_and_element_overrides_use_the_chosen_optimizers_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name: soap\n  lr: null\n")
    assert _numbers(load_config(path).optim) == SOAP
    assert load_config(None, ["optim.name=soap", "optim.lr=5e-4", "optim.lr=null"]).optim.lr == 3e-3
    # one element of the pair edits the chosen optimizer's default pair
    assert load_config(None, ["optim.name=soap", "optim.betas.1=0.99"]).optim.betas == (0.95, 0.99)
    assert load_config(None, ["optim.betas.0=0.8"]).optim.betas == (0.8, 0.95)


def test_repo_configs_keep_their_explicit_optimizer_values():
    op7b = load_config("configs/op7b.yaml").optim
    assert op7b.name == "soap"
    assert _numbers(op7b) == {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    base = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    for name in ("adamw", "soap", "muon"):  # the configs/repro/cpu_grid.yaml points
        cfg = load_config("configs/repro/cpu_base.yaml", [f"optim.name={name}"])
        assert _numbers(cfg.optim) == base
    smoke = load_config("configs/smoke.yaml", ["optim.name=soap"]).optim
    assert _numbers(smoke) == {**SOAP, "lr": 3e-3}


def test_dumped_config_holds_the_numbers_and_round_trips(tmp_path):
    cfg = load_config(None, ["optim.name=soap", "optim.weight_decay=0.05"])
    dumped = dump_yaml(cfg)
    optim = yaml.safe_load(dumped)["optim"]
    assert optim["lr"] == 3e-3 and optim["betas"] == [0.95, 0.95]
    assert optim["eps"] == 1e-8 and optim["weight_decay"] == 0.05
    path = tmp_path / "config.yaml"
    path.write_text(dumped)
    assert load_config(path) == cfg
    # The run dir's config.yaml records what the run used: every number is explicit there, so
    # another optim.name keeps them (reproduce, don't re-tune) ...
    other = load_config(path, ["optim.name=adamw"]).optim
    assert other.name == "adamw" and _numbers(other) == _numbers(cfg.optim)
    # ... unless they are reset to null, which takes the new optimizer's defaults.
    nulls = [f"optim.{k}=null" for k in PER_OPTIMIZER]
    assert _numbers(load_config(path, ["optim.name=adamw", *nulls]).optim) == ADAMW
