"""Run configuration: a typed schema (OmegaConf structured config), YAML files and `key=value` overrides.

Every rank parses the same command line, so every rank holds the same validated config; a bad key or value is
a `ConfigError` naming the key, the value and what is allowed, raised before anything trains.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the key and the fix."""


@dataclass
class ClientStoreConfig:
    """Where idle per-client state lives (aux models and their optimiser on the S-server, SplitFed v1's server
    copies, a client rank's hosted clients): see mpisage/runtime/client_store.py."""
    backend: Literal["memory", "disk"] = "memory"   # memory: packed host bytes; disk: a file under `directory`
    slots: Optional[int] = None          # live (materialised) clients per store (None: 2 on a client rank, one per
                                         # client rank on the S-server, which serves that many at once); rest packed
    directory: Optional[str] = None      # disk: node-local scratch (None: TMPDIR)


@dataclass
class DatasetConfig:
    name: str = "fashion_mnist"
    root: Optional[str] = None           # where the data lives; None: the standard places (see mpisage.data)
    distribution: str = "iid"            # iid | noniid_dirichlet (equal sizes) | dirichlet_niidbench (unequal) | shards
    alpha: float = 1.0                   # Dirichlet concentration (noniid_dirichlet, dirichlet_niidbench)
    shards_per_client: int = 2           # shards
    augment: bool = True                 # crop+flip for CIFAR-style data (Fashion-MNIST is never augmented)
    image_size: Optional[int] = None     # resize images to this side (SGLR: Fashion-MNIST at 32); None: as stored
    channels: Optional[int] = None       # 3: repeat grey images to 3 channels (SGLR); None: as stored
    samples_per_client: Optional[int] = None   # iid, noniid_dirichlet: each client this many samples (SGLR: 1000)
    seq_len: int = 128                   # token datasets (e2e): tokens per sample, padded or cut


@dataclass
class DeviceConfig:
    sserver: str = "auto"                # auto (cuda when present, else cpu) | cpu | cuda | cuda:N
    clients: Literal["cpu", "cuda", "auto"] = "cpu"   # cuda: round-robin over the node's GPUs by node-local rank
    cuda_aware: str = "auto"             # auto (library query + self-check) | yes | no; env MPISAGE_CUDA_AWARE wins


@dataclass
class LMConfig:
    """GPT-2 + LoRA (model=gpt2_medium | gpt2_tiny)."""
    pretrained: Optional[str] = None     # a local GPT-2 checkpoint (directory or .safetensors/.bin); None: random init
    client_blocks: int = 1               # transformer blocks on the client (the paper: 1)
    aux_blocks: int = 3                  # freshly initialised blocks in the auxiliary model (the paper: 3)
    lora_rank: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    label_smoothing: float = 0.1
    warmup_steps: int = 500


@dataclass
class WireConfig:
    """How activations and gradients travel (mpisage.runtime.wire): float32 | bfloat16 | float16 | int8."""
    activations: str = "float32"
    gradients: str = "float32"


