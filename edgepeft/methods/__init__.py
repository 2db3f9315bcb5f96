"""The method registry: every PEFT method is one registered :class:`Method`; generic code asks here.

A bundle's method string joins method names with ``+`` (``lora+bitfit``, ``ia3+head``); a slot's
method is the owner of its kind. Registering a second method of the same name, or a kind another
method owns, is refused.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from edgepeft.errors import DeltaError, ExportError
from edgepeft.methods.base import MethodConfig, Method, ModelView, matches, option, select

__all__ = ["Method", "MethodConfig", "ModelView", "matches", "option", "select", "register", "get", "names",
           "owner", "kinds", "parse", "configs", "by_module", "get_all", "virtual_tokens"]

_METHODS: dict[str, Method] = {}
_OWNERS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry; a taken name or slot kind is refused."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if not method.name.isidentifier() or "+" in method.name:
        raise ValueError(f"method name {method.name!r} must be an identifier")
    taken = [k for k in method.kinds if k in _OWNERS]
    if taken:
        raise ValueError(f"method {method.name!r}: slot kind(s) {', '.join(taken)} already owned by "
                         f"{', '.join(sorted({_OWNERS[k].name for k in taken}))}")
    _METHODS[method.name] = method
    for k in method.kinds:
        _OWNERS[k] = method
    return method


def get_all() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_METHODS)


def kinds() -> tuple[str, ...]:
    """Every registered slot kind."""
    return tuple(_OWNERS)


def get(name: str) -> Method:
    """The method called ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ExportError(f"unknown method {name!r}; choose from {', '.join(_METHODS)} (join several with '+')") from None


def owner(kind: str) -> Method:
    """The method that owns slot kind ``kind``."""
    try:
        return _OWNERS[kind]
    except KeyError:
        raise DeltaError(f"unknown slot kind {kind!r}; expected one of {', '.join(_OWNERS)}") from None


def parse(method: str) -> tuple[Method, ...]:
    """The methods of a method string (``lora+bitfit``), in registration order; unknown or repeated names refused."""
    parts = [p.strip() for p in method.split("+")]
    if not all(parts):
        raise ExportError(f"method {method!r}: empty name; join method names with '+', e.g. lora+bitfit")
    if len(set(parts)) != len(parts):
        raise ExportError(f"method {method!r} names a method twice")
    chosen = {get(p).name for p in parts}
    return tuple(m for n, m in _METHODS.items() if n in chosen)


def configs(methods: Iterable[Method], options: Mapping[str, Any]) -> dict[str, MethodConfig]:
    """Each method's config from ``options``: ``method.key`` for one method, a plain ``key`` for every chosen
    method that has it. A key no chosen method takes is refused by name."""
    methods = tuple(methods)
    per: dict[str, dict[str, Any]] = {m.name: {} for m in methods}
    fields_of = {m.name: {f for f, _ in m.config_cls.help()} for m in methods}
    for key, value in options.items():
        name, dot, leaf = key.rpartition(".")
        if dot:
            if name not in per:
                raise ExportError(f"--method-config {key}: {name!r} is not one of the chosen methods ({', '.join(per)})")
            per[name][leaf] = value
            continue
        takers = [n for n in per if leaf in fields_of[n]]
        if not takers:
            known = [f"{n}.{f}" for n in per for f in sorted(fields_of[n])]
            raise ExportError(f"--method-config {key}: no chosen method takes it; options: {', '.join(known) or 'none'}")
        for n in takers:
            per[n][leaf] = value
    return {m.name: m.config_cls.from_options(per[m.name], m.name) for m in methods}


def virtual_tokens(slots: Iterable, where: str | None = None) -> int:
    """Virtual tokens the slots put before the user's (``where``: "sequence" or "prefix" only; None: both)."""
    return sum(s.shape[0] for s in slots if (m := owner(s.kind)).virtual and (where is None or m.virtual == where)
               and m.infer_axis(s.kind) == 0)


def by_module(names_: Iterable[str]) -> dict[str, dict[Method, dict[str, str]]]:
    """Slot names grouped as {module: {method: {kind: slot name}}}, methods in registration order."""
    from edgepeft.names import split_slot_name

    out: dict[str, dict[Method, dict[str, str]]] = {}
    for n in sorted(names_):
        module, kind = split_slot_name(n)
        out.setdefault(module, {}).setdefault(owner(kind), {})[kind] = n
    order = {m: i for i, m in enumerate(_METHODS.values())}
    return {mod: dict(sorted(g.items(), key=lambda kv: order[kv[0]])) for mod, g in out.items()}


def _builtin() -> None:
    # Registration order is the order of each method's effect inside a layer's forward pass.
    import edgepeft.methods.lora  # noqa: F401  (each module registers itself)
    import edgepeft.methods.head  # noqa: F401
    import edgepeft.methods.bitfit  # noqa: F401
    import edgepeft.methods.ia3  # noqa: F401
    import edgepeft.methods.dora  # noqa: F401
    import edgepeft.methods.adalora  # noqa: F401  (issue 14)
    import edgepeft.methods.vera  # noqa: F401
    import edgepeft.methods.loraxs  # noqa: F401
    import edgepeft.methods.bottleneck  # noqa: F401
    import edgepeft.methods.prompt  # noqa: F401  (issue 14: virtual tokens enter before any layer)
    import edgepeft.methods.ptuning  # noqa: F401
    import edgepeft.methods.prefix  # noqa: F401
    import edgepeft.methods.bn  # noqa: F401  (convolutional models)


_builtin()
