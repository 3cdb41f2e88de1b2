"""Run-config keys of the Flower app and how they map onto SafeLM's typed :class:`Config`.

Flower hands every node the flat ``context.run_config`` from ``[tool.flwr.app.config]`` in
pyproject.toml (overridable with ``flwr run . --run-config "key=value ..."``). Two kinds of
keys live there:

* dotted keys ``section.field`` (``train.lr``, ``model.n_layer``, ``data.group_cols``) are
  SafeLM config fields, parsed by the field's declared type exactly like ``safelm train --set
  section.field=value`` -- one config tree, one set of checks, no second schema;
* hyphenated keys (``num-server-rounds``, ``strategy``, ...) are federation settings, each
  documented in :data:`FEDERATION_KEYS` below. ``local-epochs`` is the one that lands in the
  SafeLM config (as ``train.epochs`` of each client's Trainer).

``tests/test_federation_settings.py`` keeps pyproject.toml, this table and ``Config`` in sync.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from safelm.config import Config
from safelm.errors import ConfigError, UserError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "trimmed-mean", "krum", "multi-krum", "median")
PARTITIONINGS = ("iid", "dirichlet-label", "dirichlet-group", "natural")
DATASETS = ("sentiment", "stories")
ATTACKS = ("none", "signflip", "scale")
DP_MODES = ("none", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")

# key -> (type, documentation). Defaults live in pyproject.toml only, so there is one place.
FEDERATION_KEYS: dict[str, tuple[type, str]] = {
    "num-server-rounds": (int, "federated rounds to run (total, including resumed ones)"),
    "local-epochs": (int, "epochs each sampled client trains per round; becomes train.epochs "
                          "of the client's safelm Trainer"),
    "strategy": (str, "aggregation: " + " | ".join(STRATEGIES)),
    "fraction-train": (float, "share of connected clients sampled for training each round "
                              "(with dp: the Poisson sampling rate q)"),
    "fraction-evaluate": (float, "share of clients sampled for federated evaluation (0: none)"),
    "min-nodes": (int, "clients that must be connected before a round starts, and the least "
                       "sampled per round"),
    "min-replies": (int, "successful training replies needed to update the global model; a "
                         "round with fewer keeps the previous model"),
    "round-timeout": (float, "seconds the server waits for replies in a round; late or vanished "
                             "clients are dropped from that round"),
    "proximal-mu": (float, "FedProx proximal weight mu (strategy=fedprox)"),
    "server-lr": (float, "FedAdam server learning rate eta (strategy=fedadam)"),
    "server-tau": (float, "FedAdam adaptivity tau (strategy=fedadam)"),
    "trim-beta": (float, "fraction cut at each end per coordinate (strategy=trimmed-mean)"),
    "num-malicious": (int, "clients assumed hostile, f in Krum's score (krum, multi-krum)"),
    "krum-select": (int, "updates Multi-Krum averages (strategy=multi-krum)"),
    "dataset": (str, "bundled corpus generated in-process when data-path is empty: "
                     + " | ".join(DATASETS)),
    "data-path": (str, "a .csv/.jsonl/.txt file every node can read, instead of the bundled "
                       "corpus (a node's node-config data-path overrides it for that node)"),
    "corpus-size": (int, "rows (sentiment) or stories generated for the bundled corpus"),
    "corpus-seed": (int, "seed of the bundled corpus"),
    "partitioning": (str, "how rows are dealt to clients: " + " | ".join(PARTITIONINGS)),
    "alpha": (float, "Dirichlet concentration (small: skewed clients, large: IID-like)"),
    "partition-col": (str, "column for dirichlet-group (default: first of data.group_cols) or "
                           "natural (default: data.user_col)"),
    "partition-seed": (int, "seed of the partitioning"),
    "out-dir": (str, "global run dir the server writes every round (relative paths resolve "
                     "against the ServerApp's working directory, logged at start)"),
    "resume": (bool, "continue the run in out-dir from its last saved round"),
    "client-threads": (int, "torch threads per client; 0: the client's Ray CPU allotment "
                            "(simulation), node-config num-threads, or OMP_NUM_THREADS"),
    "server-threads": (int, "torch threads of the ServerApp process (central evaluation); 1 "
                            "keeps it from fighting co-located clients for cores; 0: torch's "
                            "default"),
    "attack": (str, "hostile-client behaviour for robustness tests: " + " | ".join(ATTACKS)),
    "attack-clients": (str, "comma-separated partition ids that attack, e.g. \"0\" or \"0,3\""),
    "attack-scale": (float, "signflip sends g - s*(w-g), scale sends g + s*(w-g)"),
    "fail-clients": (str, "comma-separated partition ids whose ClientApp raises (fault tests)"),
    "fail-rounds": (str, "comma-separated rounds in which fail-clients raise (empty: all)"),
    "dp": (str, "client-level DP with Flower's wrappers: " + " | ".join(DP_MODES)),
    "dp-noise": (float, "noise multiplier z of the client-level Gaussian mechanism"),
    "dp-clip": (float, "clipping norm of a client update (adaptive: the initial norm)"),
    "dp-delta": (float, "delta at which epsilon is reported"),
    "dp-target-epsilon": (float, "> 0: choose dp-noise so that all rounds spend this epsilon"),
    "dp-clip-quantile": (float, "adaptive clipping: target quantile of unclipped updates"),
    "dp-clip-lr": (float, "adaptive clipping: geometric learning rate of the norm"),
    "dp-count-stddev": (float, "adaptive clipping: noise on the clipped count (0: auto)"),
}


@dataclass
class FedSettings:
    """The federation keys, typed: one field per key of :data:`FEDERATION_KEYS` (the key with
    hyphens as underscores). Built by :func:`parse_run_config`; a test keeps the two in sync."""

    num_server_rounds: int
    local_epochs: int
    strategy: str
    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    min_replies: int
    round_timeout: float
    proximal_mu: float
    server_lr: float
    server_tau: float
    trim_beta: float
    num_malicious: int
    krum_select: int
    dataset: str
    data_path: str
    corpus_size: int
    corpus_seed: int
    partitioning: str
    alpha: float
    partition_col: str
    partition_seed: int
    out_dir: str
    resume: bool
    client_threads: int
    server_threads: int
    attack: str
    attack_clients: str
    attack_scale: float
    fail_clients: str
    fail_rounds: str
    dp: str
    dp_noise: float
    dp_clip: float
    dp_delta: float
    dp_target_epsilon: float
    dp_clip_quantile: float
    dp_clip_lr: float
    dp_count_stddev: float

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> FedSettings:
        """From ``{run-config key: value}`` (every key of FEDERATION_KEYS), each typed."""
        return cls(**{key.replace("-", "_"): _typed(key, values[key], FEDERATION_KEYS[key][0])
                      for key in FEDERATION_KEYS})

    @property
    def values(self) -> dict[str, Any]:
        """``{run-config key: value}``, e.g. to ship the settings as JSON."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def ids(self, key: str) -> set[int]:
        """A comma-separated id list (``attack-clients``, ``fail-rounds``) as a set."""
        text = str(getattr(self, key.replace("-", "_"), "")).strip()
        try:
            return {int(v) for v in text.split(",") if v.strip()}
        except ValueError:
            raise ConfigError(f"run-config {key}={text!r} must be comma-separated integers, "
                              "e.g. \"0,3\"") from None