@dataclass
class Config:
    algorithm: str = "fsl_sage"
    model: str = "cnn"
    aux_model: str = "default"           # linear | half | default | full
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    client_store: ClientStoreConfig = field(default_factory=ClientStoreConfig)
    num_clients: Optional[int] = None    # None: one client per client rank (mpirun -n 11 -> 9 clients)
    rounds: int = 12
    batch_size: int = 64
    local_epochs: int = 1
    seed: int = 200
    run_dir: str = "runs/default"
    comm_threshold_mb: float = 204800.0  # stop after the round in which the paper-figure load reaches this (MiB)
    deterministic: bool = False          # canonical message order on the S-server: bit-identical reruns
    resume: Optional[str] = None         # "auto": the newest valid checkpoint in run_dir; or a checkpoint path
    overwrite: bool = False              # a new run in a run_dir holding another run's files moves them aside

    # optimiser (Adam on clients and S-server, as in the FSL-SAGE paper; GAS uses SGD)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9                # sgd
    grad_clip: float = 0.0               # clip gradients to this norm before each step (0: off)
    lr_decay_at: Optional[float] = None  # multiply every learning rate by 0.1 after this fraction of the rounds

    # FSL-SAGE
    server_update_interval: int = 5      # Q: upload every Q-th local step (one server step per upload)
    align_interval: int = 10             # l: align the auxiliary models at round 0 and every l rounds
    align_buffer_size: int = 1000        # per-client FIFO of uploaded smashed samples on the S-server
    align_steps: int = 100               # Adam steps per alignment
    align_lr: float = 1e-3
    # torch threads of the S-server while it aligns; 0: with align_mode=blocking every core this process may use
    # (the clients wait then), with overlap 1 (the clients compute then)
    align_threads: int = 0
    # blocking: the paper's order (a client's first step of an alignment round waits for its aligned aux);
    # overlap: the client steps on its previous aux until the aligned one arrives, switching at a step boundary
    align_mode: Literal["blocking", "overlap"] = "blocking"

    # GAS (asynchronous; a "round" is one global client-model update of the F-server)
    active_clients: Optional[int] = None     # C: clients training at once (None: all of them)
    local_iters: int = 20                    # E: local iterations per participation
    server_buffer: Optional[int] = None      # Q_s: activation batches per server step (None: C)
    model_buffer: Optional[int] = None       # Q_c: client models per global update (None: C)
    generative: bool = True                  # false: the ablation without generated activations
    covariance: Literal["full", "diag"] = "full"             # per-label activation covariance
    model_weighting: Literal["samples", "equal"] = "samples"  # the paper (|D_k|) | the authors' code
    straggler_delay_s: float = 0.0           # arrival only: client k sleeps this x its slowness per iteration
    # simulated: the straggler clock orders every iteration and returned model (the paper's schedule, deterministic);
    # arrival: MPI arrival order at the ranks' real speeds (real deployments)
    async_schedule: Literal["simulated", "arrival"] = "simulated"

    # SGLR (parallel split learning, client models never averaged)
    split_lr_alpha: float = 0.5              # SplitLr: server lr = lr x C^alpha
    # sampled: the paper (a fraction phi each iteration gets the mean of their slices); phased / phased_final: everyone
    # gets the mean of all slices during the first / final fraction f of the rounds (phased: the authors' code)
    split_avg: Literal["none", "sampled", "phased", "phased_final"] = "sampled"
    split_avg_fraction: float = 0.5          # phi (sampled) or the phase f of training (phased, phased_final)
    loss: Literal["ce", "softmax_bce"] = "ce"   # softmax_bce: the SGLR authors' softmax + binary cross-entropy

    # evaluation, output, runtime
    eval_batch_size: int = 1000
    eval_samples: Optional[int] = None   # evaluate on the first N test samples (None: the whole test set)
    checkpoint_interval: int = 10        # rounds between checkpoints, the last round included (0: none, but an early stop)
    keep_checkpoints: int = 2
    torch_threads: int = 1               # per rank; ranks usually outnumber cores
    comm_timeout_s: float = 1800.0       # a wait for a peer longer than this is an error naming the peer
    heartbeat_s: float = 5.0             # every rank signals it is alive this often ...
    heartbeat_timeout_s: float = 300.0   # ... and one silent this long (while its watcher runs) aborts the job, named (0: off)
    log_interval: int = 1                # rounds between progress lines


ALGORITHMS = ("fsl_sage", "cse_fsl", "local_loss", "fed_avg", "sl_single_server", "sl_multi_server", "sl_vanilla",
              "gas", "sglr", "fed_buff")
ALGORITHM_ALIASES = {"fedbuff": "fed_buff", "fedavg": "fed_avg", "split_avg": "sglr", "splitlr": "sglr", "splitfed_v1": "sl_multi_server", "splitfed_v2": "sl_single_server",
                     "sflv1": "sl_multi_server", "sflv2": "sl_single_server", "vanilla_sl": "sl_vanilla",
                     "sl": "sl_vanilla", "cse-fsl": "cse_fsl", "fsl-sage": "fsl_sage"}
