#!/usr/bin/env bash
# A throwaway CA and a localhost leaf certificate for benchmarks on loopback
# (ca.pem, leaf.pem, leaf.key in DIR; kept if already there).
# usage: scripts/test-certs.sh DIR
set -euo pipefail
out=${1:?dir}
mkdir -p "$out"
[ -f "$out/leaf.pem" ] && exit 0
cd "$out"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem \
    -days 30 -subj "/CN=edgegate bench CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout leaf.key -out leaf.csr \
    -subj "/CN=localhost" 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" > ext.cnf
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 30 \
    -extfile ext.cnf 2>/dev/null
