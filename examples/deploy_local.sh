#!/usr/bin/env bash
# A whole free-dfml federation on loopback, start to finish, over TLS:
#   self-signed CA + server certificate (openssl) -> free-server start -> three clients train
#   (one with differential privacy) and submit -> free-server status -> evaluate -> export -> stop.
#
#   examples/deploy_local.sh                  # work folder in /tmp, a free port, the glyphs data set
#   WORK=/tmp/fed PRESET=tiny EPOCHS=2 examples/deploy_local.sh
#
# Only model packages (weights + metadata) cross the wire; the images stay with each client.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$ROOT/.venv/bin}"
PY="$BIN/python"
WORK="${WORK:-$(mktemp -d /tmp/free-deploy.XXXXXX)}"
DATA="${DATA:-glyphs}"
PRESET="${PRESET:-quick}"          # preset whose FREE settings the server uses: tiny | demo | quick | paper
EPOCHS="${EPOCHS:-5}"              # client training epochs
WIDTH="${WIDTH:-16}"               # client Conv4 width
EPISODES="${EPISODES:-50}"         # evaluation episodes
ITERS="${ITERS:-10}"               # FREE iterations to wait for before evaluating
PORT="${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
STATE="$WORK/server-state"
ADDR="127.0.0.1:$PORT"
mkdir -p "$WORK/certs" "$WORK/clients"
say() { printf '\n== %s\n' "$*"; }
t0=$(date +%s)

cleanup() { "$BIN/free-server" stop --state "$STATE" >/dev/null 2>&1 || true; }
trap cleanup EXIT

say "1. certificates (self-signed CA, server cert for localhost/127.0.0.1) in $WORK/certs"
cd "$WORK/certs"
openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=free-dfml local CA" \
  -keyout ca.key -out ca.pem -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 7 \
  -extfile server.ext -out server.pem 2>/dev/null
cd - >/dev/null

say "2. free-server start on $ADDR (TLS), state $STATE"
"$BIN/free-server" start --state "$STATE" --address "$ADDR" \
  --tls-cert "$WORK/certs/server.pem" --tls-key "$WORK/certs/server.key" --tls-ca "$WORK/certs/ca.pem" \
  --preset "$PRESET" --checkpoint-every 5 --detach

say "3. three clients train on their own classes (client 3 with DP-SGD, epsilon 8) and submit"
"$BIN/free-client" train --data "$DATA" --classes 0-4   --arch conv4 --width "$WIDTH" --epochs "$EPOCHS" --seed 1 --out "$WORK/clients/c1.safetensors"
"$BIN/free-client" train --data "$DATA" --classes 5-9   --arch conv4 --width "$WIDTH" --epochs "$EPOCHS" --seed 2 --out "$WORK/clients/c2.safetensors"
"$BIN/free-client" train --data "$DATA" --classes 10-14 --arch conv4 --width "$WIDTH" --epochs "$EPOCHS" --seed 3 --out "$WORK/clients/c3.safetensors" \
  --dp-epsilon 8 --max-grad-norm 1.0
"$BIN/free-client" inspect "$WORK/clients/c3.safetensors"
pids=()
for i in 1 2 3; do
  "$BIN/free-client" submit --model "$WORK/clients/c$i.safetensors" --server "$ADDR" \
    --root-cert "$WORK/certs/ca.pem" --timeout 300 > "$WORK/clients/c$i.id" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for i in 1 2 3; do echo "client $i -> model $(cat "$WORK/clients/c$i.id")"; done

say "4. free-server status (waiting for $ITERS FREE iterations and a checkpoint)"
for _ in $(seq 1 600); do
  it=$("$BIN/free-server" status --state "$STATE" --json | "$PY" -c \
    'import json,sys; d=json.load(sys.stdin); c=d["training"].get("last_checkpoint") or {}; print(c.get("iteration", 0))')
  [ "$it" -ge "$ITERS" ] && break
  sleep 2
done
"$BIN/free-server" status --state "$STATE"

say "5. evaluate the meta-learner (5-way 1-shot, $EPISODES episodes, meta-test classes)"
"$BIN/free-server" evaluate --state "$STATE" --data "$DATA" --way 5 --shot 1 --episodes "$EPISODES"

say "6. export the meta-learner"
"$BIN/free-server" export --state "$STATE" --out "$WORK/meta-learner.safetensors"
"$BIN/free-client" inspect "$WORK/meta-learner.safetensors"

say "7. stop"
"$BIN/free-server" stop --state "$STATE"
trap - EXIT
echo "done in $(( $(date +%s) - t0 )) s; everything is in $WORK"
echo "adapt it: $PY $ROOT/examples/adapt.py --model $WORK/meta-learner.safetensors --images DIR"
