"""Run configuration: a typed schema (OmegaConf structured config), YAML files and `key=value` overrides.

Every rank parses the same command line, so every rank holds the same validated config; a bad key or value is
a `ConfigError` naming the key, the value and what is allowed, raised before anything trains.
"""
from __future__ import annotations

import dataclasses
import math
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

    def validate(self) -> None:
        _require(self.slots is None or self.slots >= 1, "client_store.slots", self.slots, "must be >= 1 or null")


@dataclass
class DatasetConfig:
    """The data set and how it is split over the clients."""
    name: str = "fashion_mnist"          # see mpisage.data.DATASETS (`dataset=NAME` is short for dataset.name=NAME)
    root: Optional[str] = None           # where the data lives; None: the standard places (see mpisage.data)
    distribution: str = "iid"            # iid | noniid_dirichlet (equal sizes) | dirichlet_niidbench (unequal) | shards
    alpha: float = 1.0                   # Dirichlet concentration (noniid_dirichlet, dirichlet_niidbench)
    shards_per_client: int = 2           # shards (the FSL-SAGE authors' dataset.shard_num)
    augment: bool = True                 # crop+flip for CIFAR-style data (Fashion-MNIST is never augmented)
    image_size: Optional[int] = None     # resize images to this side (SGLR: Fashion-MNIST at 32); None: as stored
    channels: Optional[int] = None       # 3: repeat grey images to 3 channels (SGLR); None: as stored
    samples_per_client: Optional[int] = None   # iid, noniid_dirichlet: each client this many samples (SGLR: 1000)
    seq_len: int = 128                   # token datasets (e2e): tokens per sample, padded or cut

    def validate(self) -> None:
        from mpisage.data import DATASETS, PARTITIONS
        _require(self.name in DATASETS, "dataset", self.name, f"one of {', '.join(DATASETS)}")
        _require(self.distribution in PARTITIONS, "dataset.distribution", self.distribution,
                 f"one of {', '.join(PARTITIONS)}")
        _require(self.alpha > 0, "dataset.alpha", self.alpha, "must be > 0 (the paper uses 1..10000)")
        _require(self.shards_per_client >= 1, "dataset.shards_per_client", self.shards_per_client, "must be >= 1")
        _require(self.image_size is None or self.image_size >= 8, "dataset.image_size", self.image_size,
                 "must be >= 8, or null to keep the stored size")
        _require(self.channels in (None, 1, 3), "dataset.channels", self.channels, "1, 3 or null")
        _require(self.samples_per_client is None or self.samples_per_client >= 1, "dataset.samples_per_client",
                 self.samples_per_client, "must be >= 1 or null")
        _require(self.seq_len >= 8, "dataset.seq_len", self.seq_len, "must be >= 8")


@dataclass
class DeviceConfig:
    """Where each role computes."""
    sserver: str = "auto"                # auto (cuda when present, else cpu) | cpu | cuda | cuda:N
    clients: Literal["cpu", "cuda", "auto"] = "cpu"   # cuda: round-robin over the node's GPUs by node-local rank
    cuda_aware: str = "auto"             # auto (library query + self-check) | yes | no; env MPISAGE_CUDA_AWARE wins

    def validate(self) -> None:
        named = self.sserver.startswith("cuda:") and self.sserver[5:].isdigit()
        _require(self.sserver in ("auto", "cpu", "cuda") or named, "device.sserver", self.sserver,
                 "auto, cpu, cuda or cuda:N")
        _require(self.cuda_aware in ("auto", "yes", "no"), "device.cuda_aware", self.cuda_aware, "auto, yes or no")


