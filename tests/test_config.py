import pytest

from ofs_scale.config import ConfigError, dump_yaml, load_config


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
        ("optim.name=sgd", "choose one of ['adamw', 'soap', 'shampoo']"),
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
