import torch

from atlas.net import LayerMap
from atlas.models import ZFNet, ZFNetMini, load_model


def test_zfnet_shapes_match_the_paper():
    lm = LayerMap(ZFNet(), 224)
    sizes = {la.name: la.height for la in lm.conv_layers}
    assert sizes == {"conv1": 110, "conv2": 26, "conv3": 13, "conv4": 13, "conv5": 13}
    assert [p.geometry.out_size for p in lm.pools] == [55, 13, 6]
    assert [la.channels for la in lm.conv_layers] == [96, 256, 384, 384, 256]
    assert [la.name for la in lm.layers if la.kind == "fc"] == ["fc6", "fc7", "fc8"]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert ZFNet().eval()(x).shape == (1, 1000)
    n_params = sum(p.numel() for p in ZFNet().parameters())
    assert 60e6 < n_params < 64e6  # the paper: about 62 M


def test_receptive_field_boxes_hand_computed():
    lm = LayerMap(ZFNet(), 224)
    conv1, conv2 = lm.by_name["conv1"], lm.by_name["conv2"]
    # conv1: 7x7 stride 2 pad 1 -> unit (y, x) sees rows 2y-1 .. 2y+5
    assert (conv1.geometry.rf_size, conv1.geometry.jump, conv1.geometry.offset) == (7, 2, -1)
    assert conv1.box(5, 3, 224) == (5, 9, 12, 16)
    assert conv1.box(0, 0, 224) == (0, 0, 6, 6)  # clipped at the border
    # conv2: pool1 (3/2) then 5x5 stride 2: rf 7 + 2*2 + 4*4 = 27, jump 8
    assert (conv2.geometry.rf_size, conv2.geometry.jump, conv2.geometry.offset) == (27, 8, -1)
    assert conv2.box(2, 3, 224) == (23, 15, 50, 42)
    conv5 = lm.by_name["conv5"]
    assert conv5.box(12, 12, 224) == (143, 143, 224, 224)


def test_gradient_support_lies_inside_the_box():
    torch.manual_seed(0)
    model = ZFNetMini().eval()
    lm = LayerMap(model, 64)
    for name, (y, x) in [("conv2", (5, 7)), ("conv4", (3, 2)), ("conv5", (0, 7))]:
        la = lm.by_name[name]
        inp = torch.randn(1, 3, 64, 64, requires_grad=True)
        act = lm.extract(inp, [name])[name]
        act[0, :, y, x].sum().backward()
        ys, xs = torch.nonzero(inp.grad.abs().sum(1)[0], as_tuple=True)
        x0, y0, x1, y1 = la.box(y, x, 64)
        assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1


def test_torchvision_models_walk():
    for name, size, convs in [("alexnet", 224, 5), ("vgg16", 64, 13)]:
        lm = LayerMap(load_model(name), size)
        assert [la.name for la in lm.conv_layers] == [f"conv{i}" for i in range(1, convs + 1)]
        assert all(isinstance(lm.model.features[lm.chain_read_at[la.name]], torch.nn.ReLU) for la in lm.conv_layers)
