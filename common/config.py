"""Typed run configuration: one frozen dataclass per app, built once from ``run_config``.

``run_config`` is ``[tool.flwr.app.config]`` plus ``--run-config`` overrides. Keys are spelled with
hyphens (``num-rounds``); fields with underscores (``num_rounds``). Both apps receive the same
run config, so a key is known when either app declares it; a key neither declares, or one an app
needs but is missing, raises with the key's name. Nothing deeper than the app reads
``run_config[...]``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from common.errors import ConfigError
from common.evaluation import THRESHOLD_METHODS
from common.subgroups import SubgroupSpec
from common.tasks import task_class
from common.tasks.base import ModelConfig

ConfigT = TypeVar("ConfigT")


#: Strategies whose sites keep their own normalisation layers (FedBN; ``client.app``).
LOCAL_NORMALISATION_STRATEGIES = frozenset({"fedbn"})
#: What a site may send after training (``update-compression``; ``common.compression``).
UpdateCompression = Literal["none", "fp16", "int8"]
UPDATE_COMPRESSIONS: tuple[str, ...] = get_args(UpdateCompression)
#: The values of the enumerated keys; a run config holding another value is refused by name.
FinalModel = Literal["best", "last"]
Optimizer = Literal["adamw", "sgd"]
LRSchedule = Literal["cosine", "cyclic", "constant"]
ClassBalancing = Literal["weighted-loss", "sampler", "none"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: How the final evaluation measures each case's uncertainty (common.uncertainty; issue 19).
Uncertainty = Literal["mc-dropout", "entropy"]
#: Set by ``radfl simulate`` for its simulated sites: the folder holding ``site-0``,
#: ``site-1``, ... (unset: each site is generated in memory).
SIMULATION_DATA_ENV = "RADFL_SIMULATION_DATA"
#: Strategies update-level DP (``dp-update-noise-multiplier``) composes with: their aggregate
#: is the plain mean the noise is calibrated to (DP-FedAvg; ``server.strategies.UpdateDP``).
UPDATE_DP_STRATEGIES = ("fedavg", "fedprox", "fedbn")
#: The ServerApp logs this, then the MLflow run id, once the run has ended in MLflow: all that
#: is left then is Flower stopping its runtime, which ``radfl simulate`` does not wait for.
RUN_FINISHED_LOG = "[radfl] finished; MLflow run"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The coordinator's ServerApp configuration."""

    task: str
    model: str
    spatial_dims: int
    image_size: int
    num_classes: int
    seed: int
    strategy: str
    num_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_sites: int
    proximal_mu: float
    server_learning_rate: float
    round_timeout_s: float
    start_timeout_s: float
    min_replies: int
    max_update_norm_ratio: float
    max_num_examples: int
    max_site_share: float
    max_aggregate_norm_ratio: float
    site_registry: str
    byzantine_sites: int
    checkpoint_dir: str
    resume: bool
    experiment_name: str
    run_key: str
    subgroups: str
    age_bands: str
    min_cell_size: int
    threshold_method: str
    target_sensitivity: float
    confidence_level: float
    final_model: FinalModel
    leave_out: str
    cross_site: bool
    dp_noise_multiplier: float
    dp_delta: float
    dp_update_noise_multiplier: float
    dp_update_clip_norm: float
    dp_update_epsilon: float
    # Secure aggregation (SecAgg+; server/secagg.py, which checks these keys)
    secure_aggregation: bool
    secagg_num_shares: float
    secagg_reconstruction_threshold: float
    secagg_clipping_range: float
    secagg_timeout_s: float
    # Transfer learning and snapshot ensembles (issue 20; server/transfer.py, server/snapshots.py)
    initial_weights: str
    initial_weights_sha256: str
    snapshot_models: int
    # The sites' uncertainty method, carried by the registered model for radfl predict
    uncertainty: Uncertainty

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.of_run(self)

    @property
    def update_private(self) -> bool:
        """Whether updates get site-level DP (``dp-update-noise-multiplier > 0``)."""
        return self.dp_update_noise_multiplier > 0

    @property
    def private_network(self) -> bool:
        """Whether sites train the GroupNorm network of ``common.privacy.private_model``."""
        return self.dp_noise_multiplier > 0 or self.update_private

    @property
    def subgroup_spec(self) -> SubgroupSpec:
        return SubgroupSpec.parse(self.subgroups, self.age_bands, self.min_cell_size)

    @property
    def left_out_sites(self) -> tuple[str, ...]:
        """Sites named by ``leave-out``: evaluated every round, never trained on."""
        return tuple(name.strip() for name in self.leave_out.split(",") if name.strip())

    def __post_init__(self) -> None:
        _check_choice("threshold-method", self.threshold_method, THRESHOLD_METHODS)
        _check_choice("final-model", self.final_model, get_args(FinalModel))
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError(
                f"run-config key target-sensitivity must lie in (0, 1], "
                f"got {self.target_sensitivity}"
            )
        if not 0.5 <= self.confidence_level < 1.0:
            raise ConfigError(
                f"run-config key confidence-level must lie in [0.5, 1), got {self.confidence_level}"
            )
        self.subgroup_spec  # noqa: B018 - validates subgroups, age-bands and min-cell-size
        if self.min_replies < 1:
            raise ConfigError(f"run-config key min-replies must be >= 1, got {self.min_replies}")
        if self.max_update_norm_ratio < 0 or self.max_num_examples < 0:
            raise ConfigError(
                "run-config keys max-update-norm-ratio and max-num-examples must be >= 0 "
                "(0 turns the check off)"
            )
        if not 0.0 < self.max_site_share <= 1.0:
            raise ConfigError(
                f"run-config key max-site-share must lie in (0, 1] (1 turns the cap off), "
                f"got {self.max_site_share}"
            )
        if self.max_aggregate_norm_ratio < 0:
            raise ConfigError(
                "run-config key max-aggregate-norm-ratio must be >= 0 (0: finiteness only), "
                f"got {self.max_aggregate_norm_ratio}"
            )
        self._check_update_dp()
        if self.snapshot_models < 0:
            raise ConfigError(
                f"run-config key snapshot-models must be >= 0 (0: off), got {self.snapshot_models}"
            )
        if self.initial_weights_sha256 and not self.initial_weights:
            raise ConfigError(
                "run-config key initial-weights-sha256 is set without initial-weights"
            )

    def _check_update_dp(self) -> None:
        """Refuse, by key, what would break update-level DP's guarantee (README, "Update-level
        differential privacy")."""
        if self.dp_update_noise_multiplier < 0 or self.dp_update_epsilon < 0:
            raise ConfigError(
                "run-config keys dp-update-noise-multiplier and dp-update-epsilon must be >= 0"
            )
        _check_positive("dp-update-clip-norm", self.dp_update_clip_norm)
        if not self.update_private:
            if self.dp_update_epsilon > 0:
                raise ConfigError(
                    "run-config key dp-update-epsilon is a budget for update-level DP: it needs "
                    "dp-update-noise-multiplier > 0"
                )
            return
        if self.strategy not in UPDATE_DP_STRATEGIES:
            raise ConfigError(
                f"run-config key strategy = {self.strategy!r} cannot be combined with "
                f"dp-update-noise-multiplier > 0: the noise is calibrated to the plain mean of "
                f"the clipped updates (DP-FedAvg), which a server optimiser's step or a robust "
                f"aggregate is not; use one of {', '.join(UPDATE_DP_STRATEGIES)}"
            )
        if self.cross_site:
            raise ConfigError(
                "run-config key cross-site = true cannot be combined with "
                "dp-update-noise-multiplier > 0: each site would send a model trained on its "
                "data alone, without clipping or noise"
            )
        if self.left_out_sites and self.fraction_train < 1.0:
            raise ConfigError(
                "run-config key leave-out cannot be combined with fraction-train < 1 and "
                "dp-update-noise-multiplier > 0: Flower samples among all nodes, so the number "
                "of training sites per round, which the noise is calibrated to, would vary"
            )


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """A site ClientApp's training configuration (site facts come from ``node_config``)."""

    task: str
    model: str
    spatial_dims: int
    image_size: int
    num_classes: int
    seed: int
    local_epochs: int
    batch_size: int
    optimizer: Optimizer
    learning_rate: float
    weight_decay: float
    lr_schedule: LRSchedule
    early_stopping_patience: int
    class_balancing: ClassBalancing
    augment: bool
    precision: Precision
    synthetic_samples_per_site: int
    # Synthetic site that gets a corner marker going with the label (-1: none; issue 19)
    synthetic_shortcut_site: int
    uncertainty: Uncertainty
    validation_fraction: float
    test_fraction: float
    subgroups: str
    age_bands: str
    min_cell_size: int
    update_compression: UpdateCompression
    dp_noise_multiplier: float
    dp_max_grad_norm: float
    dp_delta: float
    dp_epsilon: float
    dp_update_noise_multiplier: float
    dp_update_clip_norm: float
    # A site's own bound on its update under secure aggregation (client/secagg.py)
    secagg_max_update_norm_ratio: float
    # The aggregation strategy: FedBN's sites keep their own normalisation layers (client.app)
    strategy: str
    # Freezing schedule of transfer learning (issue 20; client/trainer.py)
    freeze_layers: str
    freeze_rounds: int
    unfreeze_lr_factor: float
    # Pseudo-labels for unlabelled studies (client.pseudo_labels): off at 0
    pseudo_label_threshold: float
    pseudo_label_start_round: int

    @property
    def pseudo_labelling(self) -> bool:
        """Whether unlabelled studies are pseudo-labelled (``pseudo-label-threshold > 0``);
        without it a site with unlabelled rows refuses to train, naming them."""
        return self.pseudo_label_threshold > 0

    @property
    def keeps_local_normalisation(self) -> bool:
        """Whether this site keeps its own normalisation layers (FedBN)."""
        return self.strategy in LOCAL_NORMALISATION_STRATEGIES

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.of_run(self)

    @property
    def private(self) -> bool:
        """Whether the site trains with DP-SGD (``dp-noise-multiplier > 0``)."""
        return self.dp_noise_multiplier > 0

    @property
    def update_private(self) -> bool:
        """Whether the site's update is clipped for update-level DP."""
        return self.dp_update_noise_multiplier > 0

    @property
    def private_network(self) -> bool:
        """Whether the site trains the GroupNorm network of ``common.privacy.private_model``:
        DP-SGD needs it, and update-level DP too (BatchNorm's integer batch counters cannot be
        scaled by the clipping, and its running statistics would spend the clipping norm)."""
        return self.private or self.update_private

    @property
    def subgroup_spec(self) -> SubgroupSpec:
        return SubgroupSpec.parse(self.subgroups, self.age_bands, self.min_cell_size)

    def __post_init__(self) -> None:
        _check_choice("update-compression", self.update_compression, UPDATE_COMPRESSIONS)
        _check_choice("optimizer", self.optimizer, get_args(Optimizer))
        _check_choice("lr-schedule", self.lr_schedule, get_args(LRSchedule))
        _check_choice("class-balancing", self.class_balancing, get_args(ClassBalancing))
        _check_choice("precision", self.precision, get_args(Precision))
        _check_positive("local-epochs", self.local_epochs)
        if self.batch_size == 0:  # the task's own (``Task.default_batch_size``)
            object.__setattr__(self, "batch_size", task_class(self.task).default_batch_size)
        _check_positive("batch-size", self.batch_size)
        _check_positive("learning-rate", self.learning_rate)
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(
                f"validation-fraction must lie in (0, 1), got {self.validation_fraction}"
            )
        if not 0.0 <= self.test_fraction < 1.0 - self.validation_fraction:
            raise ConfigError(
                f"test-fraction must lie in [0, 1 - validation-fraction), got {self.test_fraction}"
            )
        if self.dp_noise_multiplier < 0 or self.dp_epsilon < 0:
            raise ConfigError("run-config keys dp-noise-multiplier and dp-epsilon must be >= 0")
        _check_positive("dp-max-grad-norm", self.dp_max_grad_norm)
        if not 0.0 < self.dp_delta < 1.0:
            raise ConfigError(f"run-config key dp-delta must lie in (0, 1), got {self.dp_delta}")
        if self.dp_update_noise_multiplier < 0:
            raise ConfigError("run-config key dp-update-noise-multiplier must be >= 0")
        _check_positive("dp-update-clip-norm", self.dp_update_clip_norm)
        if self.update_private and self.update_compression != "none":
            raise ConfigError(
                f"run-config key update-compression = {self.update_compression!r} cannot be "
                "combined with dp-update-noise-multiplier > 0: compression changes the update "
                "after it is clipped (int8's error feedback carries what it dropped into later "
                "rounds), so the update sent is not bounded by dp-update-clip-norm"
            )
        self._check_freezing()
        if self.pseudo_labelling and not 0.5 < self.pseudo_label_threshold < 1.0:
            raise ConfigError(
                "run-config key pseudo-label-threshold must be 0 (off) or lie in (0.5, 1), got "
                f"{self.pseudo_label_threshold}"
            )
        _check_positive("pseudo-label-start-round", self.pseudo_label_start_round)
        if self.pseudo_labelling and not task_class(self.task).label_is_target:
            raise ConfigError(
                f"run-config key pseudo-label-threshold > 0 needs a task whose targets are "
                f"image labels (classification, multilabel); task {self.task} has none"
            )
        if self.private and self.class_balancing == "sampler":
            raise ConfigError(
                "dp-noise-multiplier > 0 samples each batch by Poisson sampling: it cannot be "
                'combined with class-balancing = "sampler"; use "weighted-loss"'
            )

    def _check_freezing(self) -> None:
        if self.freeze_rounds < 0:
            raise ConfigError(
                f"run-config key freeze-rounds must be >= 0, got {self.freeze_rounds}"
            )
        if self.freeze_rounds > 0 and not self.freeze_layers.strip():
            raise ConfigError("run-config key freeze-rounds > 0 needs freeze-layers (patterns)")
        _check_positive("unfreeze-lr-factor", self.unfreeze_lr_factor)


