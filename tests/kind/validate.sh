#!/usr/bin/env bash
# The parts of tests/kind/run.sh that run without Docker, kind or an API server; `cargo xtask
# test` (and so CI) runs this.
#
# `kubectl apply --dry-run=client` cannot run here: even in client mode kubectl asks an API
# server for discovery ("unable to recognize ...: Get http://localhost:8080/api"). The same
# check is made offline instead: kustomize renders deploy/ with kubectl's built-in kustomize,
# and kubernetes-validate (PyPI; Kubernetes' own OpenAPI schemas) validates every object
# strictly, unknown fields included. run.sh does the real dry run against the kind cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing() {
  echo "validate.sh: $1 is missing (\`cargo xtask setup test\` installs it)" >&2
  exit 1
}
command -v kubectl >/dev/null || missing kubectl
command -v kubernetes-validate >/dev/null || missing "kubernetes-validate (pip install kubernetes-validate)"

k8s=1.33.0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "validate.sh: run.sh syntax"
bash -n tests/kind/run.sh
bash -n deploy/image/build.sh

echo "validate.sh: deploy/ and deploy/crds rendered by kustomize, validated against Kubernetes $k8s"
kubectl kustomize deploy/ >"$tmp/deploy.yaml"
kubectl kustomize deploy/crds >"$tmp/crds.yaml"
for kind in Namespace ServiceAccount ClusterRole ClusterRoleBinding DaemonSet; do
  grep -q "^kind: $kind$" "$tmp/deploy.yaml" || { echo "validate.sh: deploy/ has no $kind" >&2; exit 1; }
done
[ "$(grep -c '^kind: CustomResourceDefinition$' "$tmp/crds.yaml")" = 5 ] ||
  { echo "validate.sh: deploy/crds must define the 5 Istio networking kinds" >&2; exit 1; }
kubernetes-validate --strict --quiet -k "$k8s" "$tmp/deploy.yaml" "$tmp/crds.yaml" \
  tests/kind/manifests/demo.yaml

echo "validate.sh: the tutorial's Istio objects, as nodeproxy reads them"
nodeproxy=target/debug/nodeproxy
[ -x "$nodeproxy" ] || cargo build -q --workspace --bins
m=tests/kind/manifests
"$nodeproxy" validate "$m/demo.yaml" "$m/destinationrule.yaml" "$m/routing.yaml" >/dev/null
"$nodeproxy" validate "$m/demo.yaml" "$m/destinationrule.yaml" "$m/fault.yaml" >/dev/null

echo "validate.sh: image build steps (deploy/image/build.sh, dev profile)"
deploy/image/build.sh --workspace --profile dev --out target/image/rootfs
echo "validate.sh: ok"