@dataclass
class LMConfig:
    """GPT-2 + LoRA (model=gpt2_medium | gpt2_tiny)."""
    pretrained: Optional[str] = None     # a local GPT-2 checkpoint (directory or .safetensors/.bin); None: random init
    client_blocks: int = 1               # transformer blocks on the client (the paper: 1)
    aux_blocks: int = 3                  # freshly initialised blocks in the auxiliary model (the paper: 3)
    lora_rank: int = 4                   # LoRA rank r
    lora_alpha: float = 32.0             # LoRA scale alpha (the update is scaled by alpha / r)
    lora_dropout: float = 0.1            # dropout on the LoRA input
    label_smoothing: float = 0.1         # of the token cross-entropy
    warmup_steps: int = 500              # linear learning-rate warm-up, in optimiser steps

    def validate(self) -> None:
        for key in ("client_blocks", "aux_blocks", "lora_rank"):
            _require(getattr(self, key) >= 1, f"lm.{key}", getattr(self, key), "must be >= 1")
        _require(0 <= self.lora_dropout < 1, "lm.lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _require(0 <= self.label_smoothing < 1, "lm.label_smoothing", self.label_smoothing, "must be in [0, 1)")


@dataclass
class WireConfig:
    """How activations and gradients travel (mpisage.runtime.wire): float32 | bfloat16 | float16 | int8."""
    activations: str = "float32"         # client -> S-server
    gradients: str = "float32"           # S-server -> client

    def validate(self) -> None:
        from mpisage.runtime.wire import FORMATS
        for key in ("activations", "gradients"):
            _require(getattr(self, key) in FORMATS, f"wire.{key}", getattr(self, key), f"one of {', '.join(FORMATS)}")


@dataclass
class OptimConfig:
    """The optimiser of every model (Adam on clients and S-server, as in the FSL-SAGE paper; GAS uses SGD)."""
    name: Literal["adam", "adamw", "sgd"] = "adam"   # the optimiser (the FSL-SAGE paper: adam; GAS: sgd)
    lr: float = 1e-3                     # learning rate
    weight_decay: float = 1e-4           # L2 (adam, sgd) or decoupled (adamw)
    momentum: float = 0.9                # sgd
    grad_clip: float = 0.0               # clip gradients to this norm before each step (0: off)
    lr_decay_at: Optional[float] = None  # multiply every learning rate by 0.1 after this fraction of the rounds

    def validate(self) -> None:
        _require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0: off)")
        _require(self.lr_decay_at is None or 0 < self.lr_decay_at < 1, "optim.lr_decay_at", self.lr_decay_at,
                 "must be a fraction of the rounds in (0, 1), or null")


@dataclass
class FslConfig:
    """Federated split learning with auxiliary models: FSL-SAGE's alignment (read by fsl_sage only) and the
    server-update interval Q (fsl_sage, and CSE-FSL's h). Other algorithms ignore this section."""
    server_update_interval: int = 5      # Q: upload every Q-th local step (one server step per upload)
    align_interval: int = 10             # l: align the auxiliary models at round 0 and every l rounds
    align_buffer_size: int = 1000        # per-client FIFO of uploaded smashed samples on the S-server
    align_steps: int = 100               # Adam steps per alignment
    align_lr: float = 1e-3               # learning rate of the alignment steps
    # torch threads of the S-server while it aligns; 0: with align_mode=blocking every core this process may use
    # (the clients wait then), with overlap 1 (the clients compute then)
    align_threads: int = 0               # S-server torch threads while it aligns (0: as above)
    # blocking: the paper's order (a client's first step of an alignment round waits for its aligned aux);
    # overlap: the client steps on its previous aux until the aligned one arrives, switching at a step boundary
    align_mode: Literal["blocking", "overlap"] = "blocking"   # blocking: the paper's order; overlap: see above

    def validate(self) -> None:
        for key in ("server_update_interval", "align_interval", "align_buffer_size"):
            _require(getattr(self, key) >= 1, f"fsl.{key}", getattr(self, key), "must be >= 1")
        _require(self.align_steps >= 0, "fsl.align_steps", self.align_steps, "must be >= 0")
        _require(self.align_lr > 0, "fsl.align_lr", self.align_lr, "must be > 0")
        _require(self.align_threads >= 0, "fsl.align_threads", self.align_threads,
                 "must be >= 1, or 0 for the cores the waiting clients leave idle")