# The FSL-SAGE authors' names for datasets, accepted as aliases.
DATASET_ALIASES = {"fmnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "cifar": "cifar10"}
# `dataset=NAME` is shorthand for `dataset.name=NAME` (the authors' command lines use it).
GROUP_SHORTHANDS = {"dataset": "dataset.name"}


def _rewrite_override(item: str) -> str:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (example: rounds=5)")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("+")
    return f"{GROUP_SHORTHANDS.get(key, key)}={value}"


def _known_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += _known_keys(f.default_factory, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def load_config(config_file: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Schema defaults, then the YAML file (if any), then the overrides; validated. Returns a plain `Config`."""
    schema = OmegaConf.structured(Config)
    layers = []
    try:
        if config_file is not None:
            if not os.path.isfile(config_file):
                raise ConfigError(f"config file {config_file!r} does not exist (see the files in configs/)")
            file_cfg = OmegaConf.load(config_file)
            if isinstance(file_cfg.get("dataset"), str):     # `dataset: cifar10` in a file, as on the command line
                file_cfg["dataset"] = {"name": file_cfg["dataset"]}
            layers.append(file_cfg)
        layers.append(OmegaConf.from_dotlist([_rewrite_override(o) for o in overrides]))
        merged = OmegaConf.merge(schema, *layers)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        known = ", ".join(_known_keys(Config))
        raise ConfigError(f"bad config key or value at {key!r}: {e.msg if hasattr(e, 'msg') else e}\n"
                          f"  known keys: {known}") from None
    # YAML reads yes/no as booleans
    cfg.device.cuda_aware = {"True": "yes", "False": "no"}.get(str(cfg.device.cuda_aware), cfg.device.cuda_aware)
    cfg.algorithm = ALGORITHM_ALIASES.get(cfg.algorithm.lower(), cfg.algorithm.lower())
    cfg.dataset.name = DATASET_ALIASES.get(cfg.dataset.name.lower(), cfg.dataset.name.lower())
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}={value!r} is not allowed: {allowed}")


def validate(cfg: Config) -> None:
    """Checks that need no data and no MPI: choices and ranges. (Rank counts and data sizes are checked at start-up.)"""
    from mpisage.data import DATASETS, PARTITIONS
    from mpisage.models import AUX_VARIANTS, MODELS

    _require(cfg.algorithm in ALGORITHMS, "algorithm", cfg.algorithm, f"one of {', '.join(ALGORITHMS)}")
    _require(cfg.model in MODELS, "model", cfg.model, f"one of {', '.join(MODELS)}")
    _require(cfg.aux_model in AUX_VARIANTS, "aux_model", cfg.aux_model, f"one of {', '.join(AUX_VARIANTS)}")
    _require(cfg.dataset.name in DATASETS, "dataset", cfg.dataset.name, f"one of {', '.join(DATASETS)}")
    _require(cfg.dataset.distribution in PARTITIONS, "dataset.distribution", cfg.dataset.distribution,
             f"one of {', '.join(PARTITIONS)}")
    _require(cfg.dataset.alpha > 0, "dataset.alpha", cfg.dataset.alpha, "must be > 0 (the paper uses 1..10000)")
    _require(cfg.dataset.shards_per_client >= 1, "dataset.shards_per_client", cfg.dataset.shards_per_client,
             "must be >= 1")
    _require(cfg.num_clients is None or cfg.num_clients >= 1, "num_clients", cfg.num_clients,
             "must be >= 1, or null for one client per client rank")
    for key in ("rounds", "batch_size", "local_epochs", "server_update_interval", "align_interval",
                "align_buffer_size", "eval_batch_size", "keep_checkpoints",
                "torch_threads", "log_interval"):
        _require(getattr(cfg, key) >= 1, key, getattr(cfg, key), "must be >= 1")
    _require(cfg.align_steps >= 0, "align_steps", cfg.align_steps, "must be >= 0")
    _require(cfg.align_threads >= 0, "align_threads", cfg.align_threads, "must be >= 1, or 0 for the cores the "
             "waiting clients leave idle")
    _require(cfg.client_store.slots is None or cfg.client_store.slots >= 1, "client_store.slots",
             cfg.client_store.slots, "must be >= 1 or null")
    _require(cfg.checkpoint_interval >= 0, "checkpoint_interval", cfg.checkpoint_interval,
             "must be >= 0 (0: no checkpoints, except when a run stops early: SIGTERM/SIGUSR1)")
    for key in ("lr", "align_lr", "comm_threshold_mb", "comm_timeout_s"):
        _require(getattr(cfg, key) > 0, key, getattr(cfg, key), "must be > 0")
    _require(cfg.heartbeat_s > 0, "heartbeat_s", cfg.heartbeat_s, "must be > 0")
    _require(cfg.heartbeat_timeout_s == 0 or cfg.heartbeat_timeout_s >= 3 * cfg.heartbeat_s, "heartbeat_timeout_s",
             cfg.heartbeat_timeout_s, f"must be 0 (off) or at least 3 x heartbeat_s ({3 * cfg.heartbeat_s:g})")
    _require(cfg.grad_clip >= 0, "grad_clip", cfg.grad_clip, "must be >= 0 (0: off)")
    _require(cfg.lr_decay_at is None or 0 < cfg.lr_decay_at < 1, "lr_decay_at", cfg.lr_decay_at,
             "must be a fraction of the rounds in (0, 1), or null")
    for key in ("active_clients", "server_buffer", "model_buffer"):
        _require(getattr(cfg, key) is None or getattr(cfg, key) >= 1, key, getattr(cfg, key), "must be >= 1 or null")
    _require(cfg.eval_samples is None or cfg.eval_samples >= 1, "eval_samples", cfg.eval_samples,
             "must be >= 1, or null for the whole test set")
    _require(cfg.local_iters >= 1, "local_iters", cfg.local_iters, "must be >= 1")
    _require(cfg.straggler_delay_s >= 0, "straggler_delay_s", cfg.straggler_delay_s, "must be >= 0")
    _require(cfg.straggler_delay_s == 0 or cfg.async_schedule == "arrival", "straggler_delay_s", cfg.straggler_delay_s,
             "only applies with async_schedule=arrival (the simulated schedule already orders clients by their "
             "simulated speed); set async_schedule=arrival or straggler_delay_s=0")
    _require(0 <= cfg.split_avg_fraction <= 1, "split_avg_fraction", cfg.split_avg_fraction, "must be in [0, 1]")
    _require(cfg.loss == "ce" or cfg.algorithm == "sglr", "loss", cfg.loss,
             f"softmax_bce is implemented for algorithm=sglr only (this run: {cfg.algorithm}); use loss=ce")
    _require(cfg.dataset.image_size is None or cfg.dataset.image_size >= 8, "dataset.image_size",
             cfg.dataset.image_size, "must be >= 8, or null to keep the stored size")
    _require(cfg.dataset.channels in (None, 1, 3), "dataset.channels", cfg.dataset.channels, "1, 3 or null")
    _require(cfg.dataset.samples_per_client is None or cfg.dataset.samples_per_client >= 1,
             "dataset.samples_per_client", cfg.dataset.samples_per_client, "must be >= 1 or null")
    _require(cfg.dataset.seq_len >= 8, "dataset.seq_len", cfg.dataset.seq_len, "must be >= 8")
    device_ok = lambda d: d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())  # noqa: E731
    _require(device_ok(cfg.device.sserver), "device.sserver", cfg.device.sserver, "auto, cpu, cuda or cuda:N")
    _require(cfg.device.cuda_aware in ("auto", "yes", "no"), "device.cuda_aware", cfg.device.cuda_aware,
             "auto, yes or no")
    for key in ("client_blocks", "aux_blocks", "lora_rank"):
        _require(getattr(cfg.lm, key) >= 1, f"lm.{key}", getattr(cfg.lm, key), "must be >= 1")
    _require(0 <= cfg.lm.lora_dropout < 1, "lm.lora_dropout", cfg.lm.lora_dropout, "must be in [0, 1)")
    _require(0 <= cfg.lm.label_smoothing < 1, "lm.label_smoothing", cfg.lm.label_smoothing, "must be in [0, 1)")
    _require(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "must be >= 0")
    _require(bool(cfg.run_dir), "run_dir", cfg.run_dir, "must be a directory path")
    from mpisage.runtime.wire import FORMATS
    for key in ("activations", "gradients"):
        _require(getattr(cfg.wire, key) in FORMATS, f"wire.{key}", getattr(cfg.wire, key),
                 f"one of {', '.join(FORMATS)}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def parse_args(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """`[-c FILE | --config FILE | config=FILE] key=value ...` -> (file, overrides)."""
    config_file, overrides = None, []
    it = iter(argv)
    for arg in it:
        if arg in ("-c", "--config"):
            config_file = next(it, None)
            if config_file is None:
                raise ConfigError(f"{arg} needs a YAML file path (example: {arg} configs/default.yaml)")
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith("config="):
            config_file = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            raise SystemExit(HELP)
        else:
            overrides.append(arg)
    return config_file, overrides


HELP = """usage: mpirun -n RANKS python -m mpisage.run [-c configs/FILE.yaml] [key=value ...]

rank 0: F-server, rank 1: S-server, ranks 2..: clients (RANKS >= 3).
examples:
  mpirun -n 11 python -m mpisage.run
  mpirun -n 11 python -m mpisage.run rounds=5 dataset.distribution=noniid_dirichlet dataset.alpha=1
  mpirun -n 12 python -m mpisage.run -c configs/paper/cifar10_resnet18_iid.yaml dataset.root=/data
keys: """ + ", ".join(_known_keys(Config))
