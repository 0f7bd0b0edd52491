"""What the CLI says: layer kinds and one set of column names, "did you mean" for layer names, the
example queries with their parameters, DuckDB's own hints, consent flags last in --help."""
import json

import click
import pytest
from torchvision.models import resnet18

from atlas.cli import main
from atlas.errors import AtlasError
from atlas.net import LayerMap
from cli_helpers import ok, one_line_error


@pytest.fixture(scope="module")
def r18_map():
    return LayerMap(resnet18(weights=None), 64)


def test_layer_kinds_are_the_modules_and_the_columns_are_the_listings(r18_map, tiny_atlas):
    rows = {r["layer"]: r for r in r18_map.candidates(["layer4"])}
    kinds = {n: rows[n]["kind"] for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer1.0.relu_1", "fc")}
    assert kinds == {"conv1": "conv", "bn1": "batchnorm", "relu": "relu", "maxpool": "maxpool", "layer1": "block",
                     "layer1.0.relu_1": "relu", "fc": "fc"}
    assert rows["layer4"]["recorded"] and rows["conv1"]["rf_size"] == 7 and rows["conv1"]["offset"] == -3
    listed = json.loads(ok("layers", tiny_atlas, "--format", "json"))[0]
    every = json.loads(ok("layers", tiny_atlas, "--all", "--format", "json"))[0]
    # the --all listing speaks the plain listing's words, plus whether the atlas recorded the layer
    assert set(every) - set(listed) == {"recorded"}


def test_a_mistyped_layer_gets_the_closest_names_not_all_of_them(r18_map, tiny_atlas):
    with pytest.raises(AtlasError) as e:
        r18_map.resolve("layer4.1.cnv2")
    msg = str(e.value)
    assert "did you mean 'layer4.1.conv2'" in msg and "atlas layers ATLAS --all" in msg and len(msg) < 300
    assert "did you mean 'conv3'" in one_line_error("top", tiny_atlas, "cnv3", 0)


def test_queries_list_their_parameters_and_whole_descriptions():
    rows = {r["name"]: r for r in json.loads(ok("queries", "--format", "json"))}
    assert rows["similar_images"]["parameters"] == "image_id, k, layer"
    assert "Needs the atlas's similarity indexes" in rows["similar_images"]["description"]  # its third line
    assert rows["dead_channels"]["parameters"] == "-" and rows["best_pairs"]["for"] == "comparison"


def test_sql_keeps_duckdbs_hints(tiny_atlas):
    assert 'Did you mean "channels"?' in one_line_error("sql", tiny_atlas, "SELECT * FROM channel")
    assert 'Candidate bindings: "max"' in one_line_error("sql", tiny_atlas, "SELECT mx FROM channels")


def test_consent_flags_come_last_in_every_help():
    consents = {"--trust-code", "--unsafe-full-duckdb", "--overwrite"}
    for name, cmd in main.commands.items():
        # cmd.params, not get_params(): a bare Context would make click cache a help option without -h
        opts = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
        flags = [bool(set(p.opts) & consents) for p in opts]
        assert flags == sorted(flags), f"atlas {name}: a consent flag before another option"
