"""A job's scheme strings parsed once: ``SchemePlan`` maps each string to its ``SchemeMap``.

    PYTHONPATH=. python -c "from lowbit.scheme.plan import SchemePlan; \\
        p = SchemePlan(['bf16', 'int4-static-top1/64']); print(p.needs_calibration, p['bf16'])"

The job kind builds the plan when the job starts (its strings were validated at submit time) and
hands it to evaluate, the communicators, layer errors and throughput; none of them parses a
string again. Passing a plain list still works (it is parsed here, once, by whoever receives it).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace

from lowbit.scheme import grammar
from lowbit.scheme.spec import MIN_MESSAGE_AUTO, Scheme, SchemeMap


class SchemePlan(Mapping):
    """text -> SchemeMap, in first-seen order, each text parsed once (``grammar.parse_scheme_map``)."""

    def __init__(self, texts: Iterable[str] = ()):
        self._maps: dict[str, SchemeMap] = {}
        for text in texts:
            self.add(text)

    @classmethod
    def of(cls, schemes: "SchemePlan | Iterable[str]", *first: str) -> "SchemePlan":
        """``schemes`` as a plan (the same object when it already is one) holding ``first`` too."""
        plan = schemes if isinstance(schemes, SchemePlan) else cls(first)
        if plan is not schemes:
            for text in schemes:
                plan.add(text)
        for text in first:
            plan.add(text)
        return plan

    def add(self, text: str) -> SchemeMap:
        if text not in self._maps:
            self._maps[text] = grammar.parse_scheme_map(text)
        return self._maps[text]

    def __getitem__(self, text: str) -> SchemeMap:
        return self._maps[text]

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for smap in self._maps.values() for s in smap.schemes())

    @property
    def auto_gated(self) -> list[Scheme]:
        """The distinct schemes whose size gate is ``@minauto`` (still to be resolved)."""
        out = []
        for smap in self._maps.values():
            out += [s for s in smap.schemes() if s.min_message == MIN_MESSAGE_AUTO and s not in out]
        return out

    def resolve_gates(self, threshold: Callable[[Scheme], int]) -> dict[str, int]:
        """Replace every ``@minauto`` by ``threshold(scheme)`` bytes, in place (the texts stay the
        keys); returns {scheme text: bytes} of what was resolved."""
        resolved: dict[str, int] = {}

        def fix(s: Scheme) -> Scheme:
            if s.min_message != MIN_MESSAGE_AUTO:
                return s
            resolved.setdefault(str(s), threshold(s))
            return replace(s, min_message=resolved[str(s)])
        for text, smap in self._maps.items():
            self._maps[text] = SchemeMap(fix(smap.default), {k: fix(v) for k, v in smap.overrides.items()})
        return resolved

    def validate_for(self, hidden: int, tp: int) -> None:
        for smap in self._maps.values():
            smap.validate_for(hidden, tp)
