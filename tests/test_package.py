"""The package's surface: ``import maskprop`` loads nothing heavy, every public name resolves, and the core runs with
torch alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import maskprop


def test_every_public_name_resolves_to_its_definition():
    """Each name of ``maskprop.__all__`` (and ``fit``) is the object its module defines, and ``dir`` lists them."""
    import importlib

    names = set(maskprop.__all__) | {"fit"}
    assert names == set(maskprop._DEFINED_IN)  # a name added to one and not the other fails here
    for name in names:
        module = importlib.import_module(f"maskprop.{maskprop._DEFINED_IN[name]}")
        assert getattr(maskprop, name) is getattr(module, name), name
    assert names <= set(dir(maskprop))
    assert maskprop.vrpge.__name__ == "maskprop.vrpge"  # a subpackage as an attribute


def test_a_misspelt_name_is_an_attribute_error():
    try:
        maskprop.create_modle
    except AttributeError as error:
        assert "create_modle" in str(error)
    else:
        raise AssertionError("maskprop.create_modle resolved")


def test_the_import_and_the_command_line_parse_load_no_torch_and_the_core_needs_torch_alone():
    """``import maskprop`` and parsing ``maskprop``'s arguments import no torch (``--help`` and a usage error answer
    at once); the core (models, sparse execution, cost, surgery, the estimator, the sparse-backward layers, export)
    imports and runs with the training and plotting dependencies unimportable."""
    script = textwrap.dedent("""
        import sys

        import maskprop
        from maskprop.cli import build_parser

        build_parser().parse_args(["train", "shapes"])
        assert "torch" not in sys.modules, "import maskprop or the parser imported torch"

        for name in ("pydantic", "yaml", "tqdm", "tensorboard", "matplotlib", "timm", "torchvision"):
            sys.modules[name] = None  # importing it now raises ImportError: the training, data and plot dependencies
        import torch

        model = maskprop.create_model("resnet20", num_classes=10).eval()
        mask = maskprop.random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
        x = torch.randn(2, 3, 32, 32)
        with maskprop.use_mask(model, mask):
            out = model(x)
        assert torch.allclose(maskprop.materialize(model, mask).eval()(x), out, atol=1e-5)
        assert 0 < maskprop.flops(model, (3, 32, 32), mask) < maskprop.flops(model, (3, 32, 32))
        import maskprop.sbp, maskprop.vrpge, maskprop.export  # noqa: E401
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
