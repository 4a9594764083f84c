#!/usr/bin/env bash
# Set up osteo-node on this machine: Debian packages for the tests (when run as root and asked
# with --system), then a virtual environment in .venv with the package and its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--system" ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # dcmtk: storescu/echoscu (the modality); dicom3tools: dciodvfy; orthanc: the PACS, with
    # orthanc-dicomweb (DICOMweb destinations, the viewer's data source); chromium: headless
    # browser tests of the web page and of the OHIF viewer. npm fetches the viewer (below): the
    # machine's Node.js npm when there is one (Debian's npm conflicts with NodeSource's nodejs).
    apt-get install -y -qq --no-install-recommends dcmtk dicom3tools orthanc orthanc-gdcm \
      orthanc-dicomweb chromium chromium-driver postgresql-client >/dev/null
    command -v npm >/dev/null || apt-get install -y -qq --no-install-recommends npm >/dev/null
  else
    echo "setup: not root; install as root: apt-get install dcmtk dicom3tools orthanc orthanc-gdcm orthanc-dicomweb chromium npm" >&2
  fi
fi

# The OHIF viewer for tests/test_viewer_ohif.py: the prebuilt dist/ of the pinned npm package, in
# .ohif/ (ignored by git), checked against the tarball's SHA-512. tests/ohif.py reads the pin here.
OHIF_VERSION=3.13.2
OHIF_SHA512=5997719a9986eeba85816f5924b71b82bdd70ad2e2d4a0cd3e831a798e4f3deea3e06e1f8c48e393271933a0ba664d85f3b04ac457e9abe8dde715d907d13c10
# Only for the tests (--system, as `make test` asks); `make serve` needs no viewer.
if [[ "${1:-}" == "--system" ]] && { [[ ! -f .ohif/package/dist/index.html ]] || ! grep -q "\"version\": \"$OHIF_VERSION\"" .ohif/package/package.json; }; then
  if command -v npm >/dev/null; then
    rm -rf .ohif && mkdir -p .ohif
    (cd .ohif && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
    echo "$OHIF_SHA512  .ohif/ohif-app-$OHIF_VERSION.tgz" | sha512sum --check --quiet
    tar -xzf ".ohif/ohif-app-$OHIF_VERSION.tgz" -C .ohif
  else
    echo "setup: npm not found; the OHIF viewer test will skip (apt-get install npm)" >&2
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
stamp=.venv/.osteo-node-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  .venv/bin/pip install -q --upgrade pip
  # torch/torchvision: the registry's standard pair (see README "Installation"); grad-cam needs both.
  .venv/bin/pip install -q -e ".[training,test,web]"
  touch "$stamp"
fi
