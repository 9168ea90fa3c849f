"""The FREE server's settings: one dataclass, carried as the Flower run config in deployment
(``free-server start`` writes it into the app's pyproject; keys with dashes) and passed in directly
in simulation (``free-sim`` writes the same run config). ``settings_from`` reads ``free-server start``'s
config file and command line into it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from free_dfml.common.cli import CliError
from free_dfml.common.config import ConfigError, show_value, type_problem
from free_dfml.common.limits import RANGES, SETTING, Limits

if TYPE_CHECKING:
    from free_dfml.server.state import StateDir
    from free_dfml.server.zoo import Zoo


@dataclass
class ServerSettings:
    state_dir: str = "free-server-state"
    poll_interval: float = 0.5
    status_every: float = 1.0
    lost_after: float = 60.0            # deployment: a ServerApp with no progress this long is resubmitted (0: never)
    checkpoint_every: int = 20
    min_models: int = 1                 # models in the zoo before FREE starts training
    # admission caps (common/limits.py, docs/security.md): a package over one is rejected, naming it
    max_payload_bytes: int = Limits.package_bytes       # a package (wire payload), bytes
    max_input_side: int = Limits.input_side             # input_shape H = W, pixels
    max_parameters: int = Limits.parameters             # stored values
    max_forward_macs: int = Limits.forward_macs         # multiply-accumulates of one image's forward pass
    max_label_bytes: int = Limits.label_bytes           # one class label, UTF-8 bytes
    max_training_bytes: int = Limits.training_bytes     # the free-form `training` field, serialised
    max_json_depth: int = Limits.json_depth             # nesting of the metadata document
    max_reason_bytes: int = Limits.reason_bytes         # a rejection reason, wherever stored or sent
    device: str = "auto"
    train: bool = True
    preset: str = "quick"               # study preset whose FREE settings are used (common/presets.py)
    free_config: dict[str, Any] = field(default_factory=dict)   # FreeConfig overrides
    max_iterations: int = 0             # 0: train as long as the server runs
    expected_models: int = 0            # simulation: replies to wait for before finishing
    finish_when_done: bool = False      # simulation: return once expected models + max_iterations are done
    collect_timeout: float = 0.0        # simulation: stop waiting for replies after this (0: forever)
    supervisor_pid: int = 0             # deployment: stop when this process is gone
    eval_data: str = ""                 # optional dataset for in-training evaluation (eval_every)
    eval_split: str = "val"
    eval_episodes: int = 50
    threads: int = 0                    # torch threads for training (0: leave as is)
    require_dp: bool = False            # refuse models without DP metadata (server/policy.py)
    max_epsilon: float = 0.0            # refuse models with DP epsilon above this (0: no bound)
    # the data-free screen (server/screen.py; thresholds = ScreenConfig's defaults, docs/security.md)
    screen: bool = False                # screen every model before training uses it; quarantine failures
    screen_max_inversion_ce: float = 0.8
    screen_max_bn_mismatch: float = 2.0
    screen_min_noise_match: float = 0.1

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> "ServerSettings":
        kw: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in rc:
                continue
            v = rc[key]
            if f.name == "free_config":
                v = json.loads(v) if isinstance(v, str) and v.strip() else {}
            kw[f.name] = v
        s = cls(**kw)
        s.max_payload_bytes = int(s.max_payload_bytes)
        return s

    def limits(self) -> Limits:
        """The admission caps these settings give (what the ingest service checks packages against)."""
        return Limits(**{f: getattr(self, SETTING[f].replace("-", "_")) for f in RANGES})

    def validate(self) -> None:
        """Every setting's type and range; a :class:`ConfigError` naming the first bad one (its key
        with dashes, as in the config file)."""
        for f in fields(self):
            v, key = getattr(self, f.name), f.name.replace("_", "-")
            if f.name == "free_config":       # its values: FreeConfig's own checks
                if not isinstance(v, dict):
                    raise ConfigError("free", v, "a table of FREE settings")
                continue
            rule = _RANGE.get(f.name)
            if type_problem(f.default, v) or (rule and not rule[0](v)):
                words = rule[1] if rule and rule[1].startswith("one of") else \
                    f"{_KIND[type(f.default)]} {rule[1] if rule else ''}".strip()
                raise ConfigError(key, v, words)

    def to_run_config(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "free_config":
                v = json.dumps(v, sort_keys=True)
            out[f.name.replace("_", "-")] = v
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
# each setting's range (after its type): a test and the words for it
_RANGE: dict[str, tuple[Any, str]] = {
    "poll_interval": (lambda v: v > 0, "> 0"), "status_every": (lambda v: v > 0, "> 0"),
    "lost_after": (lambda v: v == 0 or v >= 5, ">= 5 (0: never)"),
    "checkpoint_every": (lambda v: v >= 0, ">= 0 (0: only on stop)"), "min_models": (lambda v: v >= 1, ">= 1"),
    "device": (lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
               "one of auto, cpu, cuda, cuda:N"),
    "max_iterations": (lambda v: v >= 0, ">= 0 (0: no end)"), "expected_models": (lambda v: v >= 0, ">= 0"),
    "collect_timeout": (lambda v: v >= 0, ">= 0 (0: wait for ever)"), "supervisor_pid": (lambda v: v >= 0, ">= 0"),
    "eval_split": (lambda v: bool(v), "(not empty)"), "eval_episodes": (lambda v: v >= 1, ">= 1"),
    "threads": (lambda v: v >= 0, ">= 0 (0: torch's default)"),
    "max_epsilon": (lambda v: v >= 0, ">= 0 (0: no bound)"),
    **{SETTING[f].replace("-", "_"): ((lambda v, lo=lo, hi=hi: lo <= v <= hi), f"in {lo}..{hi}")
       for f, (lo, hi) in RANGES.items()},
}


def free_config_for(settings: ServerSettings, zoo: "Zoo"):
    """The FreeConfig: the preset's + overrides; image size/channels from the first zoo model if not set."""
    from free_dfml.common.config import nest
    from free_dfml.common.presets import free_config
    over = nest(dict(settings.free_config))
    ids = zoo.ids()
    if ids:
        c, h, _ = zoo.meta(ids[0]).input_shape
        learner = over.setdefault("learner", {})
        learner.setdefault("image_size", h)
        learner.setdefault("channels", c)
    return free_config(settings.preset, **over)


