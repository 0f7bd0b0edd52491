"""`atlas demo --quick` end to end through the CLI, then the atlas it made is queried with `atlas sql`."""
import json

import pytest

from click.testing import CliRunner

import atlas
from atlas.cli import main

pytestmark = pytest.mark.slow  # a real browser / the whole demo: pytest -m 'not slow' skips them


def test_demo_quick_end_to_end_then_sql(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner()
    res = r.invoke(main, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    path = out / "atlas"
    assert f"Your atlas: {path}" in res.output
    # every command the demo suggests exists
    suggested = [line.split()[1] for line in res.output.splitlines() if line.startswith("  atlas ")]
    assert {"info", "top", "sql", "export"} <= set(suggested)
    assert all(cmd in main.commands for cmd in suggested)

    a = atlas.open(path)
    m = a.manifest
    assert m["model"]["name"] == "zfnet-mini" and not m["model"]["random_init"]
    assert m["model"]["weights"] == str((out / "run" / "final.pt").resolve())
    assert m["dataset"]["count"] == 400 and m["dataset"]["errors"] == 0 and len(m["dataset"]["classes"]) >= 10
    assert (out / "run" / "snapshots").is_dir() and (out / "run" / "metrics.csv").is_file()

    res = r.invoke(main, ["sql", str(path), "SELECT layer, count(*) AS n, sum(value > 0)::INT AS firing "
                          "FROM top_activations GROUP BY layer ORDER BY layer", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    channels = {la["layer"]: la["channels"] for la in m["layers"]}
    assert [row["layer"] for row in rows] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    for row in rows:  # k = 9 for every channel of every layer
        assert row["n"] == 9 * channels[row["layer"]]
    # a trained conv1 fires on most images: its strongest activations are positive
    assert rows[0]["firing"] == rows[0]["n"]

    res = r.invoke(main, ["sql", str(path), "-q", "class_selectivity", "-p", "label=circle", "--format", "json"])
    assert res.exit_code == 0, res.output
    sel = json.loads(res.output)
    assert sel and {row["label"] for row in sel} == {"circle"}

    # the same data through the documented Python API
    n_images = a.sql("SELECT count(*) FROM images WHERE status = 'ok'").fetchall()[0][0]
    assert n_images == 400


def test_the_demo_trains_a_modern_net_end_to_end(tmp_path):
    out = tmp_path / "r18"
    res = CliRunner().invoke(main, ["demo", "--model", "resnet18", "--quick", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    a = atlas.open(out / "atlas")
    assert a.manifest["model"]["name"] == "resnet18" and not a.manifest["model"]["random_init"]
    assert a.layer_names[-1] == "layer4" and f"atlas show {out / 'atlas'} " in res.output
    assert len(a.top("layer4", 0)) == 9
