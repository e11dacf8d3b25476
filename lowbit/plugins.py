"""What the scheme's parts have in common: the error they raise and the registry that finds them.

A scheme is built from parts, each one a small frozen dataclass that parses and prints its own
token of the scheme string and checks itself (``lowbit.scheme`` asks them; it never names one):

==================  ===============================  =====================================
part                package (one module per part)    token in ``<code>-<gran>[-s<fmt>]``
==================  ===============================  =====================================
code                ``lowbit.codes``                 ``int4``, ``nf4``, ``fp8e4m3``, ``lm3s``
grouping            ``lowbit.groups``                ``static``, ``token``, ``group32``
scale format        ``lowbit.scales``                ``-sfp32`` (bf16: no token)
input cast          ``lowbit.casts``                 none yet (the identity has no token)
==================  ===============================  =====================================

Each package has a ``Registry``; a part registers its class with ``@REGISTRY.register``, and the
registry imports every module of its package the first time it is asked (``pkgutil``), so a
new part is one new module and nothing else. ``lowbit.codes.base`` says how to write one.

    PYTHONPATH=. python -c "from lowbit.codes import CODES; print([c.name for c in CODES.classes()])"
"""
from __future__ import annotations

import importlib
import pkgutil
import threading


class SchemeError(ValueError):
    """A scheme that cannot be built; the message names the field and what is allowed."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Registry:
    """The classes of one kind of part (codes, groupings, ...), by name, in ``order``.

    ``package``'s modules are imported on the first question (each registers its classes), so
    the registry holds every part the package ships without a list to keep up to date."""

    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package
        self._classes: dict[str, type] = {}
        self._loaded = False
        self._lock = threading.RLock()

    def register(self, cls: type) -> type:
        """Class decorator: add ``cls`` (its ``name``) to this registry."""
        with self._lock:
            known = self._classes.get(cls.name)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.kind} {cls.name!r} is registered twice ({known.__module__}, {cls.__module__})")
            self._classes[cls.name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove a part (tests that add one of their own take it out again)."""
        with self._lock:
            self._classes.pop(name, None)

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True  # before importing: a module asking again sees the parts so far
            package = importlib.import_module(self.package)
            for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
                if not module.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{module.name}")

    def classes(self) -> list[type]:
        """Every registered class, in (``order``, ``name``) order: the order help texts list them."""
        self._load()
        return sorted(self._classes.values(), key=lambda c: (c.order, c.name))

    def names(self) -> list[str]:
        return [c.name for c in self.classes()]

    def get(self, name: str, field_name: str | None = None) -> type:
        """The class named ``name``; SchemeError (``field_name``, default the kind) if none is."""
        self._load()
        if name not in self._classes:
            raise SchemeError(field_name or self.kind, f"{name!r} not allowed; allowed: {', '.join(self.names())}")
        return self._classes[name]

    def parse(self, text: str, pos: int):
        """The first part whose ``parse(text, pos)`` reads a token at ``pos``: (part, end), else None."""
        for cls in self.classes():
            found = cls.parse(text, pos)
            if found is not None:
                return found
        return None
