"""The site's comparison section (`atlas export ATLAS SITE --compare DIR`): a page with each layer pair's match
quality and its one-to-one pairs, every unit linked to its own channel page and named beside its counterpart
in the other atlas; each channel page says its counterpart and links to its row there.

The exported atlas may be either side of the comparison: its units are the left column, the other atlas's
the right. A comparison of two other atlases is refused in one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import AtlasError

PAGE = "compare.html"


class SiteComparison:
    def __init__(self, atlas, folder: str | Path):
        from ..compare import Comparison

        self.cmp = Comparison(folder)
        here = str(Path(atlas.path).resolve())
        sides = {s: self.cmp.record[s]["path"] for s in ("a", "b")}
        if here not in sides.values():
            raise AtlasError(f"comparison '{folder}' compares '{sides['a']}' and '{sides['b']}', not this atlas "
                             f"'{atlas.path}'")
        self.mine = "a" if sides["a"] == here else "b"
        self.other = "b" if self.mine == "a" else "a"
        self.other_name = Path(sides[self.other]).name
        me, them = self.mine, self.other
        rows = self.cmp.rows(
            f"SELECT layer_{me} AS layer, channel_{me} AS channel, layer_{them} AS other_layer, "
            f"channel_{them} AS other_channel, corr, kind FROM matches "
            f"WHERE channel_{me} IS NOT NULL AND (kind = 'one-to-one' OR side = ?) "
            f"ORDER BY layer, channel, kind DESC", [me])
        self.units: dict[tuple[str, int], dict[str, Any]] = {}
        for r in rows:
            u = self.units.setdefault((r["layer"], r["channel"]), {"layer": r["layer"], "channel": r["channel"]})
            u["one_to_one" if r["kind"] == "one-to-one" else "best"] = {
                "layer": r["other_layer"], "channel": r["other_channel"], "corr": r["corr"]}

    def key(self) -> list:
        """What the pages made from it depend on: its files' sizes and times."""
        out = []
        for f in sorted(self.cmp.path.glob("*")):
            if f.is_file():
                st = f.stat()
                out.append((f.name, st.st_size, st.st_mtime_ns))
        return out

    def counterpart(self, layer: str, channel: int) -> dict[str, Any] | None:
        u = self.units.get((layer, channel))
        if u is None:
            return None
        return {**u, "other": self.other_name, "href": f"../{PAGE}#{layer}-{channel}"}

    def page(self, selection: dict[str, list[int]]) -> dict[str, Any]:
        """The comparison page's data: per layer pair its quality and its units (each linked when exported)."""
        me, them = self.mine, self.other
        pairs = []
        for p in self.cmp.layer_pairs:
            layer = p[f"layer_{me}"]
            exported = set(selection.get(layer, []))
            units = [{**u, "href": f"{layer}/{u['channel']}.html" if u["channel"] in exported else None}
                     for (la, _), u in sorted(self.units.items()) if la == layer]
            units.sort(key=lambda u: (-(u.get("one_to_one") or {}).get("corr", -2) if (u.get("one_to_one") or {})
                                      .get("corr") is not None else 2, u["channel"]))
            pairs.append({"layer": layer, "other_layer": p[f"layer_{them}"], "images": p["images"],
                          "live": p[f"live_{me}"], "other_live": p[f"live_{them}"], "matched": p["matched"],
                          "mean": p["mean_one_to_one"], "median": p["median_one_to_one"],
                          "mutual_best": p["mutual_best"], "units": units})
        rec = self.cmp.record
        return {"other": self.other_name, "other_path": rec[them]["path"], "side": me.upper(),
                "shared": rec["images"]["shared"], "paired_by": rec["images"]["paired_by"],
                "statistic": rec["statistic"], "pairs": pairs, "quality": "img/compare-quality.png",
                "folder": str(self.cmp.path)}
