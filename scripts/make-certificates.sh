#!/usr/bin/env bash
# Demo credentials for a secure deployment (replace them with your own for production):
#   ca.crt / ca.key                  a certificate authority (the SuperNodes and `flwr` trust it)
#   superlink.crt / superlink.key    the SuperLink's TLS certificate, valid for localhost, 127.0.0.1, the compose
#                                    service name `superlink`, and any extra DNS names or IPs given
#   supernode-K / supernode-K.pub    one authentication key pair per SuperNode (EC P-384), K = 1..N
# Usage: scripts/make-certificates.sh OUT_DIR [NUM_SUPERNODES] [EXTRA_NAME ...]
set -euo pipefail
out="${1:?usage: $0 OUT_DIR [NUM_SUPERNODES] [EXTRA_NAME ...]}"
nodes="${2:-2}"
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$out"
cd "$out"

names="DNS:localhost,DNS:superlink,IP:127.0.0.1,IP:::1"  # 127.0.0.1 is required: the SuperLink's own executor connects there
for extra in "$@"; do
  if [[ "$extra" =~ ^[0-9.]+$ ]]; then names="$names,IP:$extra"; else names="$names,DNS:$extra"; fi
done

if [ ! -f ca.crt ]; then
  openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -keyout ca.key -out ca.crt \
    -subj "/CN=fedpt-app demo CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
openssl req -newkey rsa:4096 -nodes -keyout superlink.key -out superlink.csr -subj "/CN=superlink" 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
  "$names" > superlink.ext
openssl x509 -req -in superlink.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out superlink.crt -days 365 \
  -sha256 -extfile superlink.ext 2>/dev/null
rm -f superlink.csr superlink.ext

for k in $(seq 1 "$nodes"); do
  [ -f "supernode-$k" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$k" -f "supernode-$k"
done
chmod 600 ./*.key supernode-* 2>/dev/null || true
chmod 644 ./*.crt ./*.pub
echo "[certificates] $out: ca.crt, superlink.crt (${names}), ${nodes} SuperNode key pair(s)"