APP_CONFIGS: tuple[type, ...] = (ServerConfig, ClientConfig)
#: Keys no app reads: the site's launcher checks ``app-signature`` (common/signing.py) before
#: any app code runs.
DEPLOYMENT_KEYS = frozenset({"app-signature"})


def known_keys() -> set[str]:
    """Every run-config key some app declares, hyphenated, and the deployment's own."""
    return {_key(f.name) for cls in APP_CONFIGS for f in dataclasses.fields(cls)} | DEPLOYMENT_KEYS


def from_run_config(cls: type[ConfigT], run_config: Mapping[str, Any]) -> ConfigT:
    """Build the app's frozen config from a Flower ``run_config``.

    Raises
    ------
    ConfigError
        If a key is unknown to every app, a key ``cls`` needs is missing, or a value has the
        wrong type.
    """
    unknown = sorted(set(run_config) - known_keys())
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = _key(f.name)
        if key not in run_config:
            raise ConfigError(f"missing run-config key: {key}")
        values[f.name] = _coerce(key, run_config[key], hints[f.name])
    return cls(**values)


def load_toml_config(path: Path) -> dict[str, Any]:
    """Read run-config overrides from a TOML file (top-level keys, or a ``[config]`` table)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    table = data.get("config", data)
    unknown = sorted(set(table) - known_keys())
    if unknown:
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(unknown)}")
    return dict(table)


def default_run_config() -> dict[str, Any]:
    """The defaults of ``[tool.flwr.app.config]`` in the project's pyproject.toml."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())
    return dict(data["tool"]["flwr"]["app"]["config"])


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run-config key {key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"run-config key {key} must be an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"run-config key {key} must be a number, got {value!r}")
        return float(value)
    if get_origin(annotation) is Literal:
        if not isinstance(value, str):
            raise ConfigError(f"run-config key {key} must be a string, got {value!r}")
        _check_choice(key, value, get_args(annotation))
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"run-config key {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {annotation!r} for {key}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"run-config key {key} must be one of {', '.join(choices)}; got {value!r}"
        )


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"run-config key {key} must be positive, got {value}")


# --- run-config text, as `--set KEY=VALUE` takes it and `flwr run --run-config` wants it


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as run-config values (numbers, booleans and strings)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def format_run_config(values: Mapping[str, Any]) -> str:
    """``--run-config`` syntax: space-separated TOML ``key=value`` pairs."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, str):
            parts.append(f"{key}={_toml_string(value)}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")