@dataclass
class AsynchronousConfig:
    """The asynchronous algorithms (gas, fed_buff, ca2fl): a "round" is one global client-model update of the F-server.
    Synchronous algorithms ignore this section."""
    active_clients: Optional[int] = None     # C: clients training at once (None: all of them)
    local_iters: int = 20                    # E: local iterations per participation
    model_buffer: Optional[int] = None       # Q_c: client models per global update (None: C)
    model_weighting: Literal["samples", "equal"] = "samples"  # the paper (|D_k|) | the authors' code
    straggler_delay_s: float = 0.0           # schedule=arrival only: client k sleeps this x its slowness per iteration
    # simulated: the straggler clock orders every iteration and returned model (the paper's schedule, deterministic);
    # arrival: MPI arrival order at the ranks' real speeds (real deployments)
    schedule: Literal["simulated", "arrival"] = "simulated"   # simulated: the paper's; arrival: real speeds

    def validate(self) -> None:
        for key in ("active_clients", "model_buffer"):
            _require(getattr(self, key) is None or getattr(self, key) >= 1, f"asynchronous.{key}",
                     getattr(self, key), "must be >= 1 or null")
        _require(self.local_iters >= 1, "asynchronous.local_iters", self.local_iters, "must be >= 1")
        _require(self.straggler_delay_s >= 0, "asynchronous.straggler_delay_s", self.straggler_delay_s, "must be >= 0")
        _require(self.straggler_delay_s == 0 or self.schedule == "arrival", "asynchronous.straggler_delay_s",
                 self.straggler_delay_s, "only applies with asynchronous.schedule=arrival (the simulated schedule "
                 "already orders clients by their simulated speed); set asynchronous.schedule=arrival or "
                 "asynchronous.straggler_delay_s=0")


@dataclass
class GasConfig:
    """GAS's generative activations and server buffer (read by gas only; fed_buff and the rest ignore it)."""
    server_buffer: Optional[int] = None      # Q_s: activation batches per server step (None: C)
    generative: bool = True                  # false: the ablation without generated activations
    covariance: Literal["full", "diag"] = "full"             # per-label activation covariance

    def validate(self) -> None:
        _require(self.server_buffer is None or self.server_buffer >= 1, "gas.server_buffer", self.server_buffer,
                 "must be >= 1 or null")


@dataclass
class Ca2flConfig:
    """CA2FL's server step (read by ca2fl only; it runs on the asynchronous section's scheduler and buffer)."""
    global_lr: float = 1.0                   # eta: x <- x + eta * v, v the calibrated update (CA2FL's server rate)

    def validate(self) -> None:
        _require(self.global_lr > 0, "ca2fl.global_lr", self.global_lr, "must be > 0")


@dataclass
class SglrConfig:
    """SGLR, parallel split learning whose client models are never averaged (read by sglr only, so its loss and
    averaging choices cannot reach another algorithm)."""
    lr_alpha: float = 0.5                    # SplitLr: server lr = lr x C^alpha
    # sampled: the paper (a fraction phi each iteration gets the mean of their slices); phased / phased_final: everyone
    # gets the mean of all slices during the first / final fraction f of the rounds (phased: the authors' code)
    avg: Literal["none", "sampled", "phased", "phased_final"] = "sampled"   # SplitAvg (none: plain parallel SL)
    avg_fraction: float = 0.5                # phi (sampled) or the phase f of training (phased, phased_final)
    loss: Literal["ce", "softmax_bce"] = "ce"   # softmax_bce: the SGLR authors' softmax + binary cross-entropy

    def validate(self) -> None:
        _require(0 <= self.avg_fraction <= 1, "sglr.avg_fraction", self.avg_fraction, "must be in [0, 1]")


@dataclass
class EvalConfig:
    """Evaluation on the test set (by the F-server, after every round)."""
    batch_size: int = 1000               # test samples per forward pass
    samples: Optional[int] = None        # evaluate on the first N test samples (None: the whole test set)

    def validate(self) -> None:
        _require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")
        _require(self.samples is None or self.samples >= 1, "eval.samples", self.samples,
                 "must be >= 1, or null for the whole test set")


@dataclass
class CheckpointConfig:
    """Checkpoints in run_dir (resume=auto takes the newest valid one)."""
    interval: int = 10                   # rounds between checkpoints, the last included (0: only at an early stop)
    keep: int = 2                        # checkpoints kept; older ones are deleted

    def validate(self) -> None:
        _require(self.interval >= 0, "checkpoint.interval", self.interval,
                 "must be >= 0 (0: no checkpoints, except when a run stops early: SIGTERM/SIGUSR1)")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclass
