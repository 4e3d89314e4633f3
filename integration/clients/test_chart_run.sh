#!/usr/bin/env bash
# The rendered Helm chart, run: integration/chart/run_rendered.py starts what `helm template`
# renders (origins and trackers each in a network namespace, agents on two "nodes", names
# resolvable as cluster DNS would answer them, init containers first, readiness by the rendered
# probes), pushes an image to the origin Service's name, pulls it with `ctr` on both nodes
# through the hosts.toml the agent's init container wrote, checks that the second node got its
# bytes from the first node's agent and that every metric the alerts and dashboard use exists,
# then runs the post-delete hook and checks each node's containerd config is as it was.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
# shellcheck source=../chart/tools.sh source-path=SCRIPTDIR
source "$(dirname "$0")/../chart/tools.sh"
lib_init chart_run
require_shoal_under_test
chart=$(cd "$(dirname "$0")/../../charts/shoal" && pwd)
runner=$(cd "$(dirname "$0")/../chart" && pwd)/run_rendered.py

chart_tools || die "could not fetch helm"
# The defaults, plus docker.io mirrored too: the nodes already have a hosts.toml for it, which
# must be kept aside and put back.
"$HELM" template shoal "$chart" --namespace shoal --set 'containerd.extraRegistries[0].name=docker.io' \
  >"$T/rendered.yaml" || die "helm template failed"
"$HELM" template shoal "$chart" --namespace shoal --set metrics.prometheusRule.enabled=true \
  --set metrics.grafanaDashboard.enabled=true \
  --show-only templates/prometheusrule.yaml --show-only templates/grafana-dashboard.yaml \
  >"$T/metrics.yaml" || die "helm template (metrics) failed"

oci_random_image "$T/layout" app 6M,3M >/dev/null
mkdir -p "$T/run"
chmod 755 "$T" # the containers run as their own (non-root) users
PYTHONPATH=$CHART_PYTHONPATH python3 "$runner" --rendered "$T/rendered.yaml" --metrics-rendered "$T/metrics.yaml" \
  --shoal "$SHOAL_BIN" --workdir "$T/run" --layout "$T/layout" --tag app --nodes 2 ||
  die "the rendered chart did not work as installed"
