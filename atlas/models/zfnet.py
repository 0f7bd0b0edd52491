"""ZFNet (Zeiler & Fergus 2014) and its relatives, one readable class each.

Every model here follows torchvision's AlexNet/VGG layout -- `features`
(Conv2d / ReLU / MaxPool2d / LocalResponseNorm), `avgpool`, `classifier` -- so
that the atlas walks all of them, torchvision's included, the same way.
ReLUs are modules (never functional) so that the DeconvNet engine can see them.
"""
import torch
from torch import nn


def _lrn() -> nn.Module:
    # The paper's "local contrast normalization across feature maps"; AlexNet's
    # constants (size 5, alpha 1e-4, beta 0.75, k 2).
    return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)


def _classifier(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(p=dropout),
        nn.Linear(in_features, hidden),  # fc6
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, hidden),  # fc7
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),  # fc8
    )


def _pooled_conv(cin: int, cout: int, *, kernel: int, stride: int, padding: int, ceil_mode: bool,
                 norm: bool) -> list[nn.Module]:
    """conv -> ReLU -> 3x3/2 max-pool -> contrast normalisation (or Identity): conv1 and conv2 of ZFNet
    and single-tower AlexNet, whose module indices the atlas's layer names follow."""
    return [nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=padding), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=ceil_mode), _lrn() if norm else nn.Identity()]


def _conv3_to_pool5(ceil_mode: bool) -> list[nn.Module]:
    """conv3, conv4, conv5 (3x3/1 pad 1: 384, 384, 256 filters) and pool5 (3x3/2): the same in ZFNet and
    single-tower AlexNet."""
    return [nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=ceil_mode)]


class _EightLayerNet(nn.Module):
    """Five convs (`features`, given by the subclass), avgpool to 6 x 6, fc6 4096, fc7 4096, fc8: ZFNet
    and single-tower AlexNet, with the paper's initialisation."""

    def __init__(self, features: nn.Sequential, num_classes: int, dropout: float):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = _classifier(256 * 6 * 6, 4096, num_classes, dropout)
        paper_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class ZFNet(_EightLayerNet):
    """The paper's net, for 224 x 224 x 3 input.

    Shapes (channels x height x width) after each block:
        conv1 7x7/2 pad 1 ->  96 x 110 x 110, pool1 3x3/2 (ceil) ->  96 x 55 x 55, norm1
        conv2 5x5/2       -> 256 x 26 x 26,   pool2 3x3/2 (ceil) -> 256 x 13 x 13, norm2
        conv3 3x3/1 pad 1 -> 384 x 13 x 13
        conv4 3x3/1 pad 1 -> 384 x 13 x 13
        conv5 3x3/1 pad 1 -> 256 x 13 x 13,   pool5 3x3/2        -> 256 x 6 x 6
        fc6 4096, fc7 4096 (ReLU, dropout 0.5), fc8 num_classes
    The pools round up (ceil mode) so that 110 -> 55 and 26 -> 13, as in the paper.
    """

    input_size = 224

    def __init__(self, num_classes: int = 1000, contrast_norm: bool = True, dropout: float = 0.5):
        super().__init__(nn.Sequential(
            *_pooled_conv(3, 96, kernel=7, stride=2, padding=1, ceil_mode=True, norm=contrast_norm),   # conv1
            *_pooled_conv(96, 256, kernel=5, stride=2, padding=0, ceil_mode=True, norm=contrast_norm),  # conv2
            *_conv3_to_pool5(ceil_mode=True),
        ), num_classes, dropout)


class ZFNetMini(nn.Module):
    """ZFNet's five-conv, three-pool structure scaled for 32-64 px images.

    For a 64 x 64 input:
        conv1 5x5/2 pad 2 -> 32 x 32 x 32, pool1 3x3/2 (ceil) -> 32 x 16 x 16, norm1
        conv2 3x3/1 pad 1 -> 64 x 16 x 16, pool2 3x3/2 (ceil) -> 64 x 8 x 8,   norm2
        conv3 3x3/1 pad 1 -> 96 x 8 x 8
        conv4 3x3/1 pad 1 -> 96 x 8 x 8
        conv5 3x3/1 pad 1 -> 64 x 8 x 8,   pool5 3x3/2 (ceil) -> 64 x 4 x 4
        fc6 256, fc7 256, fc8 num_classes
    About 20 M multiply-adds per image: it trains in a minute or two on 2 CPU cores.
    """

    input_size = 64
    input_sizes = (32, 64)  # the range it is built for: below 32 conv5 is 1x1, above 64 use zfnet

    def __init__(self, num_classes: int = 10, contrast_norm: bool = False, dropout: float = 0.5,
                 width: int = 32):
        super().__init__()
        norm = _lrn if contrast_norm else nn.Identity
        c1, c2, c3, c5 = width, 2 * width, 3 * width, 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            norm(),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            norm(),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        )
        # Adaptive pooling keeps the classifier's size fixed for 32..64 px inputs.
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = _classifier(c5 * 4 * 4, 256, num_classes, dropout)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # Small nets train in a few epochs only with a scaled init; the
                # paper's fixed 1e-2 is for ZFNet (train --init paper applies it).
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # conv1 starts near zero instead: its He init (RMS 0.16, renormalised to 0.1 by the recipe) is
        # more than a few epochs of gradients add, so the trained filters stayed visibly random noise.
        # From N(0, 3e-3) the demo's 8 epochs grow oriented edge and colour-opponent filters, the
        # paper's figure 6 picture, at the same accuracy (88.6 % vs ~90 % on the demo's shapes).
        nn.init.normal_(self.features[0].weight, 0.0, 3e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class AlexNetSingle(_EightLayerNet):
    """Krizhevsky et al. 2012 as one tower (the paper's figure 6 baseline).

        conv1 11x11/4 pad 2 ->  96 x 55 x 55, pool1 3x3/2 -> 96 x 27 x 27, norm1
        conv2 5x5/1 pad 2   -> 256 x 27 x 27, pool2 3x3/2 -> 256 x 13 x 13, norm2
        conv3..conv5 3x3/1 pad 1 (384, 384, 256) -> 13 x 13, pool5 3x3/2 -> 256 x 6 x 6
        fc6 4096, fc7 4096, fc8 num_classes
    """

    input_size = 224

    def __init__(self, num_classes: int = 1000, contrast_norm: bool = True, dropout: float = 0.5):
        super().__init__(nn.Sequential(
            *_pooled_conv(3, 96, kernel=11, stride=4, padding=2, ceil_mode=False, norm=contrast_norm),  # conv1
            *_pooled_conv(96, 256, kernel=5, stride=1, padding=2, ceil_mode=False, norm=contrast_norm),  # conv2
            *_conv3_to_pool5(ceil_mode=False),
        ), num_classes, dropout)


def paper_init(model: nn.Module, std: float = 1e-2) -> None:
    """The paper's initialisation: weights N(0, 1e-2), biases 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)
