"""What the reading commands make of bad input and damaged atlases (one line each), and what they print (JSON
that any strict reader takes, ranks that count from 0 everywhere)."""
import json
import shutil

from click.testing import CliRunner

import atlas
from atlas.cli import main
from cli_helpers import ok, one_line_error, strict_json




def damaged(tiny_atlas, tmp_path, name, change):
    a = tmp_path / name
    shutil.copytree(tiny_atlas, a)
    change(a)
    return a


def test_a_damaged_atlas_is_one_line_naming_the_file_and_the_fix(tiny_atlas, tmp_path):
    cases = {
        "channels.parquet is missing": damaged(tiny_atlas, tmp_path, "nochannels",
                                               lambda a: (a / "channels.parquet").unlink()),
        "top_activations.parquet is missing": damaged(tiny_atlas, tmp_path, "notop",
                                                      lambda a: (a / "top_activations.parquet").unlink()),
        "images.parquet cannot be read": damaged(tiny_atlas, tmp_path, "garbage",
                                                 lambda a: (a / "images.parquet").write_bytes(b"garbage " * 64)),
    }
    trunc = tmp_path / "truncated"
    shutil.copytree(tiny_atlas, trunc)
    data = (trunc / "images.parquet").read_bytes()
    (trunc / "images.parquet").write_bytes(data[: len(data) // 2])
    cases["images.parquet cannot be read "] = trunc
    for what, a in cases.items():
        for args in (("layers", a), ("top", a, "conv5", 3), ("channels", a, "conv2"),
                     ("sql", a, "SELECT count(*) FROM layers")):
            msg = one_line_error(*args)
            assert f"atlas '{a}' is damaged: {what.strip()}" in msg, (args, msg)
            assert "atlas build" in msg and "--overwrite" in msg, msg
    assert "zfnet-mini" in ok("info", cases["channels.parquet is missing"])  # the manifest alone still answers


def test_json_is_strict_with_lists_structs_dates_and_bytes(tiny_atlas):
    sql = ("SELECT 'inf'::DOUBLE AS inf, 'nan'::DOUBLE AS nan, -'inf'::FLOAT AS ninf, [1.5, 'nan'::DOUBLE] AS xs, "
           "{'layer': 'conv1', 'ch': [1, 2]} AS st, DATE '2020-01-02' AS d, TIMESTAMP '2020-01-02 03:04:05' AS ts, "
           "'\\xAA\\xBB'::BLOB AS b, 1.25::DECIMAL(5, 2) AS dec, MAP {'k': 1} AS m, INTERVAL 90 MINUTE AS iv")
    row = strict_json(ok("sql", tiny_atlas, sql, "--format", "json"))[0]
    assert row == {"inf": None, "nan": None, "ninf": None, "xs": [1.5, None], "st": {"layer": "conv1", "ch": [1, 2]},
                   "d": "2020-01-02", "ts": "2020-01-02T03:04:05", "b": "<2 bytes>", "dec": 1.25, "m": {"k": 1},
                   "iv": "P0DT1H30M0S"}
    # a list cell in a table reads as JSON too, not as a Python repr
    assert '["conv1", "conv2"]' in ok("sql", tiny_atlas, "SELECT ['conv1', 'conv2'] AS l")
    for args in (("layers", tiny_atlas), ("channels", tiny_atlas, "conv1"), ("top", tiny_atlas, "conv1", 0),
                 ("queries",), ("sql", tiny_atlas, "-q", "layer_summary")):
        assert isinstance(strict_json(ok(*args, "--format", "json")), list), args
    manifest = json.loads((tiny_atlas / "manifest.json").read_text())
    assert strict_json(ok("info", tiny_atlas, "--format", "json")) == manifest
    assert strict_json(ok("info", tiny_atlas, "--json")) == manifest


def test_info_json_has_no_nan(tiny_atlas, tmp_path):
    a = tmp_path / "nan"
    shutil.copytree(tiny_atlas, a)
    mf = json.loads((a / "manifest.json").read_text())
    mf["timings"]["images_per_s"] = float("inf")  # Python's json writes (and reads) Infinity
    (a / "manifest.json").write_text(json.dumps(mf))
    assert strict_json(ok("info", a, "--json"))["timings"]["images_per_s"] is None


def test_a_limit_below_one_is_refused(tiny_atlas):
    for bad in ("0", "-5", "x"):
        msg = one_line_error("channels", tiny_atlas, "conv1", "--limit", bad)
        assert "--limit" in msg and "at least 1" in msg and f"'{bad}'" in msg, msg
    rows = strict_json(ok("channels", tiny_atlas, "conv1", "--limit", 2, "--format", "json"))
    assert [r["channel"] for r in rows] == [0, 1]


def test_a_negative_channel_is_out_of_range_not_an_option(tiny_atlas):
    for cmd in ("top", "show"):
        for channel in ("-1", "-32", "32"):
            msg = one_line_error(cmd, tiny_atlas, "conv1", channel)
            assert msg == f"Error: channel {channel} is out of range for conv1 (0..31)", msg
    assert "not a channel number" in one_line_error("top", tiny_atlas, "conv1", "x")
    assert one_line_error("top", tiny_atlas, "conv1", "-1", "--format", "json") == \
        "Error: channel -1 is out of range for conv1 (0..31)"  # options still read after it
    assert len(ok("top", tiny_atlas, "--format", "csv", "conv1", "0").splitlines()) == 1 + 4


def test_info_on_a_file_says_it_is_a_file(tiny_atlas, tmp_path):
    msg = one_line_error("info", tiny_atlas / "manifest.json")
    assert "is a file, not an atlas folder" in msg and "manifest.json" in msg
    assert "does not exist" in one_line_error("info", tmp_path / "nowhere")


def test_similar_ranks_count_from_zero_like_top(tiny_atlas):
    top = strict_json(ok("top", tiny_atlas, "conv5", 3, "--format", "json"))
    assert top[0]["rank"] == 0
    rows = strict_json(ok("similar", tiny_atlas, "--image-id", 5, "-k", 3, "--format", "json"))
    assert [r["rank"] for r in rows] == [0, 1, 2] and rows[0]["image_id"] == 5
    csv = ok("similar", tiny_atlas, "--channel", "conv5:1", "-k", 2, "--format", "csv").splitlines()
    assert [line.split(",")[0] for line in csv] == ["rank", "0", "1"]
    assert ok("similar", tiny_atlas, "--image-id", 5, "-k", 1).splitlines()[2].split()[:2] == ["0", "5"]
    a = atlas.open(tiny_atlas)
    assert [r["rank"] for r in a.similar_images(image_id=5, k=2)] == [0, 1]
    assert [r["rank"] for r in a.similar_channels("conv5:1", k=2)] == [0, 1]
    assert [r[0] for r in a.sql("SELECT rank FROM similar_images(5, 2) ORDER BY rank").fetchall()] == [0, 1]
    assert [r[0] for r in a.sql("SELECT rank FROM similar_channels('conv5', 1, 2) ORDER BY rank").fetchall()] == \
        [0, 1]


def test_a_query_mistake_over_healthy_files_is_not_called_damage(tiny_atlas):
    res = CliRunner().invoke(main, ["sql", str(tiny_atlas),
                                    f"SELECT * FROM read_parquet('{tiny_atlas}/*.parquet')"])
    assert res.exit_code != 0 and "damaged" not in res.output and "--overwrite" not in res.output, res.output


def test_truncated_files_read_directly_are_one_line(tmp_path, tiny_atlas):
    import shutil

    for rel, args in (("images.parquet", ["similar", "{a}", "--image-id", "1"]),
                      ("model/features.pt", ["show", "{a}", "conv2", "0"])):
        a = tmp_path / rel.replace("/", "-")
        shutil.copytree(tiny_atlas, a)
        shutil.rmtree(a / "cache", ignore_errors=True)
        data = (a / rel).read_bytes()
        (a / rel).write_bytes(data[:len(data) // 2])
        res = CliRunner().invoke(main, [x.format(a=a) for x in args])
        text = res.output.strip()
        assert res.exit_code != 0 and "Traceback" not in text and len(text.splitlines()) == 1, text
        assert "damaged" in text and rel in text, text
