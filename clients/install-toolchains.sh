#!/usr/bin/env bash
# Installs, from Debian's packages, what `make stubs` and the client tests need: protoc and the
# gRPC plugins for C++, Go and Java, the C++ gRPC libraries, and Go. Node.js and npm are expected
# on the machine already (the npm packages themselves come from `make node-deps`).
# Each missing piece is reported; the tests that need it skip, saying which package to install.
set -uo pipefail

packages=(
    protobuf-compiler             # protoc
    protobuf-compiler-grpc        # grpc_cpp_plugin
    libgrpc++-dev                 # the C++ client's gRPC and protobuf libraries
    protoc-gen-go protoc-gen-go-grpc
    golang-go golang-google-grpc-dev golang-google-protobuf-dev
    golang-github-golang-protobuf-1-5-dev   # grpc-go's codec on the APIv2 messages protoc-gen-go writes
    protobuf-compiler-grpc-java-plugin
    libgrpc-java libprotobuf-java default-jdk-headless   # javac checks the Java stubs compile
    pkg-config cmake g++
)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "client toolchains: all installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "client toolchains: missing ${missing[*]}; install them with apt-get (the client tests skip without them)"
    exit 0
fi
echo "client toolchains: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
install "${missing[@]}" || { apt-get update -qq && install "${missing[@]}"; } || {
    # One package apt cannot find must not cost the others: try them one at a time.
    for package in "${missing[@]}"; do
        install "$package" || echo "client toolchains: could not install $package; the tests that need it will skip"
    done
}
