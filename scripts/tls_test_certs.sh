#!/usr/bin/env bash
# Writes the TLS files tests/test_serve_tls.py serves and connects with (committed; run again only to renew them):
# a test CA, a server certificate for localhost / 127.0.0.1 and a client certificate, both signed by it, valid for
# 100 years. Their keys are test keys, published here: never use them for anything else.
set -euo pipefail
out="$(cd "$(dirname "$0")/.." && pwd)/tests/tls"
mkdir -p "$out"
cd "$out"
ec() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" && openssl pkcs8 -topk8 -nocrypt -in "$1" -out "$1.p8" \
  && mv "$1.p8" "$1"; }
ec ca.key
openssl req -x509 -new -key ca.key -sha256 -days 36500 -subj "/CN=bild-kernels test CA" -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
sign() {  # name, subject, extensions
  ec "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 36500 -extfile "$1.ext" \
    -out "$1.pem"
  rm "$1.csr" "$1.ext"
}
sign server "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1
basicConstraints=CA:FALSE
extendedKeyUsage=serverAuth"
sign client "/CN=bild-kernels test client" "basicConstraints=CA:FALSE
extendedKeyUsage=clientAuth"
rm -f ca.key ca.srl
ls "$out"
