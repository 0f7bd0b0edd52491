"""`atlas sql` reads the atlas and nothing else, writes nothing, and stops at its time limit.

Each refusal is checked on a copy of the tiny atlas, with the file system looked at afterwards: a statement
that got through would show as a file written, a file read back, or an atlas that no longer answers.
"""
import shutil
import time
from pathlib import Path

import pytest

import atlas
from cli_helpers import ok, one_line_error, strict_json  # noqa: F401
from atlas.errors import AtlasError
from atlas.store import canned_queries




@pytest.fixture
def copy(tiny_atlas, tmp_path) -> Path:
    a = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, a)
    return a


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_files_outside_the_atlas_are_not_read(copy, tiny_folder):
    image = next(tiny_folder.rglob("*.png"))  # the dataset itself lies outside the atlas folder
    for sql in ("SELECT * FROM read_csv('/etc/passwd')",
                "SELECT content FROM read_text('/etc/passwd')",
                f"SELECT * FROM glob('{Path.home()}/*')",
                f"SELECT * FROM read_blob('{image}')",
                f"SELECT * FROM read_blob('{copy}/../../{image.relative_to(image.anchor)}')",  # .. out of it
                "SELECT * FROM query('SELECT * FROM read_csv(''/etc/passwd'')')",
                "SELECT * FROM read_parquet('https://example.com/x.parquet')"):
        msg = one_line_error("sql", copy, sql)
        assert msg.startswith("Error: SQL refused:") and "reads only the atlas folder" in msg, (sql, msg)
        assert "--unsafe-full-duckdb" in msg and "root:" not in msg
    assert "is a relative path" in one_line_error("sql", copy, "SELECT * FROM read_parquet('switches.parquet')")
    # its own files are the atlas's, by absolute path
    out = strict_json(ok("sql", copy, f"SELECT count(*) AS n FROM read_parquet('{copy.resolve()}/switches.parquet')",
                         "--format", "json"))
    assert out[0]["n"] > 0


def test_nothing_is_written_and_no_setting_changes(copy, tmp_path):
    before = listing(tmp_path)
    images = (copy / "images.parquet").read_bytes()
    refused = {
        f"COPY (SELECT * FROM images LIMIT 1) TO '{copy}/images.parquet' (FORMAT parquet)": "COPY",
        f"COPY images TO '{tmp_path}/out.csv'": "COPY",
        f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp_path}/explained.csv'": "COPY",
        f"ATTACH '{tmp_path}/new.db'": "ATTACH",
        f"ATTACH '{copy}/new.db'": "ATTACH",
        f"EXPORT DATABASE '{tmp_path}/export'": "EXPORT",
        "INSTALL httpfs": "INSTALL",
        "LOAD httpfs": "LOAD",
        "CREATE TABLE t AS SELECT 1": "CREATE",
        "CREATE OR REPLACE VIEW images AS SELECT 1 AS image_id": "CREATE",
        "SET threads = 1": "SET threads",
        "SET enable_external_access = true": "SET enable_external_access",
        "RESET allowed_directories": "RESET allowed_directories",
        "PRAGMA enable_profiling": "PRAGMA enable_profiling",
        "CALL duckdb_settings()": "CALL",
        # refused as a whole: the first statement does not run either
        f"SELECT 1; COPY images TO '{tmp_path}/second.csv'": "COPY",
    }
    for sql, kind in refused.items():
        msg = one_line_error("sql", copy, sql)
        assert msg.startswith("Error: SQL refused:") and f" is {kind}, " in msg and "read-only" in msg, (sql, msg)
        assert "--unsafe-full-duckdb" in msg
    for name in ("--query", "-q"):  # a named query goes through the same door
        assert "SQL refused" not in ok("sql", copy, name, "dead_channels")
    assert listing(tmp_path) == before and (copy / "images.parquet").read_bytes() == images
    assert len(ok("top", copy, "conv5", 3).splitlines()) == 2 + 4  # the atlas still answers


