"""An atlas on disk: a folder of Parquet tables, a manifest, and the features' weights.

    ATLAS/
      manifest.json            format version, model, weights sha256, dataset, preprocessing, k, layers, timings
      images.parquet           image_id, path, label, label_index, status, error
      layers.parquet           layer, kind, channels, height, width, kernel, stride, padding, rf_size, jump, offset
      channels.parquet         layer, channel, mean, std, max, fire_rate
      top_activations.parquet  layer, channel, rank, image_id, value, y, x, x0, y0, x1, y1
      switches.parquet         image_id, pool, y0, x0, h, w, data  (see atlas/deconv/switches.py)
      activations/layer=L/*.parquet   image_id, channel, value
      model/features.pt        the conv weights, so projections need no other file (a `features` Sequential's)
      model/state.pt           instead, for any other model: its whole state_dict
      index/*.faiss (+ .json)  similarity indexes (see atlas/search/indexing.py)
      cache/                   lazily rendered PNGs (created on demand)
      analyses/NAME/*.parquet  results of `atlas occlude`, `invariance`, ...: each NAME is a SQL view

`atlas.build` writes one; `AtlasReader` reads one and only reads, so that everything above it
(projections, similarity, the export, the analyses) can use it without an import circle. What keeps the
SQL of `atlas sql` read-only and confined to the folder is `atlas.store.sql_guard`.
"""
from __future__ import annotations

import contextlib
import json
import re
import threading
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from .formats import FORMAT_VERSION
from ..errors import AtlasError
from .manifest import validate
from .sql_guard import Deadline, check_read_only, confine, first_line, refusal, sql_error

# sql/ at the repository's top level is the source; a wheel carries a copy inside the package (setup.py)
_PACKAGE = next(p for p in Path(__file__).resolve().parents if p.name == "atlas")
_PACKAGED_SQL = _PACKAGE / "sql"
SQL_DIR = _PACKAGED_SQL if _PACKAGED_SQL.is_dir() else _PACKAGE.parent / "sql"
# Format versions this tool reads. 1 did not record the model's constructor options (Atlas.model says what
# that costs); anything else is refused with one line saying to rebuild.
READABLE_VERSIONS = (1, FORMAT_VERSION)
FUNCTION_CALL = re.compile(r"\b(deconv_png|featurevis_png|similar_images|similar_channels)\s*\(")
ACTIVATION_FILES = "read_parquet('activations/*/*.parquet', hive_partitioning = true)"  # as in views.sql
REQUIRED_FILES = ("images.parquet", "layers.parquet", "channels.parquet", "top_activations.parquet")
PARQUET_PATH = re.compile(r"(read_parquet\(\s*)'([^']*)'")  # a view's file, relative to the atlas


class Result(NamedTuple):
    """One statement's result: column names and rows (the first `max_rows` when `truncated`)."""

    columns: list[str]
    rows: list[tuple]
    truncated: bool = False


FETCH_ROWS = 2048  # rows fetched at a time, the deadline checked between them
HASH = re.compile(r"[0-9a-f]{32}")  # images.content_hash: BLAKE2b-128 in hex (atlas/data)


def canned_queries(folder: str = "queries") -> dict[str, tuple[str, str]]:
    """name -> (description, sql) for the example queries in sql/queries (sql/compare: a comparison's); the
    description is the whole comment the file opens with, after its "name:"."""
    out = {}
    for f in sorted((SQL_DIR / folder).glob("*.sql")):
        text = f.read_text()
        head = []
        for line in text.splitlines():
            if not line.startswith("--"):
                break
            head.append(line[2:].strip())
        desc = " ".join(head)
        out[f.stem] = (desc.split(":", 1)[1].strip() if desc.startswith(f"{f.stem}:") else desc, text)
    return out


def query_parameters(sql: str) -> list[str]:
    """The variables a query reads (getvariable('NAME')): what `atlas sql -q NAME -p NAME=VALUE` sets."""
    return list(dict.fromkeys(re.findall(r"getvariable\('([A-Za-z_][A-Za-z0-9_]*)'\)", sql)))


