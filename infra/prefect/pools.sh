#!/usr/bin/env bash
# Create (or update in place) the two work pools prefect.yaml's deployments run on, on the Prefect
# server PREFECT_API_URL names (with PREFECT_API_AUTH_STRING when that server requires it):
#   magnet-process     flow runs as processes on the machine of a `prefect worker` (the checkout,
#                      a GPU box, a Ray head)
#   magnet-kubernetes  flow runs as Kubernetes Jobs from the MagNet image, credentials from Secrets
#                      (base job template: kubernetes-base-job-template.json beside this script)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PREFECT_API_URL:-}" ]; then
    echo "pools.sh: PREFECT_API_URL is not set: the Prefect server's API, e.g. http://127.0.0.1:4200/api" >&2
    exit 2
fi
prefect --no-prompt work-pool create magnet-process --type process --overwrite
prefect --no-prompt work-pool create magnet-kubernetes --type kubernetes --overwrite \
    --base-job-template "$here/kubernetes-base-job-template.json"
