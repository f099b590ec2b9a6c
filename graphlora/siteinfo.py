"""Site introspection: what ``gm.sites`` and ``gm.sites_table()`` show."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from graphlora.passes import Site

from .state import AdapterState

__all__ = ["SiteInfo", "site_infos", "sites_table"]


@dataclass(frozen=True)
class SiteInfo:
    """A located site as users see it: path, op kind, feature sizes, rank per adapter.

    ``ranks`` has every adapter placed on the site (0 for IA3, which has a vector, not a
    low-rank pair); ``methods`` says which method each uses (``"lora"``, ``"dora"``, ``"ia3"``)
    and ``parameters`` how many parameters each adds here.
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    ranks: Mapping[str, int]
    methods: Mapping[str, str] = dataclasses.field(default_factory=dict)
    parameters: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """``sum_a r_a * (d_in + d_out)`` for LoRA (``+ d_out`` with DoRA); ``d_out`` or ``d_in`` for IA3."""
        if self.parameters:
            return sum(self.parameters.values())
        return sum(r * (self.in_features + self.out_features) for r in self.ranks.values())


def site_infos(state: AdapterState, records: Mapping[str, Site]) -> list[SiteInfo]:
    """Every located site (first occurrence), with each adapter placed on it."""
    out = []
    for site in records.values():
        placed = [a for a, plan in state.plans.items() if site.name in plan]
        ranks = {a: state.rule(a).rank(state.plans[a][site.name]) for a in placed}
        methods = {a: state.rule(a).variant(state.configs[a]) for a in placed}
        params = {a: sum(p.numel() for p in state.branch(site.name, a).parameters()) for a in placed}
        out.append(SiteInfo(site.name, site.kind, site.in_features, site.out_features, ranks, methods, params))
    return out


def sites_table(infos: list[SiteInfo], adapted_only: bool = True) -> str:
    """The sites as a text table (path, kind, in, out, rank per adapter, added parameters)."""
    rows = [s for s in infos if s.ranks or not adapted_only]
    header = ("site", "kind", "in", "out", "adapters (rank)", "params")
    body = [
        (s.name, s.kind, str(s.in_features), str(s.out_features),
         ", ".join(f"{a}:{r}" if s.methods.get(a, "lora") == "lora" else f"{a}:{s.methods[a]}" + (f"/{r}" if r else "")
                   for a, r in s.ranks.items()) or "-", f"{s.num_parameters:,}")
        for s in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i in (2, 3, 5) else '<'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in body]
    return "\n".join(lines)
