#!/usr/bin/env bash
# HiDe-Prompt on Split CIFAR-100 with the iBOT-21K backbone, as the reference's script of this name; the settings and
# the overridable variables (NPROC, DATA_PATH, SEEDS, MASTER_PORT) are in hideprompt_backbone.sh.
set -euo pipefail
exec bash "$(dirname "$0")/hideprompt_backbone.sh" cifar100 ibot21k "$@"