def _typed(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return text in ("true", "1", "yes", "on")
    elif kind is int and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str:
        return str(value)
    raise ConfigError(f"run-config {key}={value!r} is not a valid {kind.__name__}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"run-config {key}={value!r} is not one of {', '.join(allowed)}")


def parse_run_config(run_config: Mapping[str, Any]) -> tuple[Config, FedSettings]:
    """Split ``context.run_config`` into SafeLM's Config and the federation settings.

    Unknown keys raise a one-line :class:`UserError` (Flower already refuses overrides of keys
    not in pyproject.toml; this also catches a pyproject key that SafeLM does not know).
    """
    cfg = Config()
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        if "." in key:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            cfg.set(f"{key}={text}")
        elif key in FEDERATION_KEYS:
            values[key] = _typed(key, value, FEDERATION_KEYS[key][0])
        else:
            raise ConfigError(f"unknown run-config key {key!r}; known federation keys: "
                              f"{', '.join(sorted(FEDERATION_KEYS))}, or section.field of "
                              "the safelm config")
    missing = sorted(set(FEDERATION_KEYS) - set(values))
    if missing:
        raise ConfigError(f"run-config lacks {', '.join(missing)}; they are defined in "
                          "[tool.flwr.app.config] of pyproject.toml")
    fed = FedSettings.from_values(values)
    cfg.train.epochs = fed.local_epochs
    cfg.validate()
    _validate(fed)
    if cfg.privacy.canaries:
        raise UserError(f"privacy.canaries={cfg.privacy.canaries}: canaries are planted in a "
                        "central run's training split; every federated client would plant the "
                        "same secrets, which the canary audit does not model; set it to 0")
    if cfg.model.init_vectors:
        raise UserError(f"model.init_vectors={cfg.model.init_vectors}: pretrained word vectors "
                        "are not supported in federated training yet; drop model.init_vectors "
                        "(or train a central run with it and pass train.init_from)")
    if cfg.privacy.enabled and fed.dp != "none":
        raise UserError(f"privacy.enabled=true (sample-level DP-SGD on clients) and dp={fed.dp} "
                        "(client-level DP) are both set; choose one")
    return cfg, fed


def _validate(fed: FedSettings) -> None:
    _choice("strategy", fed.strategy, STRATEGIES)
    _choice("partitioning", fed.partitioning, PARTITIONINGS)
    _choice("dataset", fed.dataset, DATASETS)
    _choice("attack", fed.attack, ATTACKS)
    _choice("dp", fed.dp, DP_MODES)
    values = fed.values
    for key in ("num-server-rounds", "local-epochs", "min-nodes", "min-replies"):
        if values[key] < 1:
            raise ConfigError(f"run-config {key}={values[key]} must be >= 1")
    for key in ("fraction-train", "fraction-evaluate"):
        if not 0.0 <= values[key] <= 1.0:
            raise ConfigError(f"run-config {key}={values[key]} must be in [0, 1]")
    if fed.fraction_train == 0.0:
        raise ConfigError("run-config fraction-train=0 trains nothing; use a value in (0, 1]")
    if not 0.0 <= fed.trim_beta < 0.5:
        raise ConfigError(f"run-config trim-beta={fed.trim_beta} must be in [0, 0.5)")
    if fed.alpha <= 0:
        raise ConfigError(f"run-config alpha={fed.alpha} must be > 0")
    if not fed.out_dir:
        raise ConfigError("run-config out-dir is empty; give the folder for the global run dir")
    if fed.dp != "none":
        if fed.strategy not in ("fedavg", "fedprox"):
            raise UserError(f"dp={fed.dp} needs strategy=fedavg or fedprox (client-level DP "
                            f"bounds each client's share of an average); got {fed.strategy}")
        if fed.dp_clip <= 0 or fed.dp_noise < 0 or not 0 < fed.dp_delta < 1:
            raise ConfigError("run-config dp-clip must be > 0, dp-noise >= 0 and dp-delta in "
                              "(0, 1)")
    fed.ids("attack-clients"), fed.ids("fail-clients"), fed.ids("fail-rounds")
