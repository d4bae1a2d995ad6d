#!/bin/sh
# System packages the test suite needs, installed only when something is missing:
#   - the Go toolchain and Debian's containerd ttrpc + gogo protobuf sources
#     (tests/interop builds a Go ttrpc peer from them, offline);
#   - protoc and its gogottrpc plugin (the peer's message code is generated
#     from the repo's .proto files);
#   - a C compiler (the libvaccel test doubles are compiled at test time);
#   - iproute2 and nftables (multi-host tests in network namespaces);
#   - bubblewrap (the worker sandboxes its task processes with it);
#   - chromium (the dashboard test drives it headless).
set -eu

PACKAGES="golang-go golang-github-containerd-ttrpc-dev golang-github-gogo-protobuf-dev
golang-github-golang-protobuf-1-3-dev golang-google-grpc-dev golang-google-genproto-dev
protobuf-compiler gogottrpc gcc libc6-dev iproute2 nftables bubblewrap chromium"

missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: missing:$missing; run this script as root (or install them)" >&2
    exit 1
fi
echo "install-system-deps: installing$missing" >&2
here=$(dirname "$0")
sh "$here/../scripts/apt-get.sh" update -qq
# shellcheck disable=SC2086
sh "$here/../scripts/apt-get.sh" install -y -qq --no-install-recommends $missing
