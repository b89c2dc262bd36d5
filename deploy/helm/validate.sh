#!/usr/bin/env bash
# Validates the Helm chart without a cluster:
#   1. builds helm (helm.sh/helm/v4) and kubeconform from their Go modules, once, cached under
#      ${RAGBUS_TOOLS_DIR:-~/.cache/ragbus/tools} (a second run reuses them);
#   2. checks files/topics.json is what deploy/helm/generate.py makes from schemas/ (when Python
#      with the project's dependencies is given as $PYTHON);
#   3. `helm lint` and `helm template` with the default values, the CI tenants values and the GPU
#      values; the rendered manifests go to $1 (default: a temporary folder);
#   4. checks every rendered object against the vendored JSON schemas in schemas/json/ (Kubernetes
#      core kinds and the Strimzi, KEDA and Prometheus Operator CRDs), strictly: an unknown field or
#      a kind without a schema fails.
# Needs: go (1.24+). Usage: deploy/helm/validate.sh [OUTPUT_DIR]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CHART="$HERE/ragbus"
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
HELM_VERSION=v4.3.2
KUBECONFORM_VERSION=v0.8.0
TOOLS="${RAGBUS_TOOLS_DIR:-$HOME/.cache/ragbus/tools}"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"

say() { printf '[validate] %s\n' "$*" >&2; }

# go install into a folder named after the version, so a version bump rebuilds.
tool() { # name module version
  local dir="$TOOLS/$1-$3"
  if [[ ! -x "$dir/$1" ]]; then
    [[ -x "$GO" ]] || { say "go is needed to build $1 (install Go 1.24+ or set GO=/path/to/go)"; exit 3; }
    say "building $1 $3 from $2 (first run only)..."
    local start=$SECONDS
    mkdir -p "$dir"
    GOBIN="$dir.tmp" GOTOOLCHAIN=local GOFLAGS=-mod=mod "$GO" install "$2@$3" >&2
    mv "$dir.tmp/$1" "$dir/$1" && rmdir "$dir.tmp"
    say "built $1 in $((SECONDS - start)) s"
  fi
  echo "$dir/$1"
}

HELM="$(tool helm helm.sh/helm/v4/cmd/helm "$HELM_VERSION")"
KUBECONFORM="$(tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION")"

if [[ -n "${PYTHON:-}" ]]; then
  (cd "$HERE/../.." && "$PYTHON" deploy/helm/generate.py --check) >&2
fi

# Helm keeps its caches and config out of the user's real ones.
export HELM_CACHE_HOME="$OUT/.helm/cache" HELM_CONFIG_HOME="$OUT/.helm/config" HELM_DATA_HOME="$OUT/.helm/data"

declare -A SETS=(
  [default]=""
  [tenants]="-f $CHART/ci/tenants-values.yaml"
  [gpu]="-f $CHART/values-gpu.yaml -f $CHART/ci/tenants-values.yaml"
)
for name in default tenants gpu; do
  # shellcheck disable=SC2086
  "$HELM" lint --strict "$CHART" ${SETS[$name]} >&2
  # shellcheck disable=SC2086
  "$HELM" template ragbus "$CHART" --namespace ragbus ${SETS[$name]} > "$OUT/$name.yaml"
  say "rendered $name: $(grep -c '^kind:' "$OUT/$name.yaml") objects -> $OUT/$name.yaml"
done

"$KUBECONFORM" -strict -summary -output text \
  -schema-location "$HERE/schemas/json/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
  "$OUT/default.yaml" "$OUT/tenants.yaml" "$OUT/gpu.yaml"
say "ok: lint, template and schema check passed ($OUT)"
