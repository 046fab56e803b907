"""Plug-in registries: one per kind, filled by a decorator, extended through entry points.

A plug-in is a class with a ``name``, a ``version`` (bumped whenever its outputs change, it is hashed
into every cache key), a ``Params`` dataclass (typed, validated, defaults = the paper's settings),
optional per-profile parameter overrides, and its requirements (extra modules, downloaded weights).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar


class ConfigError(ValueError):
    """Invalid suite, parameter or plug-in name; the message names the place and the fix."""


@dataclass(frozen=True)
class Requirements:
    """What a plug-in needs beyond the core install."""

    modules: tuple[str, ...] = ()  # importable module names
    extra: str = ""  # pip extra that provides them
    weights: tuple[str, ...] = ()  # names in bench.weights.WEIGHTS (or Hugging Face ids) needed at run time
    white_box: bool = False  # needs gradients through the surrogate model
    gpu_memory_gb: float = 0.0  # paper-profile estimate, informative


@dataclass(frozen=True)
class NoParams:
    pass


class Plugin:
    """Base of every plug-in kind."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    kind: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}
    requires: ClassVar[Requirements] = Requirements()
    paper: ClassVar[str] = ""  # citation / source of the defaults

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when usable here with default parameters, else why not (missing module or weights)."""
        missing = cls.missing_modules()
        if missing:
            return missing
        try:
            params = cls.Params()
        except TypeError:  # a required parameter (e.g. resize's size): usable; its weights depend on the value
            return None
        try:
            return cls(params).missing_weights()
        except Exception as e:  # defaults that cannot be built say so rather than crash `bench list`
            return f"cannot check weights ({e})"

    @classmethod
    def missing_modules(cls) -> str | None:
        missing = [m for m in cls.requires.modules if importlib.util.find_spec(m) is None]
        if not missing:
            return None
        extra = f" (pip install 'antipersonalization-bench[{cls.requires.extra}]')" if cls.requires.extra else ""
        return f"missing Python module(s) {', '.join(missing)}{extra}"

    def inputs_fingerprint(self) -> str:
        """A digest of files the plug-in reads that its parameters only name (an external folder or model), part of
        every cache key that includes the plug-in: changing those files recomputes. "" for none."""
        return ""

    def weight_names(self) -> tuple[str, ...]:
        """Weights this instance needs (names in ``bench.weights.WEIGHTS`` or Hugging Face ids); may depend on params."""
        return tuple(self.requires.weights)

    def missing_weights(self) -> str | None:
        """None when every weight file this instance needs is here, else the first missing one's message."""
        from bench import weights

        for name in self.weight_names():
            reason = weights.get(name).missing()
            if reason:
                return reason
        return None


P = TypeVar("P", bound=Plugin)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Validate/convert one parameter value against its annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(options))}"


def build_params(cls: type[Plugin], given: dict[str, Any] | None, profile: str | None, where: str) -> Any:
    """Defaults (paper) < profile overrides < explicitly given values; all validated."""
    merged: dict[str, Any] = {}
    if profile and profile in cls.profiles:
        merged.update(cls.profiles[profile])
    merged.update(given or {})
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    hints = typing.get_type_hints(cls.Params)
    out = {}
    for key, value in merged.items():
        if key not in fields:
            raise ConfigError(f"{where}: {cls.kind} {cls.name!r} has no parameter {key!r}{did_you_mean(key, list(fields))}")
        out[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        params = cls.Params(**out)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    check = getattr(params, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return params


def params_dict(params: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(params).items()}


def describe_params(cls: type[Plugin]) -> str:
    hints = typing.get_type_hints(cls.Params)
    parts = []
    for f in dataclasses.fields(cls.Params):
        tname = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            parts.append(f"{f.name}: {tname} (required)")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parts.append(f"{f.name}: {tname} = {default!r}")
    return ", ".join(parts)


class Registry(Generic[P]):
    """Name -> plug-in class, for one kind. Duplicates are errors."""

    def __init__(self, kind: str, base: type[P], entry_point_group: str) -> None:
        self.kind = kind
        self.base = base
        self.group = entry_point_group
        self._items: dict[str, type[P]] = {}
        self._entry_points_loaded = False

    def register(self, name: str, version: int = 1):
        def deco(cls: type[P]) -> type[P]:
            if not issubclass(cls, self.base):
                raise TypeError(f"{cls.__name__} must subclass {self.base.__name__} to be a {self.kind}")
            if name in self._items and self._items[name] is not cls:
                raise ConfigError(f"duplicate {self.kind} name {name!r}: {self._items[name].__module__} and {cls.__module__}")
            if not dataclasses.is_dataclass(cls.Params):
                raise TypeError(f"{cls.__name__}.Params must be a dataclass")
            cls.name, cls.version, cls.kind = name, version, self.kind
            self._items[name] = cls
            return cls

        return deco

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self.group):
            ep.load()  # importing the module runs its @register decorators

    def names(self) -> list[str]:
        load_builtins()
        self._load_entry_points()
        return sorted(self._items)

    def get(self, name: str, where: str = "") -> type[P]:
        names = self.names()
        if name not in self._items:
            loc = f"{where}: " if where else ""
            raise ConfigError(f"{loc}unknown {self.kind} {name!r}{did_you_mean(name, names)}")
        return self._items[name]

    def create(self, name: str, params: dict[str, Any] | None = None, profile: str | None = None, where: str = "") -> P:
        cls = self.get(name, where)
        return cls(build_params(cls, params, profile, where or f"{self.kind} {name}"))

    def items(self) -> list[tuple[str, type[P]]]:
        return [(n, self._items[n]) for n in self.names()]


_BUILTIN_MODULES = (
    "defenses.baselines",
    "defenses.apdm",
    "defenses.persguard",
    "defenses.anti_dreambooth",
    "defenses.single_model",
    "defenses.pid",
    "defenses.simac",
    "defenses.mist_v2",
    "defenses.caat",
    "defenses.pap",
    "defenses.metacloak",
    "defenses.genwatermark",
    "defenses.external",
    "attacks.transforms",
    "attacks.purification",
    "attacks.dreambooth",
    "attacks.textual_inversion",
    "attacks.custom_diffusion",
    "metrics.imperceptibility",
    "metrics.backdoor",
    "metrics.quality",
    "metrics.faces",
    "metrics.fidelity",
    "metrics.utility",
    "metrics.watermark",
    "metrics.subject_identity",
    "bench.datasets",
    "bench.scenarios",
    "bench.executors",
)
_builtins_loaded = False


def load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
    _builtins_loaded = True
