"""The documentation site's sources hold together (cheap: nothing is built; scripts/docs.sh is)."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
CONFIG = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
# the public modules the API reference must cover (issue 22's list, and the newer ones)
PUBLIC_MODULES = [
    "pyro_dlatent",
    "pyro_dlatent.latent",
    "pyro_dlatent.data",
    "pyro_dlatent.data.halos_analysis",
    "pyro_dlatent.models.base",
    "pyro_dlatent.models.auxvae",
    "pyro_dlatent.models.dlcfm",
    "pyro_dlatent.models.config",
    "pyro_dlatent.models.generation",
    "pyro_dlatent.models.generator",
    "pyro_dlatent.models.persistence",
    "pyro_dlatent.models.prediction",
    "pyro_dlatent.models.tensors",
    "pyro_dlatent.calibration",
    "pyro_dlatent.residual",
    *(
        f"pyro_dlatent.inverse.{m}"
        for m in (
            *("fem", "prior", "aux_prior", "grf_field", "tau", "sites"),
            *("infer", "methods", "health", "protocols", "collapsed", "exact", "grf", "run"),
            *("model_error", "studies"),
        )
    ),
    "pyro_dlatent.training",
    "pyro_dlatent.optim",
    "pyro_dlatent.distributed",
    "pyro_dlatent.studies",
    "pyro_dlatent.export",
    "pyro_dlatent.metrics",
    *(
        f"pyro_dlatent.metrics.{m}"
        for m in ("latent_split", "disentanglement", "lift", "fidelity", "inverse", "detection")
    ),
    "pyro_dlatent.flow",
    "pyro_dlatent.penalties",
    "pyro_dlatent.anomaly",
    "pyro_dlatent.plots",
    "pyro_dlatent.runs",
    "pyro_dlatent.checkpoint",
]


def nav_files(entries) -> list[str]:
    """Every file the nav names, in order."""
    files = []
    for entry in entries:
        if isinstance(entry, str):
            files.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                files.extend(nav_files(value) if isinstance(value, list) else [value])
    return files


def api_identifiers() -> list[str]:
    """The objects the API pages render (``::: identifier`` lines)."""
    return [
        match.group(1)
        for page in sorted((DOCS / "api").glob("*.md"))
        for match in re.finditer(r"^::: *(\S+)", page.read_text(), flags=re.MULTILINE)
    ]


@pytest.mark.parametrize("name", nav_files(CONFIG["nav"]))
def test_nav_entry_exists(name):
    if name.startswith(("http://", "https://")):
        return
    path = DOCS / name
    if name.startswith("tutorials/") and name.endswith(".ipynb"):
        # executed by scripts/docs.sh from the percent script of the same name
        path = ROOT / "tutorials" / (Path(name).stem + ".py")
    assert path.is_file(), f"mkdocs.yml's nav names {name}, and {path.relative_to(ROOT)} is absent"


def test_every_tutorial_and_page_is_in_the_nav():
    listed = set(nav_files(CONFIG["nav"]))
    tutorials = {f"tutorials/{p.stem}.ipynb" for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.py")}
    pages = {
        str(p.relative_to(DOCS))
        for p in DOCS.rglob("*.md")
        if not p.relative_to(DOCS).parts[0].startswith(("_", "tutorials"))
    }
    assert tutorials <= listed, tutorials - listed
    assert pages <= listed, pages - listed


@pytest.mark.parametrize("identifier", api_identifiers())
def test_api_page_identifier_imports(identifier):
    try:
        importlib.import_module(identifier)
    except ModuleNotFoundError:  # an object in a module rather than a module
        module, _, name = identifier.rpartition(".")
        assert hasattr(importlib.import_module(module), name), identifier


def test_api_reference_covers_the_public_modules():
    missing = set(PUBLIC_MODULES) - set(api_identifiers())
    assert not missing, f"no API page renders {sorted(missing)}"


def test_changelog_is_on_the_site():
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()
    assert '--8<-- "CHANGELOG.md"' in (DOCS / "changelog.md").read_text()


def sphinx_markup():
    pytest.importorskip("griffe", reason="the docs extra is not installed")
    spec = importlib.util.spec_from_file_location("sphinx_markup", DOCS / "_ext/sphinx_markup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sphinx_markup_becomes_markdown():
    griffe = pytest.importorskip("griffe", reason="the docs extra is not installed")

    ext = sphinx_markup()
    module = griffe.Module("pkg")
    cls = griffe.Class("Model", parent=module)
    module.set_member("Model", cls)
    method = griffe.Function("fit", parent=cls)
    cls.set_member("fit", method)
    text = (
        "Calls :meth:`fit` on :class:`~pkg.Model`, not :func:`numpy.sum` nor "
        ":class:`the scaler <pkg.Scaler>`; :math:`z_{aux} \\sim N` holds.\n"
        "Where\n"
        "- one\n"
        "- two\n"
        "\n"
        ".. math:: a = b\n"
        "    + c\n"
        "\n"
        "Then:\n"
        "\n"
        ".. math::\n"
        "\n"
        "    x = y\n"
        "\n"
        "The end."
    )
    out = ext.convert(method, text)
    assert '<autoref identifier="pkg.Model.fit" optional><code>fit()</code></autoref>' in out
    assert '<autoref identifier="pkg.Model" optional><code>Model</code></autoref>' in out
    assert "not <code>numpy.sum()</code> nor" in out  # outside the package: plain code
    assert '<autoref identifier="pkg.Scaler" optional><code>the scaler</code></autoref>' in out
    assert "\\(z_{aux} \\sim N\\)" in out
    assert "Where\n\n- one\n- two" in out
    assert "\n$$\na = b\n+ c\n$$\n" in out
    assert "\n$$\nx = y\n$$\n" in out and out.endswith("The end.")
    assert ".. math" not in out and ":meth:" not in out


def test_literal_blocks_and_item_types_become_markdown():
    griffe = pytest.importorskip("griffe", reason="the docs extra is not installed")

    ext = sphinx_markup()
    text = (
        "A checkpoint holds an envelope::\n"
        "\n"
        '    {"magic": 1,\n'
        '     "payload": 2}\n'
        "\n"
        "Parameters\n"
        "----------\n"
        "x : Tensor, shape ``(n, d)``\n"
        "    The ``points`` (see :class:`Model`).\n"
        "\n"
        "Returns\n"
        "-------\n"
        "Tensor, shape ``(n,)``\n"
    )
    out = ext.convert(griffe.Module("pkg"), text)
    assert 'A checkpoint holds an envelope:\n\n```\n{"magic": 1,\n "payload": 2}\n```\n' in out
    assert "x : Tensor, shape (n, d)\n    The ``points`` (see <code>Model</code>)." in out
    assert out.endswith("-------\nTensor, shape (n,)")
