"""The whole product on graph models: ResNet-18 and DenseNet-121 atlases (random weights, small images)
through build, layers, show (DeconvNet from stored switches and guided backpropagation), filters,
export, similar, occlude, invariance, correspondence and SQL."""
from __future__ import annotations

import json

import pytest
import torch

from atlas import deconv as D
from atlas import open as open_atlas
from cli_helpers import ok, strict_json


@pytest.fixture(scope="module", params=[("resnet18", 32), ("densenet121", 32)], ids=["resnet18", "densenet121"])
def graph_atlas(request, tmp_path_factory):
    from conftest import make_image_folder

    name, size = request.param
    root = tmp_path_factory.mktemp(name)
    data = make_image_folder(root / "data", per_class=4)
    out = root / "atlas"
    ok("build", "--model", name, "--data", data, "--out", out, "--image-size", size, "--k", 3,
       "--batch-size", 4, "--no-progress")
    return name, out


def test_build_records_each_stage_and_its_switches(graph_atlas):
    name, out = graph_atlas
    a = open_atlas(out)
    stages = {"resnet18": ["maxpool", "layer1", "layer2", "layer3", "layer4"],
              "densenet121": ["features.pool0"] + [f"features.denseblock{i}" for i in range(1, 5)]}[name]
    assert a.layer_names == stages
    pools = {r["pool"] for r in a.rows("SELECT DISTINCT pool FROM read_parquet('switches.parquet')")}
    assert pools == {"maxpool" if name == "resnet18" else "features.pool0"}  # their only max-pool
    rows = strict_json(ok("layers", out, "--format", "json"))
    assert [r["layer"] for r in rows] == stages


def test_stored_projections_equal_the_images_own(graph_atlas):
    """A deep unit projects from the stored stem-pool switches alone, exactly as from its image."""
    _, out = graph_atlas
    a = open_atlas(out)
    layer = a.layer_names[-1]
    from atlas.pictures.projections import project

    c = next(r["channel"] for r in a.rows(f"SELECT channel FROM channels WHERE layer = '{layer}' AND max > 0"))
    stored = project(a, layer, c, switches="stored")
    recomputed = project(a, layer, c, switches="recompute")
    assert torch.allclose(stored.images, recomputed.images, rtol=0, atol=1e-5 * float(stored.images.abs().max()))
    best = a.top(layer, c)[0]
    x = a.preprocess.to_tensor(a.image(best["image_id"])[1])[None]
    ref = D.gradient_reference(a.lmap, x, D.Request(0, layer, c, best["y"], best["x"]))
    assert D.relative_error(stored.images[0], ref) < 1e-4  # the atlas's batch shape vs one image: rounding only


def test_show_filters_guided_and_sql(graph_atlas):
    _, out = graph_atlas
    a = open_atlas(out)
    layer = a.layer_names[-1]
    panel = ok("show", out, layer, 0).strip()
    guided = ok("show", out, layer, 0, "--method", "guided").strip()
    assert panel != guided and "guided" in guided and panel.endswith("0-panel.png")
    assert ok("filters", out).strip().endswith(".png")
    got = a.sql(f"SELECT deconv_png('{layer}', 0, 0) AS png").fetchall()[0][0]
    assert got.endswith("0-0.png")
    g = a.sql(f"SELECT deconv_png('{layer}', 0, 0, method := 'guided') AS png").fetchall()[0][0]
    assert g.endswith("0-0.png") and "-guided/" in g and g != got


def test_export_similar_and_the_analyses(graph_atlas, tmp_path):
    name, out = graph_atlas
    site = ok("export", out, tmp_path / "site", "--max-channels", 2, "--layers", open_atlas(out).layer_names[-1])
    assert site.strip().endswith("index.html")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["source"] == "torchvision" and manifest["geometry"].get("graph")
    sim = strict_json(ok("similar", out, "--image-id", 0, "--limit", 2, "--format", "json"))
    assert sim[0]["image_id"] == 0
    ok("occlude", out, 0, "--out", tmp_path / "occ", "--stride", 8, "--size", 12)
    assert (tmp_path / "occ" / "figure.png").is_file()
    if name == "densenet121":  # the analyses below run the same graph code as ResNet's: once is enough
        return
    ok("invariance", out, 0, 1, "--out", tmp_path / "inv")
    assert (tmp_path / "inv" / "figure.png").is_file()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"images": [0, 1, 2], "parts": {"corner": [[0, 0, 8, 8]] * 3,
                                                               "middle": [[12, 12, 20, 20]] * 3}}))
    ok("correspondence", out, "--images", spec, "--out", tmp_path / "cor")


def test_a_model_without_deconvnet_rules_still_gets_its_atlas(tmp_path):
    """MobileNetV3 (hardswish, squeeze-and-excitation gates): the atlas is built and exported with its
    patches; a projection is refused in one line naming the operation and where it sits."""
    from cli_helpers import one_line_error
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=3)
    out = tmp_path / "atlas"
    ok("build", "--model", "mobilenet_v3_small", "--data", data, "--out", out, "--image-size", 32, "--k", 2,
       "--batch-size", 4, "--no-progress")
    layer = open_atlas(out).layer_names[-1]
    assert "Hardswish at features.0.2 has no DeconvNet rule" in one_line_error("show", out, layer, 0)
    ok("export", out, tmp_path / "site", "--max-channels", 1, "--layers", layer)
    page = (tmp_path / "site" / layer / "0.html").read_text()
    assert "no projection" in page and page.count('src="../img/patches/') >= 1  # the patches, shared by the site
