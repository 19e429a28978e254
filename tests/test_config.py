"""Config: defaults, YAML + overrides, shorthands, and every kind of bad input rejected with a message naming it."""
import pytest

from mpisage.config import Config, ConfigError, load_config, parse_args


def test_defaults_are_the_default_run():
    cfg = load_config()
    assert (cfg.algorithm, cfg.model, cfg.dataset.name, cfg.dataset.distribution) == \
        ("fsl_sage", "cnn", "fashion_mnist", "iid")
    assert cfg.fsl.server_update_interval == 5 and cfg.fsl.align_interval == 10 and cfg.comm_threshold_mb == 204800


def test_overrides_file_and_shorthands(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dataset: cifar10\nrounds: 7\nmodel: resnet18\n")
    cfg = load_config(str(f), ["rounds=9", "dataset.alpha=10", "dataset.distribution=noniid_dirichlet",
                               "runtime.deterministic=true", "num_clients=12"])
    assert cfg.dataset.name == "cifar10" and cfg.model == "resnet18"
    assert cfg.rounds == 9 and cfg.dataset.alpha == 10.0 and cfg.runtime.deterministic is True and cfg.num_clients == 12
    assert load_config(None, ["dataset=fmnist"]).dataset.name == "fashion_mnist"   # the authors' alias
    assert parse_args(["-c", "x.yaml", "a=1"]) == ("x.yaml", ["a=1"])


@pytest.mark.parametrize("override, needle", [
    (["no_such_key=1"], "no_such_key"),
    (["dataset.no_such=1"], "dataset.no_such"),
    (["rounds=many"], "rounds"),
    (["batch_size=0"], "batch_size"),
    (["algorithm=sgd"], "algorithm"),
    (["model=vgg"], "model"),
    (["dataset=mnist"], "dataset"),
    (["dataset.distribution=skewed"], "dataset.distribution"),
    (["dataset.alpha=0"], "dataset.alpha"),
    (["dataset.alpha=-1"], "dataset.alpha"),
    (["aux_model=huge"], "aux_model"),
    (["optim.lr=0"], "lr"),
    (["num_clients=0"], "num_clients"),
    (["rounds"], "key=value"),
    (["optim.name=lion"], "optimizer"),
    (["sglr.avg=all"], "split_avg"),
    (["sglr.loss=focal"], "loss"),
    (["algorithm=gas", "sglr.loss=softmax_bce"], "loss"),
    (["device.clients=tpu"], "device.clients"),
])
def test_bad_config_is_rejected_with_its_name(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_sglr_choices_and_the_niidbench_split_are_accepted():
    cfg = load_config("configs/sglr_resnet16_fmnist.yaml", ["sglr.avg=phased_final", "sglr.loss=softmax_bce"])
    assert (cfg.sglr.avg, cfg.sglr.loss, cfg.batch_size) == ("phased_final", "softmax_bce", 8)
    cfg = load_config(None, ["dataset.distribution=dirichlet_niidbench", "dataset.alpha=0.1"])
    assert cfg.dataset.distribution == "dirichlet_niidbench"


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_schema_round_trips_to_yaml():
    from mpisage.config import to_yaml
    text = to_yaml(load_config(None, ["rounds=3"]))
    assert "rounds: 3" in text and "align_interval: 10" in text and isinstance(Config(), Config)


def test_straggler_delay_is_refused_with_the_simulated_schedule():
    from mpisage.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="asynchronous.schedule=arrival"):
        load_config(None, ["algorithm=gas", "asynchronous.straggler_delay_s=0.1"])
    assert load_config(None, ["algorithm=gas", "asynchronous.straggler_delay_s=0.1", "asynchronous.schedule=arrival"]).straggler_delay_s
