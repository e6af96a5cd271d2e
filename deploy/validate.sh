#!/usr/bin/env bash
# Renders every kustomization under deploy/ (kubectl kustomize) and validates the result offline
# against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields are errors),
# for the oldest and newest Kubernetes versions we claim. Installs kubernetes-validate into
# target/deploy-venv on first use. Called by scripts/test.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deploy-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "kubernetes-validate==1.37.0"
fi
out=target/deploy-rendered
mkdir -p "$out"
for dir in deploy/base deploy/overlays/*/; do
  dir=${dir%/}
  name=$(echo "$dir" | tr '/' '-')
  kubectl kustomize "$dir" 2>/dev/null > "$out/$name.yaml"
  for version in 1.30.0 1.37.0; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$out/$name.yaml"
  done
  echo "ok: $dir renders and validates (Kubernetes 1.30, 1.37): $out/$name.yaml"
done
python3 -c 'import json,sys; json.load(open(sys.argv[1]))' deploy/seccomp/zring-io-uring.json
echo "ok: deploy/seccomp/zring-io-uring.json is JSON"
