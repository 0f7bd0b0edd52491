"""The graph engine against its autograd reference, per model family: the README's fidelity figure.

For each torchvision family (random weights, BatchNorm with random running statistics, which default
ones would hide), each default layer, DeconvNet and guided backpropagation: the largest relative error
max|P - R| / max|R| of the batched engine against the slow autograd reference, over a few units.

    python scripts/graph_agreement.py            # 7 families, 48-80 px
    python scripts/graph_agreement.py --timm     # also 9 timm models (timm is in the dev extra)
    python scripts/graph_agreement.py --smoke    # seconds: resnet18 only
"""
from __future__ import annotations

import argparse

import torch
import torchvision

from atlas import deconv as D
from atlas.net import LayerMap

FAMILIES = [("resnet18", 48), ("densenet121", 48), ("googlenet", 64), ("mobilenet_v2", 48), ("vgg11_bn", 48),
            ("squeezenet1_1", 48), ("inception_v3", 80)]
TIMM = ["resnet10t", "regnetx_002", "mobilenetv2_050", "dla46_c", "repvgg_a0", "gernet_s", "mnasnet_050",
        "spnasnet_100", "cspresnet50"]


def randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


def worst(model: torch.nn.Module, size: int) -> dict[str, float]:
    lm = LayerMap(randomise_bn(model), size)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    out = {}
    for method in D.METHODS:
        errs = []
        for la in lm.default_layers():
            reqs = [D.Request(i, la.name, (7 * i + 3) % la.channels, la.height // 2, min(la.width - 1, i))
                    for i in range(3)]
            got = D.project_images(lm, x, reqs, method=method)
            errs += [D.relative_error(got.images[i], D.gradient_reference(lm, x, r, method=method))
                     for i, r in enumerate(reqs)]
        out[method] = max(errs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timm", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    models = [(n, s, lambda n=n: getattr(torchvision.models, n)(
        weights=None, **({"aux_logits": False, "init_weights": False} if n in ("googlenet", "inception_v3") else {})))
        for n, s in (FAMILIES[:1] if args.smoke else FAMILIES)]
    if args.timm and not args.smoke:
        import timm

        models += [(f"timm:{n}", 64, lambda n=n: timm.create_model(n, pretrained=False)) for n in TIMM]
    overall = 0.0
    print(f"{'model':<22} {'deconvnet':>10} {'guided':>10}")
    for name, size, make in models:
        e = worst(make(), size)
        overall = max(overall, *e.values())
        print(f"{name:<22} {e['deconvnet']:10.2e} {e['guided']:10.2e}")
    print(f"largest relative error: {overall:.2e} (bar 1e-5)")


if __name__ == "__main__":
    main()
