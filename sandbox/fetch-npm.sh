#!/bin/sh
# Fetch one package from the npm registry by exact version (`npm pack`: the tarball checksummed by npm) into the
# current directory. On failure npm's own error is shown (never --silent: it hides the reason), then what
# usually causes it. Usage: fetch-npm.sh PACKAGE@VERSION "WHAT VERSION" (WHAT names it for people).
set -eu
spec="$1"
what="$2"
npm pack --loglevel=warn "$spec" || {
  echo "executor: fetching the $what from the npm registry failed (npm's error is above)." >&2
  echo "executor: behind a proxy that intercepts TLS (npm says SELF_SIGNED_CERT_IN_CHAIN or UNABLE_TO_GET_ISSUER_CERT_LOCALLY)," >&2
  echo "executor: put the proxy's CA certificate (PEM, named *.crt) into sandbox/certs/ and build again; a proxy the" >&2
  echo "executor: build must go through is passed with --build-arg HTTPS_PROXY=... (README: Quick start)." >&2
  exit 1
}
