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
from free_dfml.common.limits import MAX_PACKAGE_BYTES

if TYPE_CHECKING:
    from free_dfml.server.state import StateDir
    from free_dfml.server.zoo import Zoo


@dataclass
class ServerSettings:
    state_dir: str = "free-server-state"
    poll_interval: float = 0.5
    status_every: float = 1.0
    checkpoint_every: int = 20
    min_models: int = 1                 # models in the zoo before FREE starts training
    max_payload_bytes: int = MAX_PACKAGE_BYTES
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
    """``free-server start``'s settings: the config file's (``load_config_file``), then the command
    line's (``cli``, None: not given); a one-line ``CliError`` for an unknown key or a bad value."""
    names = {f.name for f in fields(ServerSettings)}
    kw: dict[str, Any] = {}
    free = dict(config.get("free") or {})
    for k, v in config.items():
        if k == "free":
            continue
        key = k.replace("-", "_")
        if key not in names or key in ("state_dir", "supervisor_pid"):
            raise CliError(f"unknown setting {k!r} in the config file")
        kw[key] = v
    if "free_config" in kw:
        free = {**dict(kw.pop("free_config")), **free}
    for k, v in cli.items():
        if v is not None:
            kw[k] = v
    try:
        s = ServerSettings(state_dir=str(state.root), free_config=free, **kw)
    except TypeError as e:
        raise CliError(f"bad settings: {e}") from None
    if not isinstance(s.require_dp, bool):
        raise CliError(f"require-dp must be true or false, got {s.require_dp!r}")
    if isinstance(s.max_epsilon, bool) or not isinstance(s.max_epsilon, (int, float)) or not s.max_epsilon >= 0:
        raise CliError(f"max-epsilon must be a number >= 0 (0: no bound), got {s.max_epsilon!r}")
    # validate the FREE config early (the preset name and the overrides)
    try:
        from free_dfml.common.presets import free_config
        free_config(s.preset, **s.free_config)
    except (TypeError, ValueError, KeyError) as e:
        raise CliError(f"bad FREE config: {e}") from None
    return s