class RuntimeConfig:
    """Processes, threads, timeouts, liveness and message order."""
    torch_threads: int = 1               # per rank; ranks usually outnumber cores
    comm_timeout_s: float = 1800.0       # a wait for a peer longer than this is an error naming the peer
    heartbeat_s: float = 5.0             # every rank signals it is alive this often ...
    heartbeat_timeout_s: float = 300.0   # ... one silent this long (while its watcher runs) aborts the job (0: off)
    log_interval: int = 1                # rounds between progress lines
    deterministic: bool = False          # canonical message order on the S-server: bit-identical reruns

    def validate(self) -> None:
        for key in ("torch_threads", "log_interval"):
            _require(getattr(self, key) >= 1, f"runtime.{key}", getattr(self, key), "must be >= 1")
        for key in ("comm_timeout_s", "heartbeat_s"):
            _require(getattr(self, key) > 0, f"runtime.{key}", getattr(self, key), "must be > 0")
        _require(self.heartbeat_timeout_s == 0 or self.heartbeat_timeout_s >= 3 * self.heartbeat_s,
                 "runtime.heartbeat_timeout_s", self.heartbeat_timeout_s,
                 f"must be 0 (off) or at least 3 x runtime.heartbeat_s ({3 * self.heartbeat_s:g})")


