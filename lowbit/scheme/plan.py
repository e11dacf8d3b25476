"""A job's scheme strings parsed once: ``SchemePlan`` maps each string to its ``SchemeMap``.

    PYTHONPATH=. python -c "from lowbit.scheme.plan import SchemePlan; \\
        p = SchemePlan(['bf16', 'int4-static-top1/64']); print(p.needs_calibration, p['bf16'])"

The job kind builds the plan when the job starts (its strings were validated at submit time) and
hands it to evaluate, the communicators, layer errors and throughput; none of them parses a
string again. Passing a plain list still works (it is parsed here, once, by whoever receives it).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from lowbit.scheme import grammar
from lowbit.scheme.spec import SchemeMap


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

    def validate_for(self, hidden: int, tp: int) -> None:
        for smap in self._maps.values():
            smap.validate_for(hidden, tp)
