#!/usr/bin/env bash
# The mutual TLS between flowd and tapd without cert-manager: a CA of dnsflow's own and a certificate per
# identity, made with openssl.
#
#   deploy/tls/make-certs.sh DIR [NAME:server|client ...]
#
# DIR gets ca.crt and ca.key (made once, reused by later runs on the same DIR) and, for each NAME,
# NAME.crt and NAME.key: an EC P-256 key and a certificate for the DNS name NAME.dnsflow, for TLS
# servers or clients. Without names: tapd:server flowd:client operator:client, the identities the
# manifests and tapd's --tls-client-name default use. Certificates last DNSFLOW_CERT_DAYS (365) days;
# to rotate, run again on a copy of DIR with the CA and update the Secrets (deploy/README.md).
set -euo pipefail

[ $# -ge 1 ] || { sed -n '2,11p' "$0" >&2; exit 64; }
dir=$1
shift
(($#)) || set -- tapd:server flowd:client operator:client
days=${DNSFLOW_CERT_DAYS:-365}
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 69; }

mkdir -p "$dir"
cd "$dir"
umask 077
if [ ! -s ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
    -days "$((days * 2))" -subj "/CN=dnsflow CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

for spec in "$@"; do
  name=${spec%%:*}
  role=${spec#*:}
  case "$role" in
    server) usage=serverAuth ;;
    client) usage=clientAuth ;;
    *) echo "make-certs.sh: $spec: the role must be server or client" >&2; exit 64 ;;
  esac
  [[ "$name" =~ ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]] || { echo "make-certs.sh: $name is not a DNS label" >&2; exit 64; }
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$name.key" -out "$name.csr" \
    -subj "/CN=$name.dnsflow" 2>/dev/null
  printf 'subjectAltName=DNS:%s.dnsflow\nextendedKeyUsage=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' \
    "$name" "$usage" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$name.crt" \
    -days "$days" -extfile "$name.ext" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
  echo "$dir/$name.crt: $name.dnsflow ($role)"
done
