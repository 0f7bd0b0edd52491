"""Where models come from (issue 15): our names, torchvision's, timm's, a user's own code and a module passed
from Python, each with the weight files it is found with in the wild, its own preprocessing, the record an
atlas keeps to rebuild it, and the consent rule for code named in a manifest.

Tiny models and small inputs only; nothing is downloaded (every weights file here is written by the test)."""
import json
import shutil
import sys
import textwrap
from pathlib import Path

import click
import pytest
import torch
import torchvision
from click.testing import CliRunner

import atlas
from atlas.cli import main
from atlas.errors import AtlasError
from atlas.models import consent, from_torchvision
from atlas.models.registry import (adopt, load_model, model_names, model_record, preprocessing_for, source_of,
                                   trainable_names)
from cli_helpers import one_line_error

NET_FILE = Path(__file__).resolve().parent / "models" / "functional_net.py"
NET = f"{NET_FILE}:make_model"
IMAGENET = [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert len(text.splitlines()) == 1, text
    return text


def normalise(x, mean, std):
    return (x - torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def no_leftover_consent():
    yield
    consent._trusted.clear()
    consent._given.clear()
    consent.trust_command(False)


# ---------------------------------------------------------------------------------------------------------
# every spec form
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "mynets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "small.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def make(num_classes=4):
            net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(4, num_classes))
            net.image_size = 24
            return net
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield "mynets.small:make"
    for name in [m for m in sys.modules if m.startswith("mynets")]:
        del sys.modules[name]


@pytest.mark.parametrize("spec,source", [("zfnet-mini", "atlas"), ("resnet18", "torchvision"),
                                         ("squeezenet1_1", "torchvision"), ("timm:test_resnet", "timm"),
                                         (NET, "file"), ("user_package", "module")])
def test_each_spec_form_loads_seeded_in_eval_mode(spec, source, request):
    if spec == "user_package":
        spec = request.getfixturevalue("user_package")
    a, b, c = load_model(spec, seed=1), load_model(spec, seed=1), load_model(spec, seed=2)
    assert not a.training and source_of(spec) == source
    assert same_weights(a, b) and not same_weights(a, c)  # random init: the seed's, every time
    meta = a.atlas_meta
    assert meta["name"] == spec and meta["random_init"] and meta["weights"] is None and meta["seed"] == 1
    assert meta["source"] == source and isinstance(meta["kwargs"], dict)
    record = model_record(a)
    assert record["source"] == source and record["name"] == spec
    json.dumps(record)  # the manifest is JSON
    pre = preprocessing_for(spec, model=a)
    assert {"resize", "crop", "mean", "std", "note"} <= set(pre) and pre["crop"] >= 1


def test_model_names_lists_ours_torchvisions_and_the_spec_forms():
    names = model_names()
    for n in ("zfnet", "zfnet-mini", "alexnet-single", "resnet50", "vgg16_bn", "googlenet", "densenet121",
              "inception_v3", "resnext50_32x4d", "wide_resnet50_2", "squeezenet1_1", "mobilenet_v2",
              "timm:NAME", "FILE.py:FACTORY", "package.module:FACTORY"):
        assert n in names, n
    trainable = trainable_names()  # ours and every torchvision classifier; never a spec form (code)
    assert "resnet50" in trainable and "vgg16" in trainable and not any(":" in n for n in trainable)


@pytest.mark.parametrize("spec,words", [
    ("resnet5", ["unknown model 'resnet5'", "resnet50"]),
    ("no/such/net.py:make_model", ["does not exist"]),
    (f"{NET_FILE}:nope", ["has no 'nope'", "make_model"]),
    (f"{NET_FILE}:not_a_model", ["returned a str, not a torch.nn.Module"]),
    ("no_such_pkg.nets:make", ["cannot be imported", "no_such_pkg"]),
    ("timm:no_such_timm_net", ["unknown timm model"]),
])
def test_bad_specs_are_one_line(spec, words):
    with pytest.raises(AtlasError) as e:
        load_model(spec)
    text = one_line(e)
    assert all(w in text for w in words), text


def test_timm_not_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(AtlasError) as e:
        load_model("timm:resnet18")
    assert "pip install timm" in one_line(e)


def test_a_factory_that_fails_says_where_in_one_line(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("def make():\n    raise ValueError('no GPU here\\nsecond line')\n")
    with pytest.raises(AtlasError) as e:
        load_model(f"{f}:make")
    assert "make() in model file" in one_line(e) and "ValueError: no GPU here" in str(e.value)
    f.write_text("import no_such_module_anywhere\n")
    with pytest.raises(AtlasError) as e:
        load_model(f"{f}:make")
    assert "failed to run" in one_line(e)


def test_build_refuses_a_bad_model_in_one_line(tmp_path, tiny_folder):
    for spec in ("resnet5", f"{NET_FILE}:nope", "no/such.py:make"):
        one_line_error("build", "--model", spec, "--data", tiny_folder, "--out", tmp_path / "a", "--no-progress")
        assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
    assert "three numbers" in one_line_error("build", "--model", "zfnet-mini", "--data", tiny_folder, "--out",
                                             tmp_path / "a", "--mean", "0.5,0.5")
    assert "--std must be above zero" in one_line_error("build", "--model", "zfnet-mini", "--data", tiny_folder,
                                                        "--out", tmp_path / "a", "--std", "0.5,0,0.5")


# ---------------------------------------------------------------------------------------------------------
# torchvision's files, as torchvision writes them
# ---------------------------------------------------------------------------------------------------------
def test_a_torchvision_state_dict_loads_by_name(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "resnet18-f37072fd.pth"  # named as torchvision's hub cache names it
    torch.save(ref.state_dict(), path)
    net = load_model("resnet18", weights=path)
    assert same_weights(net, ref) and net.atlas_meta["kwargs"]["num_classes"] == 10  # classes from the file
    assert not net.atlas_meta["random_init"] and net.atlas_meta["weights_sha256"]
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(net(x), ref(x))
    assert model_record(net) == {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}}
    # not torchvision's own file (its hash is not in the name): the default entry's preprocessing, no classes
    assert net.atlas_meta.get("classes") is None and "default" in net.atlas_meta["preprocessing"]["note"]
    pre = preprocessing_for("resnet18", model=net)
    assert (pre["resize"], pre["crop"], [pre["mean"], pre["std"]]) == (256, 224, IMAGENET)
    assert preprocessing_for("resnet18", 64, model=net)["crop"] == 64


def test_a_file_is_matched_to_its_torchvision_weights_by_its_hash():
    v1, matched = from_torchvision.weights_entry("resnet50", "0676ba61" + "0" * 56)  # resnet50-0676ba61.pth
    assert matched and v1.name == "IMAGENET1K_V1"
    assert from_torchvision.preprocessing("resnet50", v1)["resize"] == 256
    v2, matched = from_torchvision.weights_entry("resnet50", "11ad3fa6" + "0" * 56)
    assert matched and v2.name == "IMAGENET1K_V2" and from_torchvision.preprocessing("resnet50", v2)["resize"] == 232
    assert len(from_torchvision.categories(v1, 1000)) == 1000 and from_torchvision.categories(v1, 10) is None
    assert from_torchvision.weights_entry("resnet50", "f" * 64)[1] is False


def test_inception_v3_takes_299_and_refuses_under_75_px():
    pre = preprocessing_for("inception_v3")
    assert (pre["resize"], pre["crop"]) == (342, 299)
    with pytest.raises(AtlasError) as e:
        preprocessing_for("inception_v3", 64)
    assert "at least 75 px" in one_line(e)
    assert preprocessing_for("inception_v3", 75)["crop"] == 75


def test_an_old_densenet_file_is_renamed_as_torchvision_does(tmp_path):
    import re

    torch.manual_seed(0)
    ref = torchvision.models.densenet121(weights=None, num_classes=5).eval()
    old = {}
    for key, v in ref.state_dict().items():  # the names of files from before '.' left module names
        renamed = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)
        if renamed == key or not key.endswith("num_batches_tracked"):  # old files had no counter
            old[renamed] = v
    assert any(".norm.1.weight" in k for k in old)
    path = tmp_path / "densenet121-old.pth"
    torch.save(old, path)
    net = load_model("densenet121", weights=path)
    mine, theirs = net.state_dict(), ref.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if not k.endswith("num_batches_tracked"))


