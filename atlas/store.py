"""An atlas on disk: a folder of Parquet tables, a manifest, and the features' weights.

    ATLAS/
      manifest.json            format version, model, weights sha256, dataset, preprocessing, k, layers, timings
      images.parquet           image_id, path, label, label_index, status, error
      layers.parquet           layer, kind, channels, height, width, kernel, stride, padding, rf_size, jump, offset
      channels.parquet         layer, channel, mean, std, max, fire_rate
      top_activations.parquet  layer, channel, rank, image_id, value, y, x, x0, y0, x1, y1
      switches.parquet         image_id, pool, y0, x0, h, w, data  (see atlas/switches.py)
      activations/layer=L/*.parquet   image_id, channel, value
      model/features.pt        the conv weights, so projections need no other file
      cache/                   lazily rendered PNGs (created on demand)
      analyses/NAME/*.parquet  results of `atlas occlude`, `invariance`, ...: each NAME is a SQL view

`Atlas` opens one for reading; `atlas.build` writes one.
"""
from __future__ import annotations

import json
import re
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

from . import FORMAT_VERSION
from .errors import AtlasError

# sql/ at the repository's top level is the source; a wheel carries a copy inside the package (setup.py)
_PACKAGED_SQL = Path(__file__).resolve().parent / "sql"
SQL_DIR = _PACKAGED_SQL if _PACKAGED_SQL.is_dir() else Path(__file__).resolve().parent.parent / "sql"
# Format versions this tool reads. 1 did not record the model's constructor options (Atlas.model says what
# that costs); anything else is refused with one line saying to rebuild.
READABLE_VERSIONS = (1, FORMAT_VERSION)
FUNCTION_CALL = re.compile(r"\b(deconv_png|similar_images|similar_channels)\s*\(")
ACTIVATION_FILES = "read_parquet('activations/*/*.parquet', hive_partitioning = true)"  # as in views.sql


def canned_queries() -> dict[str, tuple[str, str]]:
    """name -> (description, sql) for the example queries in sql/queries."""
    out = {}
    for f in sorted((SQL_DIR / "queries").glob("*.sql")):
        text = f.read_text()
        first = text.splitlines()[0] if text else ""
        desc = first.split(":", 1)[1].strip() if first.startswith("--") and ":" in first else ""
        out[f.stem] = (desc, text)
    return out


