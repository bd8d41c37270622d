#!/usr/bin/env bash
# HiDe-Prompt on 5-datasets with the iBOT-21K backbone, as the reference's script of this name; the settings and
# the overridable variables (NPROC, DATA_PATH, SEEDS, MASTER_PORT) are in hideprompt_backbone.sh.
set -euo pipefail
exec bash "$(dirname "$0")/hideprompt_backbone.sh" five_datasets ibot21k "$@"
