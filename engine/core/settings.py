"""Every environment variable quantdeck reads, in one place: its name, type, default and meaning.

Why one module: each variable used to be read where it was used, with its own idea of "true" and none of a bad
value. Here a flag is true for 1/true/yes/on and false for 0/false/no/off (any case); an empty or unset variable
takes its default; any other value is refused with a SettingsError naming the variable. `table()` is the
documented table of them all.

Only reads come here. A parent still writes variables for its children (QUANTDECK_NODE for a remote worker,
QD_CONVERT_WORKERS for `--workers` children, QUANTDECK_FSYNC for a run's stages), and those read them here.

`settings()` is always current and cheap: it parses again only after one of its variables changed in os.environ
(tests set them per call, a `--workers` child after its imports, and the CPU kernels ask on every call).

The integration tests' hooks into real runs (pause a stage's worker, fail a rank, slow the writes, kill a
calibration) are one variable, QUANTDECK_FAULTS: comma-separated `key=value` pairs (`Faults`), e.g.
`pause_stage=convert,pause_after_units=3`; an unknown key is refused. No numpy, torch or numba here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from engine.core.errors import SettingsError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
FSYNC_ENV = "QUANTDECK_FSYNC"  # written by a run's driver and worker for the stages (engine.runs.durability)


class _Type:
    """How a variable's text becomes its value; `name` is the table's type column. (A plain class: each dataclass
    costs ~0.5 ms at import, on a converter's start.)"""

    __slots__ = ("name", "parse")

    def __init__(self, name: str, parse: Callable[[str, str], Any]):  # parse: (variable, text) -> value
        self.name, self.parse = name, parse


def _flag(var: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in TRUE or v in FALSE:
        return v in TRUE
    raise SettingsError(f"{var}={raw!r} is neither true nor false", at=var,
                        hint=f"true: {', '.join(TRUE)}; false: {', '.join(FALSE)}")


def _number(kind: type, minimum: float = 0) -> Callable[[str, str], Any]:
    def parse(var: str, raw: str) -> Any:
        try:
            v = kind(raw.strip())
        except ValueError:
            v = None
        if v is None or not v >= minimum or not math.isfinite(v):  # NaN and inf too
            raise SettingsError(f"{var}={raw!r} is not a{'n integer' if kind is int else ' number'} >= {minimum:g}",
                                at=var, hint=f"unset {var} for its default")
        return v
    return parse


def _choice(*values: str) -> Callable[[str, str], str]:
    def parse(var: str, raw: str) -> str:
        v = raw.strip().lower()
        if v not in values:
            raise SettingsError(f"{var}={raw!r} is not one of {', '.join(values)}", at=var,
                                hint=f"unset {var} for its default")
        return v
    return parse


FLAG = _Type("bool", _flag)
COUNT = _Type("int >= 0", _number(int))
POSITIVE = _Type("int >= 1", _number(int, 1))
SECONDS = _Type("seconds", _number(float))
GIGABYTES = _Type("GB", _number(float))
TEXT = _Type("text", lambda var, raw: raw)
PATH = _Type("path", lambda var, raw: raw)


def _var(env: str, default: Any, kind: _Type, meaning: str, shown: str | None = None) -> Any:
    """A Settings field read from `env`; `shown` is the table's default where `default` is "decided elsewhere"."""
    return field(default=default, metadata={"env": env, "type": kind, "meaning": meaning, "shown": shown})


@dataclass(frozen=True)
class Faults:
    """Failures and pauses the integration tests inject into real runs (QUANTDECK_FAULTS); none by default."""

    pause_stage: str | None = None  # that stage's worker parks (sleeps until killed) ...
    pause_after_units: int = 0  # ... at its first progress event with done >= this (0: once RUNNING)
    fail_rank: int | None = None  # this rank of several raises before it writes its shards (engine.convert.ranks)
    item_delay_s: float = 0.0  # the converter sleeps this long after each written item
    calibrate_die_after_layer: int | None = None  # calibration exits like kill -9 after this layer


NO_FAULTS = Faults()
_FAULT_TYPES = {"pause_stage": TEXT, "pause_after_units": COUNT, "fail_rank": COUNT, "item_delay_s": SECONDS,
                "calibrate_die_after_layer": COUNT}


def _faults(var: str, raw: str) -> Faults:
    kw: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, eq, value = (s.strip() for s in part.partition("="))
        if key not in _FAULT_TYPES or not eq or not value:
            raise SettingsError(f"{var}: {part!r} is not a known key=value", at=var,
                                hint=f"keys: {', '.join(_FAULT_TYPES)}")
        if key in kw:
            raise SettingsError(f"{var}: {key} given twice", at=var, hint="give each key once")
        kw[key] = _FAULT_TYPES[key].parse(f"{var} {key}", value)
    if "pause_after_units" in kw and "pause_stage" not in kw:
        raise SettingsError(f"{var}: pause_after_units without pause_stage", at=var, hint="name the stage to pause")
    return Faults(**kw)


def fault_spec(**faults: Any) -> str:
    """QUANTDECK_FAULTS's value for these faults (checked: an unknown key or bad value raises), for the tests."""
    spec = ",".join(f"{k}={v}" for k, v in faults.items())
    _faults("QUANTDECK_FAULTS", spec)
    return spec


# The retired test-hook variables: refused rather than silently ignored (a test waiting on a pause would hang).
RETIRED = {"QUANTDECK_TEST_PAUSE_STAGE": "pause_stage", "QUANTDECK_TEST_PAUSE_AFTER_UNITS": "pause_after_units",
           "QUANTDECK_TEST_FAIL_RANK": "fail_rank", "QUANTDECK_TEST_ITEM_DELAY_S": "item_delay_s",
           "QUANTDECK_CALIBRATE_DIE_AFTER_LAYER": "calibrate_die_after_layer"}


@dataclass(frozen=True)
class Settings:
    """What the environment asks of quantdeck. Build it with `settings()`; fields are in the table's order."""

    home: str | None = _var("QUANTDECK_HOME", None, PATH, "where the run store (store.db) and keymap.toml live",
                            "the user data dir's `quantdeck`")
    workdir: str = _var("QUANTDECK_WORKDIR", "./quantdeck-work", PATH, "where runs are looked up besides the store")
    debug: bool = _var("QUANTDECK_DEBUG", False, FLAG, "the CLI shows tracebacks for quantdeck's own errors too")
    fleet: str = _var("QUANTDECK_FLEET", "", _Type("replay", _choice("replay")),
                      "`replay`: the console replays recorded nvidia-smi output of a 4×8-GPU fleet", "unset: live")
    fleet_interval: float = _var("QUANTDECK_FLEET_INTERVAL", 1.0, SECONDS, "seconds between replayed fleet samples")
    kernels: str = _var("QUANTDECK_KERNELS", "", _Type("c, numba", _choice("c", "numba")),
                        "CPU kernels: `c` refuses to fall back to numba, `numba` skips the C ones",
                        "unset: `c` where it builds")
    kernel_threads: int = _var("QUANTDECK_KERNEL_THREADS", 0, COUNT,
                               "threads of one parallel CPU kernel call (0: every usable core)")
    kernel_chunk: int = _var("QUANTDECK_KERNEL_CHUNK", 8, COUNT,
                             "rows per chunk of a parallel numba loop (0: numba's static shares)")
    no_triton: bool = _var("QUANTDECK_NO_TRITON", False, FLAG, "CUDA conversion without the fused Triton kernel")
    eager_experts: bool = _var("QUANTDECK_EAGER_EXPERTS", False, FLAG,
                               "calibration runs the experts' own forward, not the one-sync one")
    layer_budget_gb: float | None = _var("QUANTDECK_LAYER_BUDGET_GB", None, GIGABYTES,
                                         "device memory (10^9 bytes) a calibrated layer's build may hold beside the "
                                         "next layer's stored bytes; a layer that needs more keeps its routed "
                                         "experts as stored and decodes them as they run",
                                         "90 % of a GPU's free memory; no limit on a CPU")
    readers: int = _var("QUANTDECK_READERS", 0, COUNT, "converter reader threads (0: chosen from the cores)")
    computers: int = _var("QUANTDECK_COMPUTERS", 0, COUNT, "converter compute threads (0: chosen from the cores)")
    writers: int = _var("QUANTDECK_WRITERS", 0, COUNT, "converter writer threads (0: chosen from the cores)")
    validate_nice: int = _var("QUANTDECK_VALIDATE_NICE", 10, COUNT,
                              "nice added to validate's threads while its decoder-block check runs in another "
                              "process beside them, which on a few cores ends validate (0: none)")
    convert_workers: int = _var("QD_CONVERT_WORKERS", 1, POSITIVE,
                                "processes of a `--workers` conversion (set by the parent for its children)")
    fsync: bool = _var(FSYNC_ENV, False, FLAG,
                       "durable shards: fsynced before the manifest records them",
                       "`false` (a run's stages on other hosts: `true`)")
    boot_id: str | None = _var("QUANTDECK_BOOT_ID", None, TEXT,
                               "this machine's boot: a run re-runs a stage done before a reboot whose writes were "
                               "not yet synced", "`/proc/sys/kernel/random/boot_id`")
    direct_io: bool = _var("QUANTDECK_DIRECT_IO", True, FLAG,
                           "durable shards are written with O_DIRECT (false: through the page cache)")
    no_readahead: bool = _var("QUANTDECK_NO_READAHEAD", False, FLAG,
                              "no reading of the source ahead at a converter's start")
    readahead: str = _var("QUANTDECK_READAHEAD", "", _Type("always", _choice("always")),
                          "`always`: read ahead even beside cold imports (measurements)",
                          "unset: not beside cold imports")
    readahead_idle: bool = _var("QUANTDECK_READAHEAD_IDLE", False, FLAG, "read-ahead threads at idle I/O priority")
    readahead_threads: int | None = _var("QUANTDECK_READAHEAD_THREADS", None, POSITIVE, "read-ahead threads", "`4`")
    start_files: str | None = _var("QUANTDECK_START_FILES", None, PATH,
                                   "where the lists of the files a converter's start reads are kept",
                                   "`start-files` in the user cache dir's `quantdeck`")
    no_cuda_preinit: bool = _var("QUANTDECK_NO_CUDA_PREINIT", False, FLAG,
                                 "no early CUDA context on a thread at a converter's start")
    native_cache: str | None = _var("QUANTDECK_NATIVE_CACHE", None, PATH, "where the built C kernels are kept",
                                    "`native` in the user cache dir's `quantdeck`")
    node: str | None = _var("QUANTDECK_NODE", None, TEXT,
                            "this worker's node name (set by the remote launcher)", "the host name")
    collective_timeout_s: float | None = _var("QUANTDECK_COLLECTIVE_TIMEOUT_S", None, SECONDS,
                                              "timeout of a stage's collectives (a run's worker sets it from "
                                              "`[run] stall_after_s`; 0: torch's)", "torch's")
    rank_timeout_s: float = _var("QUANTDECK_RANK_TIMEOUT_S", 12 * 3600.0, SECONDS,
                                 "how long a rank waits for the others at a step of a shared conversion",
                                 "`43200` (12 h)")
    ssh_config: str | None = _var("QUANTDECK_SSH_CONFIG", None, PATH, "the ssh config a cluster's hosts resolve "
                                  "through (a recipe's `ssh_config` wins)", "`~/.ssh/config`")
    known_hosts: str | None = _var("QUANTDECK_KNOWN_HOSTS", None, PATH, "the known_hosts file (a recipe's wins)",
                                   "`~/.ssh/known_hosts`")
    remote_cwd: str | None = _var("QUANTDECK_REMOTE_CWD", None, PATH,
                                  "where remote commands run (a recipe's `cwd` wins)", "the remote home")
    master_addr: str | None = _var("QUANTDECK_MASTER_ADDR", None, TEXT,
                                   "torchrun's master address as the nodes see the head (a recipe's wins)",
                                   "the head's HostName")
    faults: Faults = _var("QUANTDECK_FAULTS", NO_FAULTS, _Type("key=value,…", _faults),  # noqa: RUF009 (a Field)
                          "test hooks: " + ", ".join(_FAULT_TYPES) + " (engine.core.settings.Faults)", "none")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Parse every variable of `env`; raises SettingsError naming the first bad one."""
        for old, key in RETIRED.items():
            if env.get(old):
                raise SettingsError(f"{old} is no longer read", at=old, hint=f"use QUANTDECK_FAULTS={key}=…")
        kw = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is not None and raw.strip():
                kw[f.name] = f.metadata["type"].parse(f.metadata["env"], raw)
        return cls(**kw)


NAMES = tuple(f.metadata["env"] for f in fields(Settings))
_WATCHED = NAMES + tuple(RETIRED)
try:  # os.environ's own dict: reading it is ~30× cheaper than os.environ.get for unset names (an exception each)
    _KEYS: tuple | None = tuple(map(os.environ.encodekey, _WATCHED))  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - not CPython's os.environ
    _KEYS = None
_last: tuple[tuple, Settings] | None = None


def _snapshot() -> tuple:
    data = getattr(os.environ, "_data", None)
    if _KEYS is None or not isinstance(data, dict):
        return tuple(map(os.environ.get, _WATCHED))
    return tuple(map(data.get, _KEYS))


def settings() -> Settings:
    """The settings os.environ holds now (parsed again only after one of their variables changed)."""
    global _last
    key = _snapshot()
    last = _last
    if last is None or last[0] != key:
        last = _last = (key, Settings.from_env(os.environ))
    return last[1]


def table() -> str:
    """Every variable as a markdown table: name, type, default, meaning."""
    rows = ["| Variable | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    for f in fields(Settings):
        m = f.metadata
        shown = m["shown"] or "`{}`".format(str(f.default).lower() if isinstance(f.default, bool) else
                                            f"{f.default:g}" if isinstance(f.default, float) else f.default)
        rows.append(f"| `{m['env']}` | {m['type'].name} | {shown} | {m['meaning']} |")
    return "\n".join(rows) + "\n"