class Atlas:
    """A built atlas, opened for reading. `atlas.open(path)` returns one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._registered: set[str] = set()  # modules whose SQL functions are on the connection
        mf = self.path / "manifest.json"
        if not self.path.is_dir():
            raise AtlasError(f"atlas '{path}' does not exist")
        if not mf.is_file():
            hint = " (an unfinished build: continue it with `atlas build ... --resume`)" \
                if self.path.name.endswith(".partial") else ""
            raise AtlasError(f"'{path}' is not an atlas: it has no manifest.json{hint}")
        try:
            self.manifest: dict[str, Any] = json.loads(mf.read_text())
        except ValueError:
            raise AtlasError(f"atlas '{path}' has an unreadable manifest.json") from None
        version = self.manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            raise AtlasError(f"atlas '{path}' has format version {version}; this atlas tool reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (rebuild it with `atlas build`)")

    def __repr__(self) -> str:
        m = self.manifest
        return f"<Atlas {self.path} model={m['model']['name']} images={m['dataset']['count']} k={m['k']}>"

    # -- SQL ----------------------------------------------------------------
    @cached_property
    def con(self):
        import duckdb

        con = duckdb.connect()
        con.execute("SET file_search_path = ?", [str(self.path.resolve())])
        views = (SQL_DIR / "views.sql").read_text()
        if not self.has_activations():
            # built with --no-activations: DuckDB refuses a view over a glob that matches nothing,
            # so the view gets the same columns and no rows
            views = views.replace(ACTIVATION_FILES, "(SELECT NULL::INTEGER AS image_id, NULL::VARCHAR AS layer, "
                                                    "NULL::INTEGER AS channel, NULL::FLOAT AS value WHERE false)")
        con.execute(views)
        # Analyses (occlusion, invariance, ...) store tables under analyses/NAME/*.parquet.
        for d in sorted(p for p in (self.path / "analyses").glob("*") if p.is_dir()):
            if list(d.glob("*.parquet")) and d.name.replace("_", "").isalnum():
                con.execute(f"CREATE OR REPLACE VIEW {d.name} AS SELECT * FROM "
                            f"read_parquet('analyses/{d.name}/*.parquet', union_by_name = true)")
        return con

    def has_activations(self, layer: str = "*") -> bool:
        """Whether the activations table holds the layer (any layer by default): not with --no-activations."""
        return any(self.path.glob(f"activations/layer={layer}/*.parquet"))

    def sql(self, query: str, params: dict[str, Any] | None = None):
        """Run SQL over the atlas views; returns a DuckDB relation (`.fetchall()`, `.df()`, ...)."""
        import duckdb

        for name, value in (params or {}).items():
            self.con.execute(f"SET VARIABLE {_ident(name)} = ?", [value])
        self._register_functions(query)
        try:
            return self.con.sql(query)
        except duckdb.Error as e:
            raise _sql_error(e) from None

    def fetch(self, query: str, params: dict[str, Any] | None = None) -> tuple[list[str], list[tuple]]:
        """(column names, rows) of a query, run now: errors that only show while the query runs
        (a bad cast, a function's own error) are AtlasErrors too, as they are at planning time."""
        import duckdb

        rel = self.sql(query, params)
        if rel is None:  # a statement with no result (SET, CREATE VIEW ...)
            return [], []
        try:
            return list(rel.columns), rel.fetchall()
        except duckdb.Error as e:
            raise _sql_error(e) from None

    def rows(self, query: str, params: list | None = None) -> list[dict[str, Any]]:
        self._register_functions(query)
        with self._lock:  # one DuckDB connection per handle: threads (a server, DuckDB's own) take turns
            cur = self.con.execute(query, params or [])
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    # -- model and geometry --------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.manifest["preprocessing"]["crop"])

    @cached_property
    def model(self):
        """The model with the atlas's own copy of the conv weights (classifier from the weights file if any)."""
        import torch

        from .models.registry import load_model, feature_options

        m = self.manifest["model"]
        weights = m.get("weights")
        use_file = bool(weights) and Path(weights).is_file()
        kwargs = m.get("kwargs")
        if kwargs is None:  # format 1 did not record the constructor options
            kwargs = {"num_classes": m.get("num_classes")}
            if not use_file and feature_options(m["name"]):
                raise AtlasError(f"atlas '{self.path}' (format 1) does not record how its {m['name']} was built "
                                 f"(contrast normalisation, width), and its weights file '{weights}' is gone: "
                                 "rebuild the atlas with `atlas build`")
        model = load_model(m["name"], weights if use_file else None, seed=m.get("seed", 0), **kwargs)
        state = torch.load(self.path / "model" / "features.pt", map_location="cpu", weights_only=True)
        try:
            model.features.load_state_dict(state)
        except RuntimeError:
            raise AtlasError(f"atlas '{self.path}': model/features.pt does not fit the {m['name']} its manifest "
                             "describes (a damaged or edited atlas): rebuild it with `atlas build`") from None
        model.atlas_meta["classifier_from"] = weights if use_file else ("random init" if m.get("random_init")
                                                                        else "unavailable")
        return model.eval()

    @property
    def has_classifier(self) -> bool:
        m = self.manifest["model"]
        return bool(m.get("random_init")) or (bool(m.get("weights")) and Path(m["weights"]).is_file())

    @cached_property
    def lmap(self):
        from .layers import LayerMap

        return LayerMap(self.model, self.image_size)

    @property
    def layer_names(self) -> list[str]:
        return [la["layer"] for la in self.manifest["layers"]]

    def check_layer(self, layer: str) -> None:
        if layer not in self.layer_names:
            raise AtlasError(f"unknown layer '{layer}' in atlas '{self.path}': recorded layers are "
                             f"{', '.join(self.layer_names)}")

    def check_channel(self, layer: str, channel: int) -> None:
        self.check_layer(layer)
        n = next(la["channels"] for la in self.manifest["layers"] if la["layer"] == layer)
        if not 0 <= channel < n:
            raise AtlasError(f"channel {channel} is out of range for {layer} (0..{n - 1})")

    # -- browsing -----------------------------------------------------------
    def top(self, layer: str, channel: int) -> list[dict[str, Any]]:
        """The channel's top-k, strongest first."""
        self.check_channel(layer, channel)
        return self.rows("SELECT t.*, i.path, i.label FROM top_activations t JOIN images i USING (image_id) "
                         "WHERE layer = ? AND channel = ? ORDER BY rank", [layer, channel])

    def channels(self, layer: str, sort: str = "channel", descending: bool = False) -> list[dict[str, Any]]:
        self.check_layer(layer)
        if sort not in ("channel", "mean", "std", "max", "fire_rate"):
            raise AtlasError(f"unknown sort key '{sort}': use channel, mean, std, max or fire_rate")
        order = f"{sort} {'DESC' if descending else 'ASC'}, channel"
        return self.rows(f"SELECT * FROM channels WHERE layer = ? ORDER BY {order}", [layer])

    def layers(self) -> list[dict[str, Any]]:
        return self.rows("SELECT l.*, count(*) FILTER (WHERE c.max <= 0) AS dead, round(avg(c.fire_rate), 4) "
                         "AS mean_fire_rate FROM layers l LEFT JOIN channels c USING (layer) GROUP BY ALL "
                         "ORDER BY min(l.rf_size) NULLS LAST, l.layer")

    # -- images -------------------------------------------------------------
    @cached_property
    def source(self):
        """The dataset, if it is still where the build found it (else None)."""
        from .data import open_dataset

        ds = self.manifest["dataset"]
        try:
            return open_dataset(ds["root"] if ds["kind"] != "cifar10" else ds["spec"])
        except AtlasError:
            return None

    @cached_property
    def preprocess(self):
        from .data import Preprocess

        return Preprocess(self.manifest["preprocessing"])

    def original(self, image_id: int):
        """The dataset's image as RGB, before preprocessing, or AtlasError if unavailable or unreadable."""
        rows = self.rows("SELECT path, status FROM images WHERE image_id = ?", [int(image_id)])
        if not rows:
            raise AtlasError(f"image id {image_id} is not in atlas '{self.path}'")
        ds, path = self.manifest["dataset"], rows[0]["path"]
        gone = AtlasError(f"image {image_id} ('{path}') is unavailable: the dataset at '{ds['root']}' is gone "
                          "or changed")
        if ds["kind"] == "cifar10":  # rows of batch files: the source holds them
            src = self.source
            if src is None or image_id >= len(src) or src.records[image_id].path != path:
                raise gone
            opener = lambda: src.open_image(image_id)  # noqa: E731
        else:  # a file under the root: opened directly, no scan of a dataset that may hold millions
            from .data import open_rgb

            file = Path(ds["root"]) / path
            if not file.is_file():
                raise gone
            opener = lambda: open_rgb(file)  # noqa: E731
        try:
            return opener()
        except Exception as e:
            raise AtlasError(f"image {image_id} ('{path}') cannot be read: {e}") from None

    def image(self, image_id: int):
        """(model input tensor (3, S, S), the cropped RGB PIL image), or AtlasError if unavailable."""
        crop = self.preprocess.crop_image(self.original(image_id))
        return self.preprocess.to_tensor(crop), crop

    # -- similarity (atlas/similarity.py) ----------------------------------
    def similar_images(self, image_id: int | None = None, image: str | Path | None = None,
                       layer: str | None = None, k: int = 10) -> list[dict[str, Any]]:
        """Images most like image `image_id` of the atlas, or any image file `image`: `similarity.similar_images`."""
        from .similarity import similar_images

        return similar_images(self, image_id=image_id, image=image, layer=layer, k=k)

    def similar_channels(self, channel, k: int = 10, layer: str | None = None) -> list[dict[str, Any]]:
        """Channels whose responses are most like `channel` ("conv5:17"): `similarity.similar_channels`."""
        from .similarity import similar_channels

        return similar_channels(self, channel, k=k, layer=layer)

    # -- switches -----------------------------------------------------------
    def switches(self, layer: str, channel: int, rank: int):
        """{pool: index tensor (C, H, W)} for a top-k entry, decoded from the stored switches.

        Exact inside the unit's receptive field, which is all a unit projection reads.
        """
        from .switches import SwitchRegion, decode

        if not (self.path / "switches.parquet").is_file():
            raise AtlasError(f"atlas '{self.path}' has no switches (built with --no-switches)")
        self.check_channel(layer, channel)
        rows = self.rows("SELECT s.pool, s.y0, s.x0, s.h, s.w, s.data FROM read_parquet('switches.parquet') s "
                         "JOIN top_activations t USING (image_id) WHERE t.layer = ? AND t.channel = ? AND t.rank = ?",
                         [layer, int(channel), int(rank)])
        below = self.lmap.by_name[layer].pools_below
        rows = [r for r in rows if r["pool"] in below]
        out = {}
        for r in rows:
            pool = self.lmap.pool_by_name[r["pool"]]
            region = SwitchRegion(r["pool"], r["y0"], r["x0"], r["h"], r["w"])
            out[r["pool"]] = decode(r["data"], pool.channels, pool.geometry, region)
        return out

    # -- pictures (rendered on demand, cached under cache/; see atlas/projections.py) ---------
    def show(self, layer: str, channel: int, rank: int | None = None, **options) -> Path:
        """The figure 2 panel of a channel (or, with rank, one projection) as a PNG path: `projections.show`."""
        from .projections import show

        return show(self, layer, channel, rank, **options)

    def filters(self, layer: str | None = None, out: str | Path | None = None) -> Path:
        """The first layer's filters as a grid PNG (figure 6 view): `projections.filters`."""
        from .projections import filters

        return filters(self, layer, out)

    def _register_functions(self, query: str) -> None:
        # Python functions (deconv_png, similar_images, similar_channels) are registered on the first
        # query that calls them: registering one imports numpy (~60 ms), which opening an atlas and plain
        # SQL should not pay. A name that is not followed by "(" (a column alias) registers nothing.
        for name in set(FUNCTION_CALL.findall(query.lower())):
            module = "projections" if name == "deconv_png" else "similarity"
            if module not in self._registered:
                import importlib

                importlib.import_module(f".{module}", __package__).register_sql(self)
                self._registered.add(module)


def _sql_error(e: Exception) -> AtlasError:
    return AtlasError(f"SQL error: {str(e).splitlines()[0]}")


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise AtlasError(f"bad parameter name '{name}'")
    return name