@dataclass
class Config:
    """One run: what every run has at the top level, each concern in its own section."""
    algorithm: str = "fsl_sage"          # one of ALGORITHMS (or an alias in ALGORITHM_ALIASES)
    model: str = "cnn"                   # see mpisage.models.MODELS
    aux_model: str = "default"           # linear | half | default | full (algorithms with auxiliary models)
    num_clients: Optional[int] = None    # None: one client per client rank (mpirun -n 11 -> 9 clients)
    rounds: int = 12                     # rounds (asynchronous algorithms: global client-model updates)
    batch_size: int = 64                 # training samples per step and client
    local_epochs: int = 1                # passes over its data per client and round (synchronous algorithms)
    seed: int = 200                      # data split, initialisation and sampling
    run_dir: str = "runs/default"        # metrics.h5, checkpoints and logs
    resume: Optional[str] = None         # "auto": the newest valid checkpoint in run_dir; or a checkpoint path
    overwrite: bool = False              # a new run in a run_dir holding another run's files moves them aside
    comm_threshold_mb: float = 204800.0  # stop after the round in which the paper-figure load reaches this (MiB)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)              # data and its split
    optim: OptimConfig = field(default_factory=OptimConfig)                    # optimiser of every model
    fsl: FslConfig = field(default_factory=FslConfig)                          # fsl_sage, cse_fsl
    asynchronous: AsynchronousConfig = field(default_factory=AsynchronousConfig)   # gas, fed_buff, ca2fl
    gas: GasConfig = field(default_factory=GasConfig)                          # gas
    ca2fl: Ca2flConfig = field(default_factory=Ca2flConfig)                    # ca2fl
    sglr: SglrConfig = field(default_factory=SglrConfig)                       # sglr
    lm: LMConfig = field(default_factory=LMConfig)                             # gpt2_medium, gpt2_tiny
    eval: EvalConfig = field(default_factory=EvalConfig)                       # test-set evaluation
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)     # checkpoints in run_dir
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)              # threads, timeouts, message order
    device: DeviceConfig = field(default_factory=DeviceConfig)                 # CPU / GPU per role
    wire: WireConfig = field(default_factory=WireConfig)                       # activation / gradient formats
    client_store: ClientStoreConfig = field(default_factory=ClientStoreConfig)   # idle per-client state

    def sections(self) -> list:
        """The section objects (the dataclass-valued fields), in schema order."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return [value for value in values if dataclasses.is_dataclass(value)]


# The algorithm names, one source: mpisage.algorithms.REGISTRY has exactly these (tests/test_config.py checks it).
ALGORITHMS = ("fsl_sage", "cse_fsl", "local_loss", "fed_avg", "sl_single_server", "sl_multi_server", "sl_vanilla",
              "gas", "sglr", "fed_buff", "ca2fl")
ALGORITHM_ALIASES = {"fedbuff": "fed_buff", "fedavg": "fed_avg", "split_avg": "sglr", "splitlr": "sglr",
                     "splitfed_v1": "sl_multi_server", "splitfed_v2": "sl_single_server",
                     "sflv1": "sl_multi_server", "sflv2": "sl_single_server", "vanilla_sl": "sl_vanilla",
                     "sl": "sl_vanilla", "cse-fsl": "cse_fsl", "fsl-sage": "fsl_sage"}
# The FSL-SAGE authors' names for datasets, accepted as aliases.
DATASET_ALIASES = {"fmnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "cifar": "cifar10"}
# `dataset=NAME` is shorthand for `dataset.name=NAME` (the authors' command lines use it).
GROUP_SHORTHANDS = {"dataset": "dataset.name"}
# The FSL-SAGE authors' key names (their hydra groups algorithm/ and dataset/), accepted as aliases.
KEY_ALIASES = {"algorithm.server_update_interval": "fsl.server_update_interval",
               "algorithm.align_interval": "fsl.align_interval",
               "dataset.shard_num": "dataset.shards_per_client"}
# Keys of the flat layout (before the sections) -> their keys now. Refused in files and on command lines with the
# new name; a stored config (checkpoint, metrics.h5) of the flat layout is read through `upgrade_layout`.
RENAMED = {
    "optimizer": "optim.name", "lr": "optim.lr", "weight_decay": "optim.weight_decay", "momentum": "optim.momentum",
    "grad_clip": "optim.grad_clip", "lr_decay_at": "optim.lr_decay_at",
    "server_update_interval": "fsl.server_update_interval", "align_interval": "fsl.align_interval",
    "align_buffer_size": "fsl.align_buffer_size", "align_steps": "fsl.align_steps", "align_lr": "fsl.align_lr",
    "align_threads": "fsl.align_threads", "align_mode": "fsl.align_mode",
    "active_clients": "asynchronous.active_clients", "local_iters": "asynchronous.local_iters",
    "model_buffer": "asynchronous.model_buffer", "model_weighting": "asynchronous.model_weighting",
    "straggler_delay_s": "asynchronous.straggler_delay_s", "async_schedule": "asynchronous.schedule",
    "server_buffer": "gas.server_buffer", "generative": "gas.generative", "covariance": "gas.covariance",
    "split_lr_alpha": "sglr.lr_alpha", "split_avg": "sglr.avg", "split_avg_fraction": "sglr.avg_fraction",
    "loss": "sglr.loss",
    "eval_batch_size": "eval.batch_size", "eval_samples": "eval.samples",
    "checkpoint_interval": "checkpoint.interval", "keep_checkpoints": "checkpoint.keep",
    "torch_threads": "runtime.torch_threads", "comm_timeout_s": "runtime.comm_timeout_s",
    "heartbeat_s": "runtime.heartbeat_s", "heartbeat_timeout_s": "runtime.heartbeat_timeout_s",
    "log_interval": "runtime.log_interval", "deterministic": "runtime.deterministic",
}


def _move_key(tree: dict, old: str, new: str) -> bool:
    """Moves tree's dotted key `old` to dotted key `new` (creating sections); True if there was one to move."""
    *old_parents, old_leaf = old.split(".")
    parent = tree
    for name in old_parents:
        parent = parent.get(name) if isinstance(parent, dict) else None
    if not isinstance(parent, dict) or old_leaf not in parent:
        return False
    value = parent.pop(old_leaf)
    *new_parents, new_leaf = new.split(".")
    target = tree
    for name in new_parents:
        target = target.setdefault(name, {})
    target[new_leaf] = value
    return True


def upgrade_layout(stored: dict) -> dict:
    """A stored config (checkpoint or metrics.h5 attribute, parsed YAML) in today's layout: the flat layout's keys
    moved into their sections. The one place that reads the old layout; everything reading a stored config calls it."""
    tree = dict(stored) if isinstance(stored, dict) else {}
    for section, value in list(tree.items()):
        if isinstance(value, dict):
            tree[section] = dict(value)
    for old, new in RENAMED.items():
        _move_key(tree, old, new)
    return tree