# ------------------------------------------------------------------ config file + command line

def load_config_file(path: Path) -> dict[str, Any]:
    """A TOML or JSON file: server settings (dashes or underscores) + a [free] table of FreeConfig overrides."""
    if not path.is_file():
        raise CliError(f"no such config file: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix == ".json":
            doc = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:   # Python 3.10
                import tomli as tomllib
            doc = tomllib.loads(text)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"config file {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise CliError(f"config file {path} must hold a table/object")
    return doc


def settings_from(state: "StateDir", config: dict[str, Any], **cli: Any) -> ServerSettings:
    """``free-server start``'s settings: the config file's (``load_config_file``: server settings at
    its top level or in a ``[server]`` table, FREE overrides in ``[free]``), then the command line's
    (``cli``, None: not given). Every value is checked by type and range here, so a mistyped one
    fails at once: a one-line ``CliError`` naming the key, e.g. ``config error: [server] min-models =
    "lots": expected an integer >= 1`` (a flag is named ``--min-models``)."""
    names = {f.name for f in fields(ServerSettings)}
    kw: dict[str, Any] = {}
    where: dict[str, str] = {}
    free = config.get("free") or {}
    if not isinstance(free, dict):
        raise CliError(f"config error: free = {show_value(free)}: expected a [free] table of FREE settings")
    free = dict(free)
    table = config.get("server") or {}
    if not isinstance(table, dict):
        raise CliError(f"config error: server = {show_value(table)}: expected a [server] table of settings")
    top = [(k, v) for k, v in config.items() if k not in ("free", "server")]
    for k, v in [*top, *table.items()]:
        key = k.replace("-", "_")
        if key not in names or key in ("state_dir", "supervisor_pid"):
            raise CliError(f"unknown setting {k!r} in the config file")
        if key in kw:
            raise CliError(f"config error: [server] {k} is given twice in the config file")
        kw[key], where[key] = v, f"[server] {k}"
    if "free_config" in kw:
        extra = kw.pop("free_config")
        if not isinstance(extra, dict):
            raise CliError(f"config error: {where['free_config']} = {show_value(extra)}: expected a table")
        free = {**dict(extra), **free}
    for k, v in cli.items():
        if v is not None:
            kw[k], where[k] = v, "--" + k.replace("_", "-")
    try:
        s = ServerSettings(state_dir=str(state.root), free_config=free, **kw)
    except TypeError as e:
        raise CliError(f"bad settings: {e}") from None
    try:
        s.validate()
    except ConfigError as e:
        label = where.get(e.key.replace("-", "_"), e.key)
        raise CliError(f"config error: {label} = {show_value(e.value)}: expected {e.expected}") from None
    from free_dfml.common.presets import canonical, free_config
    try:
        canonical(s.preset)
    except ValueError as e:
        raise CliError(f"config error: {where.get('preset', 'preset')}: {e}") from None
    # the FREE config now (the preset's + the overrides), not when training starts
    try:
        free_config(s.preset, **s.free_config)
    except ConfigError as e:
        raise CliError(f"config error: [free] {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise CliError(f"config error: [free] {e}") from None
    return s