class AtlasReader:
    """A built atlas, opened for reading: its manifest, tables (SQL), model, geometry, images and switches.

    Pure reading, so that everything above it (projections, similarity, the export, the analyses) can use
    it without a circle of imports. `atlas.open(path)` returns an `atlas.facade.Atlas`, this plus the
    pictures, the similarity queries and the SQL functions that run them."""

    def __init__(self, path: str | Path, *, trust_code: bool = False, model=None):
        self.path = Path(path)
        # consent to rebuild a model from its code, or the model itself (atlas.models.consent says why)
        self._given_model = model
        if trust_code or model is not None:
            from ..models import consent

            if trust_code:
                consent.grant(self.path)
            if model is not None:
                consent.give(self.path, model)
        self._lock = threading.RLock()
        self._registered: set[str] = set()  # modules whose SQL functions are on the connection
        mf = self.path / "manifest.json"
        if self.path.is_file():
            raise AtlasError(f"'{path}' is a file, not an atlas folder (an atlas is the folder `atlas build --out` "
                             "makes)")
        if not self.path.is_dir():
            from ..util.files import set_aside

            if set_aside(self.path):  # between the two renames of an --overwrite build, or killed there
                raise AtlasError(f"atlas '{path}' is being replaced, or its replacement was interrupted (the "
                                 f"previous version is in '{set_aside(self.path)[-1]}'); the next build, index or "
                                 "export of it finishes or undoes that")
            raise AtlasError(f"atlas '{path}' does not exist")
        if not mf.is_file():
            hint = " (an unfinished build: continue it with `atlas build ... --resume`)" \
                if self.path.name.endswith(".partial") else ""
            raise AtlasError(f"'{path}' is not an atlas: it has no manifest.json{hint}")
        try:
            manifest = json.loads(mf.read_text())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise AtlasError(f"atlas '{path}' has an unreadable manifest.json") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if isinstance(manifest, dict) and version not in READABLE_VERSIONS:
            raise AtlasError(f"atlas '{path}' has format version {version!r}; this atlas tool reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (rebuild it with `atlas build`)")
        # an atlas may come from someone else: every field checked before any other work (atlas/store/manifest.py)
        self.manifest: dict[str, Any] = validate(manifest, f"atlas '{path}'")
        self._check_links()

    def __repr__(self) -> str:
        m = self.manifest
        return f"<Atlas {self.path} model={m['model']['name']} images={m['dataset']['count']} k={m['k']}>"

    # -- SQL ----------------------------------------------------------------
    # Two kinds of connection. `con` (Atlas.sql, .fetch, .rows, the tool's own queries) is DuckDB in full, in
    # the user's own process: relative paths resolve inside the atlas. `query(confined=True)`, what `atlas sql`
    # runs, goes to a twin Atlas whose connection reads the atlas folder and nothing else, and only read-only
    # statements reach it (atlas.store.sql_guard): DuckDB's settings alone let COPY and ATTACH write inside an
    # allowed folder, and a statement list alone would let read_csv('/etc/shadow') through.
    _confined = False

    @cached_property
    def con(self):
        import duckdb

        root = self.path.resolve()
        missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
        if missing:
            raise self._damaged(missing[0], "is missing")
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
                             if self._confined else {})
        if not self._confined:
            con.execute("SET file_search_path = ?", [str(root)])
        for statement in self.view_statements():
            try:
                con.execute(statement)
            except duckdb.Error as e:  # a view reads its file's schema now: a damaged file shows here
                file = PARQUET_PATH.search(statement)[2]
                raise self._damaged(file[len(f"{root}/"):] if file.startswith(f"{root}/") else file,
                                    f"cannot be read ({first_line(e)})") from None
        if self._confined:
            confine(con, self, [root])
        return con

    def view_statements(self) -> list[str]:
        """The statements that create the atlas's views (sql/views.sql, then one per analysis), each file
        by its absolute path: a confined connection refuses relative ones, whatever file_search_path says.
        A comparison (atlas.compare) creates them in a schema of their own."""
        import duckdb

        root = self.path.resolve()
        views = (SQL_DIR / "views.sql").read_text()
        if not self.has_activations():
            # built with --no-activations: DuckDB refuses a view over a glob that matches nothing,
            # so the view gets the same columns and no rows
            views = views.replace(ACTIVATION_FILES, "(SELECT NULL::INTEGER AS image_id, NULL::VARCHAR AS layer, "
                                                    "NULL::INTEGER AS channel, NULL::FLOAT AS value WHERE false)")
        statements = [str(st.query) for st in duckdb.extract_statements(views)]
        # Analyses (occlusion, invariance, ...) store tables under analyses/NAME/*.parquet.
        for d in sorted(p for p in (root / "analyses").glob("*") if p.is_dir()):
            if list(d.glob("*.parquet")) and d.name.replace("_", "").isalnum():
                statements.append(f"CREATE OR REPLACE VIEW {d.name} AS SELECT * FROM "
                                  f"read_parquet('analyses/{d.name}/*.parquet', union_by_name = true)")
        return [PARQUET_PATH.sub(lambda m: m[1] + _quote(f"{root}/{m[2]}"), st) for st in statements]

    # -- confinement ------------------------------------------------------------
    def _inside(self, rel: str) -> Path:
        """The atlas's file `rel`, refused in one line if a link takes it outside the atlas folder."""
        file = self.path / rel
        root, real = self.path.resolve(), file.resolve()
        if not real.is_relative_to(root):
            raise AtlasError(f"atlas '{self.path}': {rel} leads outside the atlas folder (to '{real}'); "
                             "an atlas reads only its own files")
        return file

    def _check_links(self) -> None:
        """Every link inside the atlas (its cache aside, whose pictures are only ever written) must stay
        inside it: the tables, the weights and the indexes are read from here, never from elsewhere."""
        from ..util.files import link_outside

        # cache/ may be large; pictures are read and written there only through PictureCache, which checks
        found = link_outside(self.path, skip=("cache",))
        if found is not None:
            link, target = found
            raise AtlasError(f"atlas '{self.path}': {link.relative_to(self.path.resolve())} is a link to '{target}', "
                             "outside the atlas folder; an atlas reads only its own files")

    def has_activations(self, layer: str = "*") -> bool:
        """Whether the activations table holds the layer (any layer by default): not with --no-activations."""
        return any(self.path.glob(f"activations/layer={layer}/*.parquet"))

    def sql(self, query: str, params: dict[str, Any] | None = None):
        """Run SQL over the atlas views; returns a DuckDB relation (`.fetchall()`, `.df()`, ...).

        DuckDB in full, in your own process: any statement, any file. `query` is what `atlas sql` runs."""
        import duckdb

        for name, value in (params or {}).items():
            self.con.execute(f"SET VARIABLE {_ident(name)} = ?", [value])
        self._register_functions(query)
        try:
            return self.con.sql(query)
        except duckdb.Error as e:
            raise self._query_error(e) from None

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
            raise self._query_error(e) from None

    def query(self, sql: str, params: dict[str, Any] | None = None, *, confined: bool = True,
              timeout: float | None = None, max_rows: int | None = None) -> list[Result]:
        """Run a SQL script now: one Result (columns, rows) per statement that returns rows, in order.

        confined (what `atlas sql` runs): only read-only statements (SELECT, WITH, VALUES, DESCRIBE, SHOW,
        SUMMARIZE, EXPLAIN, PIVOT, read-only PRAGMAs, SET VARIABLE), on a connection that reads the atlas
        folder and no other file, writes none and loads no extension; anything else is an AtlasError.
        confined=False: DuckDB in full (the connection of Atlas.sql). timeout: seconds the whole script may
        run (None: no limit); past it DuckDB is interrupted, which takes effect between the vectors (up to
        2,048 rows) it hands a Python function (deconv_png, similar_images, similar_channels): a vector
        being rendered or searched finishes first. Rows are fetched FETCH_ROWS at a time under the same
        limit. max_rows: keep at most that many rows of each result (Result.truncated says so); None or 0,
        all of them.
        """
        import duckdb

        if confined != self._confined:
            return self._twin(confined).query(sql, params, confined=confined, timeout=timeout, max_rows=max_rows)
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as e:
            raise sql_error(e) from None
        if not statements:
            raise AtlasError("the SQL has no statement (only comments or nothing)")
        if confined:
            for n, st in enumerate(statements, 1):
                check_read_only(st, f"statement {n}" if len(statements) > 1 else "the statement")
        with self._lock:
            for name, value in (params or {}).items():
                self.con.execute(f"SET VARIABLE {_ident(name)} = ?", [value])
            self._register_functions(sql)
            results: list[Result] = []
            with Deadline(self.con, timeout) as deadline:
                for st in statements:
                    deadline.check()
                    try:
                        cur = self.con.execute(st)
                        if list(st.expected_result_type) == [duckdb.ExpectedResultType.NOTHING]:
                            continue  # SET VARIABLE, CREATE VIEW...: DuckDB answers 'Success', no rows
                        results.append(_fetch(cur, deadline, max_rows))
                    except duckdb.InterruptException:
                        deadline.check()
                        raise AtlasError("query interrupted") from None
                    except duckdb.PermissionException as e:
                        raise refusal(self.path.resolve(), e) from None
                    except duckdb.Error as e:
                        raise self._query_error(e) from None
        return results

    def _twin(self, confined: bool) -> "AtlasReader":
        twins = self.__dict__.setdefault("_twins", {})
        if confined not in twins:
            twin = type(self)(self.path)  # the same kind: a facade's twin has the SQL functions too
            twin._confined = confined
            twins[confined] = twin
        return twins[confined]

    @contextlib.contextmanager
    def reading(self, file: str):
        """Read the atlas's `file` (relative to the atlas) directly (pyarrow, not SQL): a missing or
        unreadable file is the one line `_damaged` says, not a traceback."""
        try:
            yield
        except AtlasError:
            raise
        except FileNotFoundError:
            raise self._damaged(file, "is missing") from None
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise self._damaged(file, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
                from None

    def _damaged(self, file: str, what: str) -> AtlasError:
        return AtlasError(f"atlas '{self.path}' is damaged: {file} {what}; rebuild it with "
                          f"`atlas build ... --out {self.path} --overwrite`")

    def _query_error(self, e: Exception) -> AtlasError:
        """A DuckDB error as one line: a damaged file of the atlas where it is one, else a SQL error."""
        return self._damage(e) or sql_error(e)

    def _damage(self, e: Exception) -> AtlasError | None:
        """The damaged file an error shows, if it shows one: a file of the atlas that it names and that is
        there (a path that is not is the query's mistake), or an undecodable Parquet page, which DuckDB
        raises as a bare duckdb.Error naming no file (then the file is the atlas's if this connection reads
        nothing else: the tool's own queries, or a confined one)."""
        import duckdb

        if isinstance(e, (duckdb.IOException, duckdb.InvalidInputException)):
            root = self.path.resolve()
            for m in re.finditer(r"""["']([^"']+\.parquet)["']""", str(e)):
                file = root / m[1]  # a relative path is the atlas's (file_search_path); an absolute one stays
                if file.is_relative_to(root) and file.is_file() and not _readable_parquet(file):
                    return self._damaged(str(file.relative_to(root)), f"cannot be read ({first_line(e)})")
        if type(e) is duckdb.Error and self._confined:
            return self._damaged("one of its Parquet files", f"cannot be read ({first_line(e)})")
        return None

    def rows(self, query: str, params: list | None = None) -> list[dict[str, Any]]:
        import duckdb

        self._register_functions(query)
        with self._lock:  # one DuckDB connection per handle: threads (a server, DuckDB's own) take turns
            try:
                cur = self.con.execute(query, params or [])
                cols = [d[0] for d in cur.description]
                return [dict(zip(cols, r)) for r in cur.fetchall()]
            except duckdb.Error as e:
                # The tool's own SQL fails only on a damaged file; DuckDB does not always name it (a Parquet
                # page it cannot decode is a bare duckdb.Error). Other errors are bugs: their traceback shows.
                damage = self._damage(e)
                if damage is None and (isinstance(e, duckdb.IOException) or type(e) is duckdb.Error):
                    damage = self._damaged("one of its Parquet files", f"cannot be read ({first_line(e)})")
                if damage is None:
                    raise
                raise damage from None

    # -- model and geometry --------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.manifest["preprocessing"]["crop"])

    @cached_property
    def model(self):
        """The model with the atlas's own copy of the conv weights (classifier from the weights file if any),
        or of its whole state (model/state.pt). A model rebuilt from the user's code needs consent
        (atlas.models.consent): `--trust-code`, atlas.open(path, trust_code=True), or the model passed."""
        import torch

        from ..models import consent
        from ..models.registry import feature_options, load_model, unvetted
        from ..models.weights import file_sha256

        m = self.manifest["model"]
        given = self._given_model if self._given_model is not None else consent.given(self.path)
        if given is None:
            # what rebuilding would run beyond the closed set of builders (registry.unvetted): only with consent
            code = unvetted(m, f"atlas '{self.path}'")
            if m.get("source") == "object" or (code is not None and not consent.trusted(self.path)):
                raise consent.refusal(self.path, m, code)
        # code is rebuilt only from the record's own path and hash (registry.rebuild), and always with state.pt
        if self._inside("model/state.pt").is_file() or m.get("source") in (*consent.CODE_SOURCES, "object"):
            return self._whole_model(m, given)
        weights = m.get("weights")
        # the file the atlas was built from, for its classifier: read only while it is still those bytes
        use_file = bool(weights) and Path(weights).is_file() and bool(m.get("weights_sha256")) \
            and file_sha256(weights) == m["weights_sha256"]
        kwargs = m.get("kwargs")
        if kwargs is None:  # format 1 did not record the constructor options
            kwargs = {"num_classes": m.get("num_classes")}
            # a build without weights could only use the defaults; one from a checkpoint may not have
            if weights and not use_file and given is None and feature_options(m["name"]):
                raise AtlasError(f"atlas '{self.path}' (format 1) does not record how its {m['name']} was built "
                                 f"(contrast normalisation, width), and its weights file '{weights}' is gone or "
                                 "changed: rebuild the atlas with `atlas build`")
        if given is not None:  # the user's own module: a copy, so that loading the atlas's weights leaves it be
            import copy

            model, use_file = copy.deepcopy(given).eval(), False
            model.atlas_meta = {**(getattr(given, "atlas_meta", None) or {}), "name": m["name"]}
        else:
            model = load_model(m["name"], weights if use_file else None, seed=m.get("seed", 0), **kwargs)
        try:
            state = torch.load(self._inside("model/features.pt"), map_location="cpu", weights_only=True)
            model.features.load_state_dict(state)
        except FileNotFoundError:
            raise self._damaged("model/features.pt", "is missing") from None
        except Exception:  # a truncated or foreign file: torch raises many types
            raise self._damaged("model/features.pt", f"does not hold the weights of the {m['name']} its manifest "
                                "describes") from None
        model.atlas_meta["classifier_from"] = weights if use_file else (
            "the model passed" if given is not None else "random init" if m.get("random_init") else "unavailable")
        return model.eval()

    def _whole_model(self, m: dict[str, Any], given):
        """A model whose whole state the atlas keeps: rebuilt from the record (or the module passed), and
        model/state.pt loaded into it, every key. No weights file is read: the atlas has them all."""
        import copy

        import torch

        from ..models.registry import rebuild

        try:
            state = torch.load(self._inside("model/state.pt"), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise self._damaged("model/state.pt", "is missing") from None
        except Exception:  # a truncated or foreign file: torch raises many types
            raise self._damaged("model/state.pt", "cannot be read") from None
        if given is None:
            model = rebuild(m, state, seed=m.get("seed", 0), label=str(self.path / "model" / "state.pt"))
        else:
            model = copy.deepcopy(given)  # the user's module stays as it was
            model.atlas_meta = {**(getattr(given, "atlas_meta", None) or {}), "name": m["name"]}
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                lines = str(e).strip().splitlines()
                detail = next((ln.strip() for ln in lines[1:] if ln.strip()), lines[0] if lines else "")[:160]
                raise AtlasError(f"the model passed does not fit atlas '{self.path}': {detail}") from None
        model.atlas_meta["classifier_from"] = "atlas"
        return model.eval()

    @property
    def has_classifier(self) -> bool:
        """Whether the model's classifier is the one the atlas was built with: its random init, or its
        weights file, still there and still the same bytes (`model` checks the hash as it loads it: a
        file retrained in place would pair the atlas's conv weights with a classifier they never had)."""
        m = self.manifest["model"]
        if m.get("random_init") or (self.path / "model" / "state.pt").is_file():  # state.pt: the whole model
            return True
        if not (m.get("weights") and Path(m["weights"]).is_file()):
            return False  # no need to load the model to know
        return self.model.atlas_meta["classifier_from"] == m["weights"]

    @cached_property
    def lmap(self):
        from ..net import LayerMap

        return LayerMap(self.model, self.image_size)

    @property
    def layer_names(self) -> list[str]:
        return [la["layer"] for la in self.manifest["layers"]]

    def check_layer(self, layer: str) -> None:
        if layer not in self.layer_names:
            from ..net.layer_base import did_you_mean

            raise AtlasError(f"unknown layer '{layer}' in atlas '{self.path}'{did_you_mean(layer, self.layer_names)}: "
                             f"recorded layers are {', '.join(self.layer_names)}")

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
    def hashes_images(self) -> bool:
        """Whether the build recorded each image's content hash (older atlases did not: their pictures
        draw whatever is at the dataset's paths now)."""
        import pyarrow.parquet as pq

        with self.reading("images.parquet"):
            return "content_hash" in pq.read_schema(self._inside("images.parquet")).names

    @cached_property
    def source(self):
        """The dataset, if it is still where the build found it (else None)."""
        from ..data import open_dataset

        ds = self.manifest["dataset"]
        try:
            return open_dataset(ds["root"])
        except AtlasError:
            return None

    @cached_property
    def preprocess(self):
        from ..data import Preprocess

        return Preprocess(self.manifest["preprocessing"])

    def original(self, image_id: int):
        """The dataset's image as RGB, before preprocessing, or AtlasError if unavailable, unreadable or not
        the image the atlas was built on (its content hash differs)."""
        from ..data import read_cifar_row, read_file, safe_relative

        if not isinstance(image_id, int) or not 0 <= image_id < 2 ** 31:
            raise AtlasError(f"image id {image_id} is not in atlas '{self.path}'")
        rows = self.rows("SELECT * FROM images WHERE image_id = ?", [int(image_id)])
        if not rows:
            raise AtlasError(f"image id {image_id} is not in atlas '{self.path}'")
        ds, path, recorded = self.manifest["dataset"], rows[0]["path"], rows[0].get("content_hash")
        if self.hashes_images and not (isinstance(recorded, str) and HASH.fullmatch(recorded)):
            # the column is there, this row's hash is not: the build could not read the image, or the table
            # was edited; either way there is nothing to check the file against
            raise AtlasError(f"image {image_id} ('{path}') has no content hash in atlas '{self.path}' (unreadable "
                             "when the atlas was built, or the table was edited): it is not read")
        gone = AtlasError(f"image {image_id} ('{path}') is unavailable: the dataset at '{ds['root']}' is gone "
                          "or changed")
        if ds["kind"] == "cifar10":  # a row of a batch file under the root
            if not Path(ds["root"]).is_dir():
                raise gone
            read = lambda: read_cifar_row(Path(ds["root"]), path)  # noqa: E731
        else:  # a file under the root: opened directly, no scan of a dataset that may hold millions
            if not safe_relative(path):  # the images table may come from someone else: stay under the root
                raise AtlasError(f"image {image_id}: its path '{path}' in atlas '{self.path}' leaves the dataset "
                                 "folder (absolute, or through '..'); an atlas draws only its dataset's images")
            file = Path(ds["root"]) / path
            if not file.is_file():
                raise gone
            read = lambda: read_file(file)  # noqa: E731
        try:
            img, digest = read()
        except Exception as e:
            raise AtlasError(f"image {image_id} ('{path}') cannot be read: {e}") from None
        if recorded and digest != recorded:
            raise AtlasError(f"image {image_id} ('{path}') has changed since the atlas was built (its content "
                             "hash differs): the atlas shows only the images it was built on")
        return img

    def image(self, image_id: int):
        """(model input tensor (3, S, S), the cropped RGB PIL image), or AtlasError if unavailable."""
        crop = self.preprocess.crop_image(self.original(image_id))
        return self.preprocess.to_tensor(crop), crop

    # -- switches -----------------------------------------------------------
    def switches(self, layer: str, channel: int, rank: int):
        """{pool: index tensor (C, H, W)} for a top-k entry, decoded from the stored switches.

        Exact inside the unit's receptive field, which is all a unit projection reads.
        """
        from ..deconv.switches import SwitchRegion, decode

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

    def _register_functions(self, query: str) -> None:
        """Put the Python functions a query calls on the connection: none here (pure reading); the
        facade (atlas.facade.Atlas) registers deconv_png, similar_images and similar_channels."""


def _fetch(cur, deadline: Deadline, max_rows: int | None) -> Result:
    """A statement's rows, FETCH_ROWS at a time with the deadline checked between them: a statement
    that makes twenty million rows stops at its limit, not after holding them all."""
    columns, rows = [d[0] for d in cur.description], []
    while True:
        deadline.check()
        batch = cur.fetchmany(FETCH_ROWS)
        rows.extend(batch)
        if max_rows and len(rows) > max_rows:
            return Result(columns, rows[:max_rows], True)
        if len(batch) < FETCH_ROWS:
            return Result(columns, rows)


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise AtlasError(f"bad parameter name '{name}'")
    return name


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _readable_parquet(path: Path) -> bool:
    """Whether a Parquet file's footer reads: an error that names a healthy file of the atlas (a query that
    globs files of different schemas together, say) is the query's, not damage to mend by a rebuild."""
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
        return True
    except Exception:  # pyarrow raises several types for a file that is not Parquet
        return False
