#!/usr/bin/env bash
# Set up osteo-node on this machine: Debian packages for the tests (when run as root and asked
# with --system), then a virtual environment in .venv with the package and its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--system" ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # dcmtk: storescu/echoscu (the modality); dicom3tools: dciodvfy; orthanc: the PACS;
    # chromium: headless browser tests of the web page.
    apt-get install -y -qq --no-install-recommends dcmtk dicom3tools orthanc orthanc-gdcm \
      chromium chromium-driver postgresql-client >/dev/null
  else
    echo "setup: not root; install as root: apt-get install dcmtk dicom3tools orthanc orthanc-gdcm chromium" >&2
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
