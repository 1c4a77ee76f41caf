"""RTS: real-time image saliency (Dabkowski & Gal, NeurIPS 2017).

A trained saliency network reads the classifier's own multi-scale features (the encoder, frozen), gates
the deepest ones with an embedding of the class to explain (the class selector), and upsamples with a
U-Net to a mask at 1/4 of the input resolution (56² at 224, 7² at 28):

    taps, logits = encoder(x)                         # one forward pass of the classifier
    h = taps[-1] ⊙ E[t]                               # class selector
    h = up-block(h, taps[i]) for the shallower taps    # U-Net upsampler with skip connections
    a, b = conv1×1(h);  mask = |a| / (|a| + |b|)       # (B, 1, H/4, W/4) in [0, 1]

The logits in the Explanation are the encoder's (= the classifier's) logits, which ADV²-RTS's encoder
loss uses. An RTS may instead own its encoder (``encoder``: a copy of the classifier, as the paper's RTS
has its own ResNet-50): then the taps come from the copy, which RTS^A training may fine-tune, and the
logits from the classifier. Training lives in ``training/rts.py``; bundled checkpoints in ``guard/checkpoints/rts_*.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from underfire.guard.interpreters.base import Explanation, Interpreter, InterpreterError, pick_target, register
from underfire.guard.errors import ModelError
from underfire.guard.models import CHECKPOINT_DIR
from underfire.guard.nets import SmallDenseNet, SmallResNet
from underfire.guard.weights import read_checkpoint

Encoder = Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]


def classifier_encoder(model) -> tuple[Encoder, list[int]]:
    """The classifier as RTS encoder: x01 -> (taps at strides 4, 8, ... (shallow to deep), logits).

    Returns the encoder and the channel count of each tap. Known: the bundled 28×28 nets, torchvision
    ResNet and MobileNetV2.
    """
    from torchvision import models as tvm

    net = getattr(model, "net", None)
    norm = model.normalize
    if isinstance(net, (SmallResNet, SmallDenseNet)):
        def enc(x):
            a = net.cam_features(norm(x))  # (B, C, H/4, W/4)
            return [a], net.fc(a.mean((2, 3)))
        return enc, [net.fc.in_features]
    if isinstance(net, tvm.ResNet):
        def enc(x):
            h = net.maxpool(net.relu(net.bn1(net.conv1(norm(x)))))
            taps = []
            for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
                h = layer(h)
                taps.append(h)
            return taps, net.fc(torch.flatten(net.avgpool(h), 1))
        chans = [_out_channels(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]
        return enc, chans
    if isinstance(net, tvm.MobileNetV2):
        cut = (4, 7, 14, 19)  # features[:4] stride 4, [:7] stride 8, [:14] stride 16, all stride 32

        def enc(x):
            h, taps, start = norm(x), [], 0
            for c in cut:
                for i in range(start, c):
                    h = net.features[i](h)
                taps.append(h)
                start = c
            return taps, net.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        return enc, [24, 32, 96, 1280]
    raise InterpreterError(
        f"RTS has no encoder recipe for {type(net).__name__}: supported are the bundled 28x28 nets, torchvision "
        f"ResNet and MobileNetV2"
    )


def _out_channels(layer: nn.Module) -> int:
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SaliencyNet(nn.Module):
    """Class selector + U-Net upsampler over encoder taps; outputs the RTS mask at the shallowest tap."""

    def __init__(self, tap_channels: list[int], num_classes: int, width: int = 64, balance: float = 1.0) -> None:
        super().__init__()
        self.tap_channels, self.num_classes, self.width = list(tap_channels), num_classes, width
        # mask = |a| / (|a| + balance·|b|): balance > 1 shrinks every mask (RTS^A calibrates its area with it)
        self.balance = float(balance)
        deep = tap_channels[-1]
        self.selector = nn.Embedding(num_classes, deep)
        nn.init.normal_(self.selector.weight, 1.0, 0.1)
        self.bottom = _conv_block(deep, width)
        self.ups = nn.ModuleList(_conv_block(width + c, width) for c in reversed(tap_channels[:-1]))
        self.refine = _conv_block(width, width)
        self.out = nn.Conv2d(width, 2, 1)

    def forward(self, taps: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:  # -> (B, 1, h, w)
        return self.mask(self.evidence(taps, t))

    def mask(self, ab: torch.Tensor) -> torch.Tensor:
        """The mask from the two evidence maps (B, 2, h, w): keep |a| against drop balance·|b|."""
        return ab[:, :1] / (ab[:, :1] + self.balance * ab[:, 1:] + 1e-6)

    def evidence(self, taps: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:  # -> (B, 2, h, w), ≥ 0
        h = taps[-1] * self.selector(t)[:, :, None, None]  # (B, C, h_d, w_d) class-gated
        h = self.bottom(h)
        for block, skip in zip(self.ups, reversed(taps[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], 1))
        return self.out(self.refine(h)).abs()


@register("rts", preset="rts", label="RTS", variants={"rtsa": "rtsa"})
class RTS(Interpreter):
    """Real-time saliency: one forward of the classifier + the saliency network."""

    def __init__(self, model, net: SaliencyNet, encoder: nn.Module | None = None) -> None:
        super().__init__(model)
        self.encoder = encoder  # None: the classifier itself is the encoder
        own, chans = classifier_encoder(encoder if encoder is not None else model)
        if list(chans) != net.tap_channels:
            raise InterpreterError(f"RTS network expects encoder taps {net.tap_channels}, model {model.name} gives {chans}")
        if encoder is None:
            self.encode = own
        else:
            def encode(x):  # taps from the RTS's own encoder, logits from the deployed classifier
                return own(x)[0], model(x)
            self.encode = encode
        self.net = net.eval()

    def modules(self):
        return (self.model, self.net) + (() if self.encoder is None else (self.encoder,))

    def encoder_params(self) -> list[nn.Parameter]:
        """The parameters of an own encoder (empty when the classifier is the encoder, which stays frozen)."""
        return [] if self.encoder is None else list(self.encoder.parameters())

    def encoder_trains(self) -> bool:
        """Whether an own encoder is being trained (its taps then need a graph)."""
        return any(p.requires_grad for p in self.encoder_params())

    bundled = "rts_{}.pt"  # checkpoint file name in guard/checkpoints/, per model name
    train_flags = ""  # what `underfire train rts` needs to train this kind

    @classmethod
    def for_model(cls, model, checkpoint: str | Path | None = None) -> "RTS":
        """Load the RTS trained for ``model`` (default: the bundled ``rts_<model.name>.pt``)."""
        path = Path(checkpoint) if checkpoint else CHECKPOINT_DIR / cls.bundled.format(model.name)
        if not path.is_file():
            raise InterpreterError(
                f"no trained {cls.name.upper()} for model {model.name!r} at {path}. Train one with "
                f"`underfire train rts{cls.train_flags} --model {model.name} --out {path}`"
            )
        p = next(model.parameters())
        net, enc_state = load_saliency_net(path, model.name, with_encoder=True)
        encoder = None
        if enc_state is not None:
            import copy

            encoder = copy.deepcopy(model).eval()
            try:
                encoder.net.load_state_dict(enc_state)
            except RuntimeError as exc:
                raise InterpreterError(f"RTS checkpoint {path}: its encoder does not fit model {model.name}: "
                                       f"{str(exc)[:300]}") from exc
        return cls(model, net.to(device=p.device, dtype=p.dtype), encoder)

    @classmethod
    def untrained(cls, model, width: int = 64) -> "RTS":
        _, chans = classifier_encoder(model)
        p = next(model.parameters())
        return cls(model, SaliencyNet(chans, model.num_classes, width).to(device=p.device, dtype=p.dtype))

    def native_size(self, hw):
        return (hw[0] // 4, hw[1] // 4)

    def explain(self, x, target):
        with torch.set_grad_enabled(torch.is_grad_enabled() and (x.requires_grad or self.net.training)):
            taps, logits = self.encode(x)
            t = pick_target(logits, target)
            return Explanation(logits, self.net(taps, t))


def load_saliency_net(path: str | Path, model_name: str | None = None, with_encoder: bool = False):
    """The SaliencyNet of an RTS checkpoint; with ``with_encoder``, (net, the own encoder's state dict or None)."""
    try:
        ck = read_checkpoint(path)
    except ModelError as exc:
        raise InterpreterError(str(exc)) from exc
    if ck.get("kind") != "rts":
        raise InterpreterError(f"{path} is not an RTS checkpoint (kind={ck.get('kind')!r})")
    if model_name is not None and ck.get("model") not in (None, model_name):
        raise InterpreterError(f"RTS checkpoint {path} was trained for model {ck['model']!r}, not {model_name!r}")
    net = SaliencyNet(ck["tap_channels"], ck["num_classes"], ck.get("width", 64), ck.get("balance", 1.0))
    try:
        net.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        raise InterpreterError(f"RTS checkpoint {path} does not fit its architecture: {str(exc)[:300]}") from exc
    return (net.eval(), ck.get("encoder_state_dict")) if with_encoder else net.eval()


@register("rtsa", preset="rts", label="RTS^A")
class RTSA(RTS):
    """RTS^A: an RTS fine-tuned adversarially (training/rts_adv.py); bundled as ``rts_adv_<model>.pt``."""

    bundled = "rts_adv_{}.pt"
    train_flags = " --adversarial"
