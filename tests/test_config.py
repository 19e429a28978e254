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
    (["optim.lr=0"], "optim.lr"),
    (["num_clients=0"], "num_clients"),
    (["rounds"], "key=value"),
    (["optim.name=lion"], "optim.name"),
    (["sglr.avg=all"], "sglr.avg"),
    (["sglr.loss=focal"], "sglr.loss"),
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
    cfg = load_config(None, ["algorithm=gas", "asynchronous.straggler_delay_s=0.1", "asynchronous.schedule=arrival"])
    assert cfg.asynchronous.straggler_delay_s == 0.1


@pytest.mark.parametrize("override, new", [
    ("lr=0.1", "optim.lr"), ("align_interval=3", "fsl.align_interval"), ("loss=softmax_bce", "sglr.loss"),
    ("deterministic=true", "runtime.deterministic"), ("async_schedule=arrival", "asynchronous.schedule")])
def test_old_flat_keys_are_refused_naming_the_new_key(override, new, tmp_path):
    old = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{old} is now {new} "):
        load_config(None, [override])
    f = tmp_path / "old.yaml"
    f.write_text(f"rounds: 3\n{old}: {override.split('=')[1]}\n")
    with pytest.raises(ConfigError, match=f"old.yaml: {old} is now {new}"):
        load_config(str(f))


def test_the_fsl_sage_authors_names_are_accepted(tmp_path):
    """Their command lines (algorithm=, dataset=, dataset.distribution/alpha, num_clients, rounds, comm_threshold_mb,
    seed) and the keys of their hydra groups algorithm/ and dataset/ (server_update_interval, shard_num)."""
    cfg = load_config(None, ["algorithm=cse_fsl", "dataset=cifar10", "dataset.distribution=shards", "dataset.alpha=10",
                             "num_clients=10", "rounds=200", "comm_threshold_mb=1024", "seed=3",
                             "algorithm.server_update_interval=7", "dataset.shard_num=3"])
    assert (cfg.algorithm, cfg.dataset.name, cfg.dataset.distribution, cfg.dataset.alpha) == \
        ("cse_fsl", "cifar10", "shards", 10.0)
    assert (cfg.num_clients, cfg.rounds, cfg.comm_threshold_mb, cfg.seed) == (10, 200, 1024.0, 3)
    assert cfg.fsl.server_update_interval == 7 and cfg.dataset.shards_per_client == 3
    f = tmp_path / "authors.yaml"
    f.write_text("algorithm:\n  name: fsl_sage\n  server_update_interval: 4\n  align_interval: 6\n"
                 "dataset:\n  name: cifar10\n  shard_num: 5\n")
    cfg = load_config(str(f))
    assert (cfg.algorithm, cfg.fsl.server_update_interval, cfg.fsl.align_interval, cfg.dataset.shards_per_client) \
        == ("fsl_sage", 4, 6, 5)


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=nan", "optim.lr=-inf", "dataset.alpha=inf",
                                      "comm_threshold_mb=inf", "runtime.heartbeat_timeout_s=inf"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match=f"config {override.split('=')[0]}=.* must be a finite number"):
        load_config(None, [override])


def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("rounds: 3\noptim:\n  lr: [0.1\n  name: adam\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{f}: YAML syntax error at line ")
    assert "column" in message


def test_one_source_for_the_algorithm_names():
    from mpisage.algorithms import REGISTRY
    from mpisage.config import ALGORITHM_ALIASES, ALGORITHMS
    assert sorted(REGISTRY) == sorted(ALGORITHMS)
    assert set(ALGORITHM_ALIASES.values()) <= set(ALGORITHMS)


def test_every_section_says_what_it_configures():
    import dataclasses
    sections = [f.default_factory for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING]
    assert len(sections) >= 10
    for cls in [Config, *sections]:      # a dataclass without a docstring gets its signature as __doc__
        assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), cls.__name__


OLD_LAYOUT = """\
algorithm: fsl_sage
model: cnn
rounds: 4
seed: 200
run_dir: runs/old
comm_threshold_mb: 204800.0
dataset:
  name: fashion_mnist
  distribution: iid
optimizer: adam
lr: 0.001
server_update_interval: 5
align_interval: 10
align_mode: blocking
eval_samples: 300
checkpoint_interval: 2
keep_checkpoints: 2
deterministic: true
loss: ce
"""


def test_a_stored_config_of_the_flat_layout_is_read_in_the_sections():
    from mpisage.config import read_stored_config
    from mpisage.runtime.checkpoint import config_differences
    stored = read_stored_config(OLD_LAYOUT)
    assert stored["optim"] == {"name": "adam", "lr": 0.001} and stored["eval"] == {"samples": 300}
    assert stored["fsl"]["align_interval"] == 10 and stored["runtime"] == {"deterministic": True}
    assert stored["rounds"] == 4 and "lr" not in stored and read_stored_config("") == {}
    same = ["rounds=4", "run_dir=runs/old", "eval.samples=300", "checkpoint.interval=2", "runtime.deterministic=true"]
    assert config_differences(OLD_LAYOUT, load_config(None, same)) == []      # an old checkpoint resumes
    assert config_differences(OLD_LAYOUT, load_config(None, [*same, "optim.lr=0.01"])) == [
        "optim.lr: checkpoint 0.001, now 0.01"]
    assert config_differences(OLD_LAYOUT, load_config(None, [*same[:-1]])) == [
        "runtime.deterministic: checkpoint True, now False"]