def test_googlenet_aux_heads_and_transform_input_fold_into_the_preprocessing(tmp_path):
    torch.manual_seed(0)
    # the model torchvision's pretrained file is for: aux heads, and the input transform in its forward
    ref = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    # batch-norm statistics of real activations: with the initial ones the logits hardly depend on the image
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        ref.train()(torch.rand(4, 3, 48, 48))
    ref.eval()
    path = tmp_path / "googlenet.pth"
    torch.save(ref.state_dict(), path)
    assert any(k.startswith("aux1.") for k in ref.state_dict())
    net = load_model("googlenet", weights=path)
    assert net.aux1 is None and not net.transform_input  # plain convolutions, no unused heads
    pre = net.atlas_meta["preprocessing"]
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3 and "transform_input" in pre["note"]
    assert model_record(net)["kwargs"]["transform_input"] is False
    # in float64: the fold is exact, so only rounding can tell the two apart (in float32 it grows to 1e-4
    # through the 22 layers)
    raw = torch.rand(2, 3, 48, 48, dtype=torch.float64)  # an image in [0, 1]
    with torch.inference_mode():
        want = ref.double()(normalise(raw, *IMAGENET))  # torchvision's preprocessing, then its transform_input
        got = net.double()(normalise(raw, pre["mean"], pre["std"]))  # the atlas's recorded preprocessing
    assert (want[0] - want[1]).abs().max() > 1e-2  # logits that depend on the image
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # a file of one's own that expects no transform says so
    plain = load_model("googlenet", weights=path, transform_input=False, aux_logits=True)
    assert plain.atlas_meta["preprocessing"]["mean"] == IMAGENET[0] and plain.aux1 is not None


