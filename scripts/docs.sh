#!/usr/bin/env bash
# Build the documentation site into site/: install the docs tools into .venv, execute the three
# tutorials in their fast mode into notebooks (docs/tutorials/*.ipynb, build artefacts; the
# percent scripts in tutorials/ stay the source), then `mkdocs build --strict`: any warning
# (a broken link, a nav entry without a file, a docstring griffe cannot parse) fails the build.
#
# DOCS_SKIP_EXECUTE=1 reuses the notebooks of an earlier run (for work on the text alone).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch" 2>/dev/null; then
  bash scripts/setup.sh # creates .venv with a CPU build of torch first
fi
.venv/bin/python -m pip --disable-pip-version-check -q install -e ".[docs]"

start=$(date +%s)
if [ "${DOCS_SKIP_EXECUTE:-0}" = "1" ] && compgen -G "docs/tutorials/*.ipynb" >/dev/null; then
  echo "DOCS_SKIP_EXECUTE=1: reusing docs/tutorials/*.ipynb"
else
  rm -rf docs/tutorials
  .venv/bin/python scripts/execute_tutorials.py
fi
executed=$(date +%s)

# Material for MkDocs prints a notice about its successor at every build; it is not a warning of
# this site's, so it is switched off here (strict mode still fails on every real warning).
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --clean --site-dir site
echo "docs: tutorials $((executed - start)) s, site $(($(date +%s) - executed)) s; open site/index.html"
