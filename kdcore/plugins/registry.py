"""The component registry: ``available(kind)`` and ``create(kind, name, **params)``.

A :class:`Registry` is built by :func:`kdcore.plugins.load_registry` from the
installed plugins; it is an immutable value, so tests can build as many as
they like with different plugin sets.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import attrs

from kdcore.common.errors import ConfigError, PluginError, UnknownComponentError, join_path
from kdcore.common.params import finite
from kdcore.common.pyrefs import is_python_ref, resolve
from kdcore.plugins.hookspecs import KINDS


#: the registry whose ``create`` is running (components resolve the components
#: they name, e.g. a loss's ``divergence = "jsd"``, from the same registry)
_CREATING: ContextVar["Registry | None"] = ContextVar("kdcore_creating", default=None)
#: where components built outside any ``create`` call resolve names: the
#: installed plugins' registry, provided by :mod:`kdcore.plugins` when it loads
_DEFAULT: list[Callable[[], "Registry"]] = []


def provide_default(get_registry: Callable[[], "Registry"]) -> None:
    """Name the function that returns the default registry (called once by kdcore.plugins)."""
    _DEFAULT[:] = [get_registry]


def current_registry() -> "Registry":
    """The registry building the current component, else the default registry."""
    active = _CREATING.get()
    if active is not None:
        return active
    if not _DEFAULT:
        raise RuntimeError("no default registry: import kdcore first")
    return _DEFAULT[0]()


@contextlib.contextmanager
def _creating(registry: "Registry") -> Iterator[None]:
    token = _CREATING.set(registry)
    try:
        yield
    finally:
        _CREATING.reset(token)


#: a lazy factory: ``"package.module:attribute"`` (attribute may be dotted)
_LAZY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_lazy_target(target: Any) -> bool:
    """Whether ``target`` is a lazy factory, ``"module:attribute"``."""
    return isinstance(target, str) and _LAZY.fullmatch(target) is not None


@attrs.frozen
class Component:
    """One registered factory and where it came from.

    ``target`` is the factory itself or a lazy factory ``"module:attribute"``,
    imported the first time :attr:`factory` is read (so that listing names
    costs no import of the plugin's heavy dependencies)."""

    kind: str
    name: str
    target: Callable[..., Any] | str
    plugin: str
    dist: str | None = None
    version: str | None = None

    @property
    def factory(self) -> Callable[..., Any]:
        """The factory (a lazy one imported now; a broken one is a :class:`PluginError`)."""
        if callable(self.target):
            return self.target
        module_name, _, attr = self.target.partition(":")
        where = f"{self.kind} {self.name!r} of plugin {self.plugin!r}: lazy factory {self.target!r}"
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as exc:
            raise PluginError(f"{where}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise PluginError(f"{where}: module {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise PluginError(f"{where}: {attr!r} is not a class or function")
        return obj


@attrs.frozen
class FailedPlugin:
    """A plugin that could not be loaded, with the reason."""

    name: str
    reason: str
    dist: str | None = None
    version: str | None = None


@attrs.frozen
class PluginInfo:
    """A loaded plugin and the components it registered."""

    name: str
    dist: str | None
    version: str | None
    components: tuple[Component, ...] = ()


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"unknown component kind {kind!r} (kinds: {', '.join(KINDS)})")
    return kind


def accepted_parameters(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    """Names a factory accepts as keywords, and whether it takes any (``**kw``).

    For a class whose ``__init__`` forwards ``**kwargs`` to its base, the
    parameters of the bases are collected too.
    """
    names: set[str] = set()
    targets = [c.__init__ for c in inspect.getmro(factory) if "__init__" in vars(c)] \
        if inspect.isclass(factory) else [factory]
    for fn in targets:
        if fn is object.__init__:
            names.discard("self")
            return names, False
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # builtins without a signature
            return names, True
        params = list(sig.parameters.values())
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            names.discard("self")
            return names, False
    names.discard("self")
    return names, True


def required_parameters(factory: Callable[..., Any]) -> list[str]:
    """The parameters a factory's own signature takes with no default, in order.

    Only the outermost signature counts: what a class forwards to its base
    through ``**kwargs`` it may fill in itself."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature
        return []
    return [p.name for p in sig.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_parameters(component: Component, params: Mapping[str, Any], provided: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` for a parameter the factory does not take, for one
    it requires and is not given (``provided`` names those the caller adds itself,
    e.g. a backbone's ``num_classes``), or for ``inf`` / ``nan`` anywhere in a
    parameter's value (every component's parameters, from a config file or from
    :meth:`Registry.create`, pass here). Each message starts with the parameter."""
    accepted, open_ended = accepted_parameters(component.factory)
    for key, value in params.items():
        if not open_ended and key not in accepted:
            ok = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(
                f"{key}: unknown parameter of {component.kind} {component.name!r} (accepted: {ok})"
            )
        finite(key, value)
    missing = [key for key in required_parameters(component.factory) if key not in {*params, *provided}]
    if missing:
        takes = ", ".join(sorted(accepted)) or "no parameters"
        raise ConfigError(f"{missing[0]}: required parameter missing ({component.kind} {component.name!r} "
                          f"takes: {takes})")


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (Python's, NumPy's or torch's)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _largest_size(value: Any, path: str) -> tuple[str, int] | None:
    """The key path and value of the largest integer in ``value`` (nested tables and
    lists; seeds left out): the size most likely to blame when building runs out of memory."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if path.rsplit(".", 1)[-1] == "seed" else (path, value)
    if isinstance(value, Mapping):
        items = [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    found = [size for size in (_largest_size(v, p) for p, v in items) if size is not None]
    return max(found, key=lambda size: size[1], default=None)


def _too_large(kind: str, name: str, params: Mapping[str, Any], exc: BaseException) -> ConfigError:
    """A :class:`ConfigError` for parameters that need more memory than there is, naming
    the largest size among them (``hidden[0]: 2000000000 needs more memory ...``)."""
    asked = re.search(r"allocate (\d+) bytes", str(exc))
    detail = f"asked for {int(asked.group(1)):,} bytes" if asked else \
        f"failed: {(str(exc).splitlines() or [type(exc).__name__])[0]}"
    largest = _largest_size(params, "")
    if largest is None:
        return ConfigError(f"{kind} {name!r}: these parameters need more memory than there is ({detail})")
    key, value = largest
    return ConfigError(f"{key}: {value} needs more memory than there is ({kind} {name!r} {detail}); lower it")


@attrs.frozen
class Registry:
    """Components by kind and name, plus the plugins that provided them."""

    components: Mapping[str, Mapping[str, Component]]
    plugins: tuple[PluginInfo, ...] = ()
    failed: tuple[FailedPlugin, ...] = ()
    #: the pluggy manager, for hooks other than registration (e.g. commands)
    hooks: Any = attrs.field(default=None, eq=False, repr=False)
    #: folders searched first for ``python:MODULE:ATTRIBUTE`` components (a config's folder)
    search_path: tuple[str, ...] = ()

    def searching(self, *folders: str) -> "Registry":
        """This registry, resolving ``python:`` components in ``folders`` first."""
        return attrs.evolve(self, search_path=tuple(dict.fromkeys((*folders, *self.search_path))))

    def available(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``."""
        return sorted(self.components.get(check_kind(kind), {}))

    def get(self, kind: str, name: str) -> Component:
        """The component registered as ``name`` for ``kind``, or the user's code
        that ``python:MODULE:ATTRIBUTE`` names (:mod:`kdcore.common.pyrefs`)."""
        table = self.components.get(check_kind(kind), {})
        if is_python_ref(name):
            return Component(kind, name, resolve(name, self.search_path), plugin="python")
        if not isinstance(name, str) or name not in table:
            raise UnknownComponentError(kind, str(name), sorted(table))
        return table[name]

    def create(self, kind: str, name: str, **params: Any) -> Any:
        """Build component ``name`` of ``kind`` with keyword ``params``.

        Unknown names raise :class:`UnknownComponentError` with close matches;
        unknown or invalid parameters raise :class:`ConfigError`, and so do
        parameters that need more memory than there is.
        """
        component = self.get(kind, name)
        check_parameters(component, params)
        try:
            with _creating(self):
                return component.factory(**params)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError.unkeyed(f"{kind} {name!r}: {exc}") from exc
        except (MemoryError, RuntimeError) as exc:  # e.g. a dataset of 2e9 samples, a layer no memory holds
            if not _out_of_memory(exc):
                raise
            raise _too_large(kind, name, params, exc) from None


#: what names a component: a registered name, a ``{"name": ..., **params}`` table, or the object itself
Spec = str | Mapping[str, Any] | Callable[..., Any]


def build(kind: str, spec: Spec, key: str = "", *, registry: Registry | None = None) -> Any:
    """Build the component of ``kind`` that ``spec`` names, as the config key ``key`` of
    the component being built (``"inner"``, ``"divergence"``, ``"transforms[0]"``).

    ``spec`` is a registered name, a ``{"name": ..., **params}`` mapping, or an object
    (returned as is). Components that build components call this, so every error keeps
    the config's key path: built at ``loss[1]``, a loss whose ``inner`` is ``"kdd"``
    fails with ``loss[1].inner: unknown loss 'kdd'; did you mean 'kd'?`` (an
    :class:`UnknownComponentError`) and one whose ``inner`` is ``{name = "kd",
    temperature = -1}`` with ``loss[1].inner.temperature: must be > 0`` (a
    :class:`ConfigError`). ``registry`` defaults to the one building the calling
    component, else the default registry."""
    registry = registry or current_registry()
    if isinstance(spec, str):
        name, params, name_key = spec, {}, key
    elif isinstance(spec, Mapping):
        params = dict(spec)
        name, name_key = params.pop("name", None), join_path(key, "name")
        if not isinstance(name, str):
            raise ConfigError(f"{name_key}: a {kind} table needs a 'name'")
    elif callable(spec):
        return spec
    else:
        raise ConfigError(f"{key or kind}: expected a {kind} name, a table with 'name', or a {kind} object, "
                          f"got {spec!r}")
    try:
        registry.get(kind, name)  # an unknown name is the error of the key that holds it
    except UnknownComponentError as exc:
        raise exc.with_path(name_key) from exc
    except ConfigError as exc:  # a "python:MODULE:ATTRIBUTE" that does not resolve
        raise ConfigError.unkeyed(str(exc)).with_path(name_key) from exc
    try:
        return registry.create(kind, name, **params)
    except ConfigError as exc:  # the component's own errors and its components' (unknown names included)
        raise exc.with_path(key) from exc