def test_every_view_named_query_parameter_and_function_still_works(copy):
    counts = strict_json(ok("sql", copy, "SELECT (SELECT count(*) FROM images) AS images, (SELECT count(*) FROM "
                            "layers) AS layers, (SELECT count(*) FROM channels) AS channels, (SELECT count(*) FROM "
                            "top_activations) AS tops, (SELECT count(*) FROM activations) AS acts",
                            "--format", "json"))[0]
    assert counts == {"images": 36, "layers": 5, "channels": 352, "tops": 4 * 352, "acts": 36 * 352}
    for name in canned_queries():
        extra = ["-p", "layer=conv4", "-p", "channel=2"] if name == "channel_gallery" else []
        rows = strict_json(ok("sql", copy, "-q", name, *extra, "--format", "json"))
        assert isinstance(rows, list), name
        if name == "channel_gallery":
            assert rows and all(Path(r["projection"]).is_file() for r in rows)  # rendered into the atlas
        if name == "similar_images":
            assert rows[0]["rank"] == 0 and rows[0]["image_id"] == 0
    sel = strict_json(ok("sql", copy, "-q", "class_selectivity", "-p", "label=red", "--format", "json"))
    assert {r["label"] for r in sel} == {"red"}
    # read-only forms, each statement's result in order, a SQL variable set in the script
    script = ("SET VARIABLE layer = 'conv2'; "
              "SELECT channels FROM layers WHERE layer = getvariable('layer'); "
              "SHOW TABLES; DESCRIBE images; SUMMARIZE channels; EXPLAIN SELECT 1; PRAGMA table_info('images'); "
              "VALUES (1), (2); FROM channels LIMIT 1; "
              "SELECT * FROM similar_images(3, 2); SELECT * FROM similar_channels('conv5', 1, 2); "
              "SELECT deconv_png('conv3', 0, 0) AS png")
    out = strict_json(ok("sql", copy, script, "--format", "json"))
    assert len(out) == 11 and out[0] == [{"channels": 64}]
    assert {"images", "channels", "top_activations"} <= {r["name"] for r in out[1]}
    assert [r["column_name"] for r in out[2]][:2] == ["image_id", "path"]
    assert [r["rank"] for r in out[8]] == [0, 1] and out[8][0]["image_id"] == 3
    assert [r["rank"] for r in out[9]] == [0, 1]
    assert Path(out[10][0]["png"]).is_file()


def test_several_statements_show_each_result_in_order(tiny_atlas):
    sql = "SELECT 1 AS a; SELECT 'x' AS b, 2 AS c"
    table = ok("sql", tiny_atlas, sql)
    assert table.split("\n\n") == ["a\n-\n1", "b  c\n-  -\nx  2\n"]
    assert ok("sql", tiny_atlas, sql, "--format", "csv") == "a\n1\n\nb,c\nx,2\n"
    assert strict_json(ok("sql", tiny_atlas, sql, "--format", "json")) == [[{"a": 1}], [{"b": "x", "c": 2}]]
    # one result alone is its list of rows, as before; a SET VARIABLE gives none
    assert strict_json(ok("sql", tiny_atlas, "SET VARIABLE v = 7; SELECT getvariable('v') AS v",
                          "--format", "json")) == [{"v": 7}]
    assert "no statement" in one_line_error("sql", tiny_atlas, "/* nothing */")


def test_a_query_stops_at_its_time_limit(tiny_atlas):
    endless = "SELECT sum(hash(range)) FROM range(1000000000000000)"
    t0 = time.perf_counter()
    msg = one_line_error("sql", tiny_atlas, endless, "--timeout", "0.5")
    assert msg == "Error: query interrupted after 0.5 s (--timeout)" and time.perf_counter() - t0 < 20
    # the limit covers the whole script, and the connection answers again afterwards
    a = atlas.open(tiny_atlas)
    with pytest.raises(AtlasError, match=r"interrupted after 0.3 s"):
        a.query(f"SELECT 1; {endless}", timeout=0.3)
    assert a.query("SELECT count(*) FROM images", timeout=5)[0].rows == [(36,)]
    assert "--timeout" in ok("sql", "--help") and "deconv_png" in ok("sql", "--help")


def test_the_unsafe_flag_opens_duckdb_in_full_and_the_python_api_stays_unconfined(copy, tmp_path):
    out = tmp_path / "out.csv"
    ok("sql", copy, "--unsafe-full-duckdb", f"COPY (SELECT image_id FROM images) TO '{out}'")
    assert out.read_text().splitlines()[:2] == ["image_id", "0"]
    csv = ok("sql", copy, "--unsafe-full-duckdb", "SELECT count(*) AS n FROM read_parquet('switches.parquet')",
             "--format", "csv")
    assert int(csv.splitlines()[1]) > 0
    a = atlas.open(copy)
    # the Python API runs in the user's own process: DuckDB in full, relative paths inside the atlas
    assert a.sql("SELECT count(*) FROM read_parquet('switches.parquet')").fetchall()[0][0] > 0
    assert a.query("SELECT count(*) FROM read_csv('/etc/passwd', header = false)", confined=False)[0].rows[0][0] > 0
    with pytest.raises(AtlasError, match="SQL refused"):
        a.query("SELECT * FROM read_csv('/etc/passwd')")  # confined unless asked
