#!/usr/bin/env bash
# Create the secrets that deploy/compose.yml (and, as Kubernetes Secrets, deploy/k8s) expect, in
# deploy/secrets/ (git-ignored) or the directory given as $1:
#   control-tokens.json  admin, editor and viewer tokens for the control plane (mode 0600)
#   api-key              vLLM's key for the OpenAI API (mode 0600)
#   ca.crt, ca.key       a self-signed CA (keep ca.key away from the server)
#   tls.crt, tls.key     the server certificate for HTTPS :8000 and gRPC over TLS :50051, for the
#                        names localhost, editserve, editserve-a, editserve-b, editserve-http,
#                        editserve-grpc and 127.0.0.1
#   postgres-password    the compose PostgreSQL's password
#   ledger-dsn           the replicas' ledger DSN with that password: postgresql://editserve:…@postgres:5432/editserve
# Existing files are kept (delete them to rotate). Needs openssl and python3.
set -euo pipefail
out="${1:-$(dirname "$0")/secrets}"
mkdir -p "$out"
chmod 0700 "$out"      # other users of this machine cannot reach the files below
cd "$out"
umask 077
days="${EDITSERVE_CERT_DAYS:-365}"
if [ ! -e control-tokens.json ]; then
  python3 - <<'PY'
import json, secrets
roles = {"admin": "ops-admin", "editor": "edit-pipeline", "viewer": "dashboard"}
tokens = {secrets.token_urlsafe(32): {"role": r, "name": n} for r, n in roles.items()}
open("control-tokens.json", "w").write(json.dumps(tokens, indent=1) + "\n")
PY
fi
[ -e api-key ] || python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > api-key
[ -e postgres-password ] || python3 -c 'import secrets; print(secrets.token_hex(24))' > postgres-password
[ -e ledger-dsn ] || printf 'postgresql://editserve:%s@postgres:5432/editserve\n' "$(cat postgres-password)" > ledger-dsn
if [ ! -e ca.crt ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
    -days "$days" -subj "/CN=editserve local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
if [ ! -e tls.crt ]; then
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout tls.key -out tls.csr \
    -subj "/CN=editserve" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "extendedKeyUsage=serverAuth" \
    "subjectAltName=DNS:localhost,DNS:editserve,DNS:editserve-a,DNS:editserve-b,DNS:editserve-http,DNS:editserve-grpc,IP:127.0.0.1" > tls.ext
  openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days "$days" \
    -extfile tls.ext 2>/dev/null
  rm -f tls.csr tls.ext ca.srl
fi
# Compose bind-mounts secret files with their own mode and owner, and the container's user (uid 10001)
# is not their owner: they are world-readable inside a 0700 directory that only their owner can enter.
chmod 0644 ca.crt tls.crt tls.key control-tokens.json api-key postgres-password ledger-dsn
echo "secrets in $(pwd): control-tokens.json api-key ca.crt tls.crt tls.key postgres-password ledger-dsn"
