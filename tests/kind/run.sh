#!/usr/bin/env bash
# nodeproxy in a kind cluster, end to end: create the cluster, build and load the image,
# install deploy/, run the tutorials' setup (backend v1 and v2 with hashicorp/http-echo, a
# frontend, the DestinationRule and VirtualService), check the 80/20 split and a fault from the
# frontend pod, and delete the cluster.
#
# Needs Docker, kind and kubectl, and network access to pull images. The environment nodeproxy
# is built in has none of Docker or kind, so this script is not run by CI; tests/kind/validate.sh
# runs every part of it that works without them (manifest validation, the image build steps).
#
#   tests/kind/run.sh            # KEEP_CLUSTER=1 keeps the cluster for a look afterwards
set -euo pipefail
cd "$(dirname "$0")/../.."

cluster=nodeproxy
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "run.sh: needs $tool on PATH" >&2; exit 2; }
done
ctx="kind-$cluster"
k() { kubectl --context "$ctx" "$@"; }
step() { printf '\n== %s\n' "$*"; }

cleanup() {
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "run.sh: keeping cluster $cluster (kind delete cluster --name $cluster)"
  else
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

step "kind cluster"
kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
kind create cluster --config tests/kind/kind-config.yaml --wait 180s

step "image"
docker build -f deploy/Dockerfile -t nodeproxy:dev .
kind load docker-image nodeproxy:dev --name "$cluster"

step "install"
if ! k get crd virtualservices.networking.istio.io >/dev/null 2>&1; then
  k apply -k deploy/crds
  k wait --for condition=established --timeout=60s crd -l app.kubernetes.io/part-of=nodeproxy
fi
k apply --dry-run=client -k deploy/
k apply -k deploy/
k -n nodeproxy-system rollout status ds/nodeproxy --timeout=180s

step "tutorial workloads"
k apply -f tests/kind/manifests/demo.yaml
for d in backend-v1 backend-v2 frontend; do
  k -n demo rollout status "deploy/$d" --timeout=180s
done
k apply -f tests/kind/manifests/destinationrule.yaml -f tests/kind/manifests/routing.yaml

# Requests from the frontend pod; its connects to the backend's ClusterIP are captured.
fe() { k -n demo exec deploy/frontend -- "$@"; }
wait_for() { # wait_for DESCRIPTION COMMAND...: retry for up to 60 s
  local what="$1"; shift
  for _ in $(seq 60); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "run.sh: timed out waiting for $what" >&2
  return 1
}
wait_for "the backend through nodeproxy" fe curl -sf --max-time 2 http://backend/

node=$(k -n demo get pod -l app=frontend -o jsonpath='{.items[0].spec.nodeName}')
np=$(k -n nodeproxy-system get pod -l app.kubernetes.io/name=nodeproxy \
  --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')
step "nodeproxy on $node ($np)"
k -n nodeproxy-system exec "$np" -- nodeproxy proxy-config kernel
k -n nodeproxy-system exec "$np" -- nodeproxy proxy-config routes

step "80/20 split over 400 requests"
out=$(fe sh -c 'for i in $(seq 400); do curl -s --max-time 5 http://backend/; done')
v1=$(grep -c '^v1$' <<<"$out" || true)
v2=$(grep -c '^v2$' <<<"$out" || true)
echo "v1=$v1 v2=$v2"
# 99.9% two-sided binomial bound for p=0.8, n=400: 320 +- 3.29*8 = [294, 346].
if [ $((v1 + v2)) -ne 400 ] || [ "$v1" -lt 294 ] || [ "$v1" -gt 346 ]; then
  echo "run.sh: FAIL: split v1=$v1 v2=$v2 is not 80/20" >&2
  exit 1
fi
# Without capture kube-proxy would spread requests evenly over the two pods (50/50), so the
# split above already shows nodeproxy routed them; its cluster table names the subsets too.
k -n nodeproxy-system exec "$np" -- nodeproxy proxy-config clusters | grep -q 'outbound|80|v2|backend.demo'

step "fault: x-fault: abort gets 503, other requests 200"
k apply -f tests/kind/manifests/fault.yaml
wait_for "the fault route" sh -c \
  "[ \"\$(kubectl --context $ctx -n demo exec deploy/frontend -- curl -s -o /dev/null -w '%{http_code}' -H 'x-fault: abort' http://backend/)\" = 503 ]"
code=$(fe curl -s -o /dev/null -w '%{http_code}' http://backend/)
[ "$code" = 200 ] || { echo "run.sh: FAIL: request without the header got $code" >&2; exit 1; }

step "PASS"
