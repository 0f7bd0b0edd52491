"""An atlas rebuilds its own model: the manifest records every constructor option, so an atlas whose weights
file is gone reopens with exactly the architecture it was built with. And --contrast-norm/--no-contrast-norm."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import atlas
from atlas.build import build
from atlas.cli import main
from cli_helpers import one_line_error

OPTS = dict(k=2, batch_size=8, image_size=32, index=False, progress=False)


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output




def checkpoint(path, name, **kwargs):
    """A checkpoint whose meta sets constructor options, as a user's own training script might write it."""
    net = atlas.load_model(name, **kwargs)
    torch.save({"model_state": net.state_dict(), "meta": {"model": name, **kwargs}}, path)
    return net


def has_lrn(model) -> bool:
    return any(isinstance(m, nn.LocalResponseNorm) for m in model.features)


def features_out(model, x):
    with torch.inference_mode():
        return model.features(x)


@pytest.mark.parametrize("name,options,size", [("zfnet-mini", {"contrast_norm": True}, 32),
                                                ("zfnet-mini", {"width": 16}, 32),
                                                ("zfnet", {"contrast_norm": False}, 224)])
def test_an_atlas_whose_weights_are_gone_rebuilds_its_own_model(tmp_path, tiny_folder, name, options, size):
    weights = tmp_path / "w.pt"
    net = checkpoint(weights, name, **options)
    opts = {**OPTS, "image_size": size, "layers": "conv1,conv2"} if name == "zfnet" else OPTS
    if name == "zfnet":
        opts.pop("image_size")
    out = build(name, str(tiny_folder), tmp_path / "a", weights=str(weights), **opts)
    recorded = json.loads((out / "manifest.json").read_text())["model"]
    assert recorded["source"] == "atlas" and recorded["name"] == name
    for key, value in options.items():
        assert recorded["kwargs"][key] == value
    weights.unlink()
    a = atlas.open(out)
    assert a.model.atlas_meta["classifier_from"] == "unavailable"
    assert has_lrn(a.model) == has_lrn(net)
    x = torch.randn(2, 3, size, size)
    assert torch.equal(features_out(a.model, x), features_out(net.eval(), x))
    code, text = cli("show", out, "conv2", 0)  # width 16 used to be a traceback here
    assert code == 0, text


def test_contrast_norm_is_a_build_option(tmp_path, tiny_folder, tiny_atlas):
    on = tmp_path / "on"
    code, text = cli("build", "--model", "zfnet-mini", "--data", tiny_folder, "--out", on, "--image-size", 32,
                     "--k", 2, "--no-index", "--no-progress", "--contrast-norm")
    assert code == 0, text
    assert atlas.open(on).manifest["model"]["kwargs"]["contrast_norm"] is True
    assert has_lrn(atlas.open(on).model)
    off = tiny_atlas  # built without the flag: zfnet-mini's own choice, off
    assert atlas.open(off).manifest["model"]["kwargs"]["contrast_norm"] is False
    assert not has_lrn(atlas.open(off).model)
    assert "vgg11" in one_line_error("build", "--model", "vgg11", "--data", tiny_folder, "--out",
                                     tmp_path / "vgg", "--no-contrast-norm")
    assert not (tmp_path / "vgg").exists() and not (tmp_path / "vgg.partial").exists()
    # a checkpoint's own choice is the default; an explicit flag overrides it and is recorded
    weights = tmp_path / "lrn.pt"
    checkpoint(weights, "zfnet-mini", contrast_norm=True)
    forced = build("zfnet-mini", str(tiny_folder), tmp_path / "forced", weights=str(weights),
                   contrast_norm=False, **OPTS)
    assert atlas.open(forced).manifest["model"]["kwargs"]["contrast_norm"] is False


def test_resume_refuses_another_contrast_norm(tmp_path, tiny_folder, interrupt_build):
    out = interrupt_build("zfnet-mini", str(tiny_folder), tmp_path / "a", after=0, chunk_size=8, **OPTS)
    with pytest.raises(atlas.AtlasError, match="model_kwargs"):
        build("zfnet-mini", str(tiny_folder), out, chunk_size=8, resume=True, contrast_norm=True, **OPTS)


def test_contrast_norm_is_a_training_option(tmp_path, tiny_folder):
    run = tmp_path / "run"
    code, text = cli("train", "--model", "zfnet-mini", "--data", tiny_folder, "--out", run, "--epochs", 1,
                     "--image-size", 32, "--batch-size", 16, "--no-progress", "--contrast-norm")
    assert code == 0, text
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["contrast_norm"] is True
    meta = torch.load(run / "final.pt", weights_only=True)["meta"]
    assert meta["model_kwargs"]["contrast_norm"] is True and meta["model_kwargs"]["width"] == 32
    assert has_lrn(atlas.load_model("zfnet-mini", weights=run / "final.pt"))
    assert "vgg11" in one_line_error("train", "--model", "vgg11", "--data", tiny_folder, "--out",
                                     tmp_path / "run2", "--contrast-norm")


def test_format_1_atlases_are_read_and_say_what_they_cannot_rebuild(tmp_path, tiny_folder):
    weights = tmp_path / "w.pt"
    checkpoint(weights, "zfnet-mini", contrast_norm=True)
    out = build("zfnet-mini", str(tiny_folder), tmp_path / "a", weights=str(weights), **OPTS)
    old = json.loads((out / "manifest.json").read_text())
    old["format_version"] = 1
    for key in ("kwargs", "source"):
        old["model"].pop(key)
    (out / "manifest.json").write_text(json.dumps(old))
    # with its weights file, a format-1 atlas rebuilds its model from the checkpoint's meta
    assert has_lrn(atlas.open(out).model)
    code, text = cli("top", out, "conv1", 0)
    assert code == 0, text
    # without it, the options are unknown: one line, not a guess
    weights.unlink()
    assert "format 1" in one_line_error("show", out, "conv1", 0)
    shutil.rmtree(out)


def test_a_weights_file_changed_since_the_build_is_not_the_atlas_classifier(tmp_path, tiny_folder):
    weights = tmp_path / "w.pt"
    checkpoint(weights, "zfnet-mini")
    out = build("zfnet-mini", str(tiny_folder), tmp_path / "a", weights=str(weights), **OPTS)
    assert atlas.open(out).has_classifier
    checkpoint(weights, "zfnet-mini", width=32, dropout=0.1)  # retrained in place: other bytes, same path
    torch.save({"model_state": atlas.load_model("zfnet-mini", seed=5).state_dict(), "meta": {"model": "zfnet-mini"}},
               weights)
    a = atlas.open(out)
    assert not a.has_classifier and a.model.atlas_meta["classifier_from"] == "unavailable"
    err = one_line_error("index", out, "--layers", "fc7", "--no-progress")
    assert "changed" in err


def test_a_format_1_atlas_built_without_weights_reopens(own_atlas):
    out = own_atlas  # built without weights; its manifest is made format 1 below
    want = atlas.open(out).model
    old = json.loads((out / "manifest.json").read_text())
    old["format_version"] = 1
    for key in ("kwargs", "source"):
        old["model"].pop(key)
    (out / "manifest.json").write_text(json.dumps(old))
    got = atlas.open(out).model  # the defaults were all such a build could use
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(features_out(got, x), features_out(want, x))