# ---------------------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_timm_model_with_local_weights(tmp_path, suffix):
    import timm  # in the dev extra: a missing one fails, never skips
    from timm.data import resolve_data_config

    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()
    path = tmp_path / f"test_resnet{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": ref.state_dict(), "epoch": 3}, path)  # a training script's checkpoint
    net = load_model("timm:test_resnet", weights=path)
    assert same_weights(net, ref) and net.atlas_meta["kwargs"]["num_classes"] == 7
    cfg = resolve_data_config({}, model=ref)
    pre = preprocessing_for("timm:test_resnet", model=net)
    assert pre["crop"] == cfg["input_size"][-1] and pre["mean"] == list(cfg["mean"])
    assert pre["resize"] == int(cfg["input_size"][-1] / cfg["crop_pct"])
    record = model_record(net)
    assert record["source"] == "timm" and record["architecture"] == "test_resnet" and record["timm_version"]


# ---------------------------------------------------------------------------------------------------------
# your own module
# ---------------------------------------------------------------------------------------------------------
def test_a_file_factory_records_where_its_code_is(tmp_path):
    net = load_model(NET)
    record = model_record(net)
    assert record["source"] == "file" and record["factory"] == "make_model" and record["path"] == str(NET_FILE)
    from atlas.models.weights import file_sha256

    assert record["sha256"] == file_sha256(NET_FILE)
    # preprocessing: the module's attributes, the options over them
    pre = preprocessing_for(NET, model=net)
    assert (pre["crop"], pre["resize"], pre["mean"], pre["std"]) == (32, 32, [0.5] * 3, [0.25] * 3)
    pre = preprocessing_for(NET, 48, mean=[0, 0, 0], std=[1, 1, 1], model=net)
    assert (pre["crop"], pre["mean"], pre["std"]) == (48, [0.0] * 3, [1.0] * 3)
    # weights: classes from the file, through the factory's num_classes
    torch.save(load_model(NET, num_classes=3, width=4).state_dict(), tmp_path / "w.pt")
    with pytest.raises(AtlasError):  # width 8 by default: the file is a width-4 net
        load_model(NET, weights=tmp_path / "w.pt")
    loaded = load_model(NET, weights=tmp_path / "w.pt", width=4)
    assert loaded.head.out_features == 3 and loaded.atlas_meta["kwargs"] == {"width": 4, "num_classes": 3}
    assert loaded(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_a_module_without_a_size_needs_image_size(user_package, tmp_path):
    f = tmp_path / "sizeless.py"
    f.write_text("import torch.nn as nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())\n")
    net = load_model(f"{f}:make")
    with pytest.raises(AtlasError) as e:
        preprocessing_for(f"{f}:make", model=net)
    assert "--image-size" in one_line(e)
    pre = preprocessing_for(f"{f}:make", 40, model=net)
    assert pre["crop"] == 40 and pre["mean"] == IMAGENET[0] and "ImageNet" in pre["note"]
    mod = load_model(user_package)
    assert preprocessing_for(user_package, model=mod)["crop"] == 24
    assert model_record(mod)["module"] == "mynets.small" and model_record(mod)["sha256"]


def test_a_module_passed_from_python_is_described_by_its_class():
    from atlas.models.from_code import load_file

    net = load_file(NET_FILE).FunctionalNet(num_classes=4)
    adopted = adopt(net)
    assert adopted is net and not net.training
    record = model_record(net)
    assert record["source"] == "object" and record["class"].endswith("FunctionalNet")
    assert net.atlas_meta["weights_sha256"] and not net.atlas_meta["random_init"]
    assert preprocessing_for(net.atlas_meta["name"], model=net)["crop"] == 32
    assert load_model(net) is net


# ---------------------------------------------------------------------------------------------------------
# reopening: the atlas's own copy of the model, and consent for code
# ---------------------------------------------------------------------------------------------------------
def fake_atlas(path: Path, net: torch.nn.Module) -> Path:
    """An atlas's model part as build writes it (manifest "model" record, model/state.pt): enough for
    AtlasReader.model, without a build (which needs the graph LayerMap for these models)."""
    (path / "model").mkdir(parents=True)
    manifest = {"format_version": atlas.FORMAT_VERSION,
                "model": {**model_record(net), "weights": None, "weights_sha256": net.atlas_meta["weights_sha256"],
                          "random_init": net.atlas_meta["random_init"], "seed": 0},
                "dataset": {"kind": "flat", "root": str(path.resolve()), "count": 0}, "k": 1, "layers": [],
                "geometry": {"layers": [], "pools": []},
                "preprocessing": preprocessing_for(net.atlas_meta["name"], model=net)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    torch.save(net.state_dict(), path / "model" / "state.pt")
    return path


def test_an_atlas_of_code_reopens_only_with_consent(tmp_path):
    net = load_model(NET, seed=4)
    a = fake_atlas(tmp_path / "a", net)
    with pytest.raises(AtlasError) as e:
        atlas.open(a).model
    text = one_line(e)
    assert str(NET_FILE) in text and "--trust-code" in text and "trust_code=True" in text
    got = atlas.open(a, trust_code=True).model
    assert same_weights(got, net) and got.atlas_meta["classifier_from"] == "atlas"
    assert atlas.open(a).has_classifier  # the whole state is in the atlas
    # consent is the folder's, for this process: a second handle (the renderer's, SQL's) sees it
    assert same_weights(atlas.open(a).model, net)


def test_the_model_itself_opens_an_atlas_without_running_its_code(tmp_path):
    net = load_model(NET, seed=4)
    a = fake_atlas(tmp_path / "a", net)
    mine = load_model(NET, seed=9)
    got = atlas.open(a, model=mine).model
    assert same_weights(got, net) and not same_weights(mine, net)  # the atlas's weights, the user's untouched
    from atlas.models.from_code import load_file

    other = load_file(NET_FILE).FunctionalNet(width=4)
    with pytest.raises(AtlasError) as e:
        atlas.open(tmp_path / "a", model=other).model
    assert "does not fit" in one_line(e)


def test_a_module_from_python_must_be_passed_again(tmp_path):
    from atlas.models.from_code import load_file

    net = adopt(load_file(NET_FILE).FunctionalNet())
    a = fake_atlas(tmp_path / "a", net)
    with pytest.raises(AtlasError) as e:
        atlas.open(a, trust_code=True).model
    assert "model=" in one_line(e)
    assert same_weights(atlas.open(a, model=load_file(NET_FILE).FunctionalNet()).model, net)


def test_changed_code_is_not_run_even_with_consent(tmp_path):
    src = tmp_path / "net.py"
    shutil.copy(NET_FILE, src)
    net = load_model(f"{src}:make_model")
    a = fake_atlas(tmp_path / "a", net)
    src.write_text(src.read_text() + "\nprint('something else')\n")
    with pytest.raises(AtlasError) as e:
        atlas.open(a, trust_code=True).model
    assert "has changed" in one_line(e)
    src.unlink()
    with pytest.raises(AtlasError) as e:
        atlas.open(a, trust_code=True).model
    assert "is gone" in one_line(e)


def test_a_torchvision_atlas_without_features_reopens_from_its_state(tmp_path):
    net = load_model("resnet18", seed=2, num_classes=3)
    a = fake_atlas(tmp_path / "a", net)
    got = atlas.open(a).model  # no consent needed: nothing of the manifest runs
    assert same_weights(got, net) and got.atlas_meta["classifier_from"] == "atlas"


def test_trust_code_lasts_one_command(tmp_path):
    from atlas.cli.base import atlas_argument

    seen = []

    @click.command()
    @atlas_argument
    def probe(atlas_path):
        seen.append(consent.trusted(atlas_path))

    assert CliRunner().invoke(probe, [str(tmp_path)]).exit_code == 0
    assert CliRunner().invoke(probe, [str(tmp_path), "--trust-code"]).exit_code == 0
    assert seen == [False, True] and not consent.trusted(tmp_path)


def test_the_cli_refuses_code_without_trust_code_in_one_line(tmp_path):
    a = fake_atlas(tmp_path / "a", load_model(NET))
    text = one_line_error("filters", a)
    assert "--trust-code" in text and str(NET_FILE) in text


# ---------------------------------------------------------------------------------------------------------
# end to end: a build of a non-Sequential model (through the graph LayerMap, issue 15's other part)
# ---------------------------------------------------------------------------------------------------------
def test_a_file_model_builds_and_reopens_end_to_end(tmp_path, tiny_folder):
    from atlas.build import build

    out = build(NET, str(tiny_folder), tmp_path / "a", k=2, batch_size=8, index=False, progress=False,
                mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["source"] == "file" and m["model"]["sha256"] and (out / "model" / "state.pt").is_file()
    assert m["preprocessing"]["crop"] == 32 and m["options"]["mean"] == [0.5] * 3
    layer = m["layers"][-1]["layer"]
    # before any consent in this process (consent, once given, is the folder's for the process)
    assert "--trust-code" in one_line_error("show", out, layer, 0)
    with pytest.raises(AtlasError):
        atlas.open(out).model
    res = CliRunner().invoke(main, ["show", str(out), layer, "0", "--trust-code"])
    assert res.exit_code == 0, res.output
    assert same_weights(atlas.open(out, trust_code=True).model, load_model(NET, seed=0))


def test_mean_and_std_are_build_options_recorded_in_the_manifest(tmp_path, tiny_folder):
    from atlas.build import build

    out = build("zfnet-mini", str(tiny_folder), tmp_path / "a", k=2, batch_size=8, image_size=32, index=False,
                progress=False, layers="conv1", mean=(0.4, 0.5, 0.6), std=[0.2, 0.25, 0.3])
    m = json.loads((out / "manifest.json").read_text())
    assert m["preprocessing"]["mean"] == [0.4, 0.5, 0.6] and m["preprocessing"]["std"] == [0.2, 0.25, 0.3]
    assert "--mean/--std" in m["preprocessing"]["note"] and m["preprocessing"]["crop"] == 32
    assert m["options"]["mean"] == [0.4, 0.5, 0.6] and m["model"]["source"] == "atlas"
    assert (out / "model" / "features.pt").is_file() and not (out / "model" / "state.pt").exists()


def test_a_module_from_python_builds_and_reopens_when_passed_again(tmp_path, tiny_folder):
    from atlas.build import build
    from atlas.models.from_code import load_file

    cls = load_file(NET_FILE).FunctionalNet
    torch.manual_seed(3)
    net = cls(num_classes=3)
    out = build(model=net, data=str(tiny_folder), out=tmp_path / "a", k=2, batch_size=8, index=False,
                progress=False)
    m = json.loads((out / "manifest.json").read_text())["model"]
    assert m["source"] == "object" and m["class"].endswith("FunctionalNet") and m["weights_sha256"]
    with pytest.raises(AtlasError) as e:
        atlas.open(out, trust_code=True).model  # nothing to run: the module must come from the user
    assert "model=" in one_line(e)
    assert same_weights(atlas.open(out, model=cls(num_classes=3)).model, net)
