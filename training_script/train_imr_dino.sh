#!/usr/bin/env bash
# HiDe-Prompt on Split ImageNet-R with the DINO-1K backbone, as the reference's script of this name; the settings and
# the overridable variables (NPROC, DATA_PATH, SEEDS, MASTER_PORT) are in hideprompt_backbone.sh.
set -euo pipefail
exec bash "$(dirname "$0")/hideprompt_backbone.sh" imr dino "$@"