def read_stored_config(text: str) -> dict:
    """The config YAML stored in a checkpoint or metrics.h5, as a nested dict in today's layout ({} if empty)."""
    import yaml
    return upgrade_layout(yaml.safe_load(text or ""))


def _rewrite_override(item: str) -> str:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (example: rounds=5)")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("+")
    if key in RENAMED:
        raise ConfigError(f"{key} is now {RENAMED[key]} (write {RENAMED[key]}={value})")
    key = KEY_ALIASES.get(key, GROUP_SHORTHANDS.get(key, key))
    return f"{key}={value}"


def _known_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += _known_keys(f.default_factory, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _load_file(config_file: str) -> dict:
    """The YAML file as a dict, with the shorthands and the authors' aliases applied; old flat keys refused."""
    import yaml
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file!r} does not exist (see the files in configs/)")
    try:
        tree = OmegaConf.to_container(OmegaConf.load(config_file))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{config_file}: YAML syntax error at {where}: {problem}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{config_file}: a config file is a YAML mapping of keys (see configs/default.yaml)")
    old = [key for key in tree if key in RENAMED]
    if old:
        raise ConfigError(f"{config_file}: " + "; ".join(f"{k} is now {RENAMED[k]}" for k in old)
                          + " (move each under its section, e.g. `optim:` then `  lr: 0.001`)")
    if isinstance(tree.get("dataset"), str):     # `dataset: cifar10` in a file, as on the command line
        tree["dataset"] = {"name": tree["dataset"]}
    for alias, key in KEY_ALIASES.items():
        _move_key(tree, alias, key)
    group = tree.get("algorithm")
    if isinstance(group, dict) and set(group) <= {"name"}:   # the authors' algorithm group, its keys moved above
        tree["algorithm"] = group.get("name", Config.algorithm)
    return tree


def load_config(config_file: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Schema defaults, then the YAML file (if any), then the overrides; validated. Returns a plain `Config`."""
    schema = OmegaConf.structured(Config)
    try:
        layers = [OmegaConf.create(_load_file(config_file))] if config_file is not None else []
        layers.append(OmegaConf.from_dotlist([_rewrite_override(o) for o in overrides]))
        cfg: Config = OmegaConf.to_object(OmegaConf.merge(schema, *layers))
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


def _require_finite(node, prefix: str = "") -> None:
    """inf and nan pass the range checks' comparisons in one direction or another: refused here, for every float."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _require_finite(value, prefix + f.name + ".")
        elif isinstance(value, float):
            _require(math.isfinite(value), prefix + f.name, value, "must be a finite number")


def validate(cfg: Config) -> None:
    """Checks that need no data and no MPI: choices and ranges, each section its own. (Rank counts and data sizes
    are checked at start-up.) Nothing here names an algorithm: what only one algorithm reads lives in its section."""
    from mpisage.models import AUX_VARIANTS, MODELS

    _require_finite(cfg)
    _require(cfg.algorithm in ALGORITHMS, "algorithm", cfg.algorithm, f"one of {', '.join(ALGORITHMS)}")
    _require(cfg.model in MODELS, "model", cfg.model, f"one of {', '.join(MODELS)}")
    _require(cfg.aux_model in AUX_VARIANTS, "aux_model", cfg.aux_model, f"one of {', '.join(AUX_VARIANTS)}")
    _require(cfg.num_clients is None or cfg.num_clients >= 1, "num_clients", cfg.num_clients,
             "must be >= 1, or null for one client per client rank")
    for key in ("rounds", "batch_size", "local_epochs"):
        _require(getattr(cfg, key) >= 1, key, getattr(cfg, key), "must be >= 1")
    _require(cfg.comm_threshold_mb > 0, "comm_threshold_mb", cfg.comm_threshold_mb, "must be > 0")
    _require(bool(cfg.run_dir), "run_dir", cfg.run_dir, "must be a directory path")
    for section in cfg.sections():
        section.validate()


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
