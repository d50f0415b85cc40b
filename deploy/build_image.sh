#!/usr/bin/env bash
# Build deploy/Dockerfile with buildah and smoke-test the result, on a machine without
# Docker. Run from anywhere; everything is relative to the repository root.
#
#   deploy/build_image.sh            build, then smoke-test (what `make image` runs)
#   deploy/build_image.sh build      build only
#   deploy/build_image.sh smoke      smoke-test an image built before
#   deploy/build_image.sh base       make the local stand-in base image (mmdebstrap + podman import)
#   deploy/build_image.sh lock       regenerate deploy/constraints.txt (needs .venv and the package index)
#
# Settings (environment):
#   IMAGE         the tag to build            (default localhost/vidsearch:0.1.0)
#   PYTHON_IMAGE  the base image              (default: the Dockerfile's digest-pinned official image;
#                 a localhost/ name is pinned to its local digest before the build)
#   CA_BUNDLE     a CA bundle to mount into the build for pip (default: the ca-certificates
#                 package's bundle when it exists; mounted read-only, never written into the image)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${IMAGE:-localhost/vidsearch:0.1.0}
PYTHON_IMAGE=${PYTHON_IMAGE:-}
CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
STANDIN=localhost/python-bookworm:local
UID_IN_IMAGE=10001

die() { echo "build_image.sh: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 not found (apt-get install $2)"; }

# The stand-in for python:3.11-slim-bookworm where no public registry can be reached: the
# same Debian release and Python minor version (bookworm's python3 is 3.11), made from
# Debian's packages. Only what the Dockerfile needs from the official image is in it.
make_base() {
    need mmdebstrap mmdebstrap
    need podman podman
    local tar
    tar=$(mktemp --suffix=.tar)
    trap 'rm -f "$tar"' RETURN
    mmdebstrap --variant=apt --include=python3,python3-venv,python-is-python3,ca-certificates bookworm "$tar"
    podman import "$tar" "$STANDIN"
}

# A base given by tag is pinned here to the digest it has now, so that the build and the
# record of it name exactly one image.
pinned_base() {
    local base=$1
    case "$base" in
        *@sha256:*) echo "$base" ;;
        localhost/*)
            local digest
            digest=$(buildah inspect --type image --format '{{.FromImageDigest}}' "$base" 2>/dev/null) \
                || die "no local image $base (run: deploy/build_image.sh base)"
            echo "${base%%:*}@${digest}" ;;
        *) die "PYTHON_IMAGE=$base is a tag: give it with @sha256:<digest>" ;;
    esac
}

build() {
    need buildah buildah
    # --format docker: an OCI image config has no HEALTHCHECK. --layers: reuse the cached
    # layers (the ~4.5 GB deps layer when only the source changed).
    local args=(bud --isolation chroot --layers --format docker -f "$ROOT/deploy/Dockerfile"
                --ignorefile "$ROOT/deploy/Dockerfile.dockerignore" -t "$IMAGE")
    if [[ -n "$PYTHON_IMAGE" ]]; then
        args+=(--build-arg "PYTHON_IMAGE=$(pinned_base "$PYTHON_IMAGE")")
    fi
    if [[ -n "$CA_BUNDLE" && -f "$CA_BUNDLE" ]]; then
        args+=(-v "$CA_BUNDLE:$CA_BUNDLE:ro" --build-arg "PIP_CERT=$CA_BUNDLE")
    fi
    # The hashes in deploy/constraints.txt are PyPI's, and `lock` resolves against PyPI
    # only (not this machine's local wheel folders or extra file:// indexes), so the build
    # uses PyPI too, unless PIP_INDEX_URL names a mirror of it.
    if [[ -n "${PIP_INDEX_URL:-}" ]]; then
        args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
    fi
    # The build context is the working tree: say what in it is not committed.
    local dirty
    dirty=$(git -C "$ROOT" status --porcelain -- pyproject.toml setup.py README.md protos shared \
            services deploy/constraints.txt deploy/serve_config.yaml deploy/healthcheck.sh \
            deploy/models deploy/train 2>/dev/null || true)
    if [[ -n "$dirty" ]]; then
        echo "build_image.sh: warning: the image will contain these uncommitted changes:" >&2
        echo "$dirty" >&2
    fi
    echo "+ buildah ${args[*]} $ROOT"
    local start=$SECONDS
    buildah "${args[@]}" "$ROOT"
    echo "built $IMAGE in $((SECONDS - start)) s"
    buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
}

# Inside the built image, as its own user (uid 10001): the CLI, the settings it resolves,
# and the whole demo (embedded broker, store, Ray, ingest worker, Serve, real gRPC
# searches). The source tree must not be writable by that user.
smoke() {
    need buildah buildah
    local ctr
    ctr=$(buildah from --pull=never "$IMAGE")
    trap 'buildah rm "$ctr" >/dev/null' RETURN
    local run=(buildah run --isolation chroot "$ctr" --)
    echo "+ id";                  "${run[@]}" id
    [[ $("${run[@]}" id -u) == "$UID_IN_IMAGE" ]] || die "the image does not run as uid $UID_IN_IMAGE"
    echo "+ the source tree is read-only for this user"
    "${run[@]}" sh -c 'for d in /opt/vidsearch /opt/vidsearch/shared /opt/vidsearch/deploy/models /opt/venv; do
                           if touch "$d/.w" 2>/dev/null; then echo "writable: $d"; exit 1; fi; done; echo ok'
    echo "+ /data/registry (compose's registry volume) is the user's"
    "${run[@]}" sh -c 'stat -c "%n %u:%g %A" /data/registry && touch /data/registry/.w && rm /data/registry/.w && echo ok'
    echo "+ vidsearch --help";    "${run[@]}" vidsearch --help
    echo "+ vidsearch config";    "${run[@]}" vidsearch config
    echo "+ vidsearch demo --once"
    local start=$SECONDS
    "${run[@]}" vidsearch demo --once
    echo "demo passed in $((SECONDS - start)) s"
}

# deploy/constraints.txt: every distribution the image installs, with the one wheel's hash
# for CPython 3.11 on linux x86_64 (glibc). The versions are the project's pins
# (pyproject.toml) and, for everything else, what .venv has, so the image runs what the
# tests ran; the rest is resolved once here and then fixed by the file.
lock() {
    local py="$ROOT/.venv/bin/python" work
    [[ -x "$py" ]] || die "no $ROOT/.venv (run: make install)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    "$py" - "$ROOT/pyproject.toml" > "$work/requirements.txt" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"]))
EOF
    # What the image adds to the package's own dependencies: the object-store filesystems
    # of model.registry_root (s3://, gs://), and the build tools of the editable install.
    # s3fs and gcsfs each require their own fsspec version exactly; 2026.7.0 is the newest
    # release both have.
    cat >> "$work/requirements.txt" <<EOF
s3fs==2026.7.0
gcsfs==2026.7.0
$("$py" -m pip freeze --all | grep -E '^(pip|setuptools|wheel)==')
EOF
    # .venv's versions as constraints, less the editable package itself and those the
    # object-store filesystems can't take: fsspec (pinned by s3fs/gcsfs, above) and
    # python-dateutil (botocore requires < 3).
    "$py" -m pip freeze | grep -v -E '^(-e |vidsearch( |=)|fsspec==|python-dateutil==)' > "$work/venv.txt"
    # Only the package index, as inside the build: not this machine's pip configuration
    # (local wheel folders, extra indexes).
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS='' PIP_EXTRA_INDEX_URL='' \
        "$py" -m pip install --dry-run --ignore-installed --quiet --report "$work/report.json" \
        -r "$work/requirements.txt" -c "$work/venv.txt"
    "$py" - "$work/report.json" > "$ROOT/deploy/constraints.txt" <<'EOF'
import json, sys
from packaging.utils import canonicalize_name
report = json.load(open(sys.argv[1]))
print("# Every distribution in the vidsearch image, exact version and wheel hash (CPython 3.11,\n"
      "# linux x86_64). Generated by `deploy/build_image.sh lock`; edit pyproject.toml, not this.\n"
      "# The Dockerfile installs exactly this set (--no-deps --require-hashes), then `pip check`.")
rows = []
for item in report["install"]:
    meta, info = item["metadata"], item["download_info"]
    sha = info["archive_info"]["hashes"]["sha256"]
    rows.append(f"{canonicalize_name(meta['name'])}=={meta['version']} --hash=sha256:{sha}")
print("\n".join(sorted(rows)))
EOF
    echo "wrote $ROOT/deploy/constraints.txt ($(grep -c '==' "$ROOT/deploy/constraints.txt") distributions)"
}

case "${1:-all}" in
    all) build; smoke ;;
    build) build ;;
    smoke) smoke ;;
    base) make_base ;;
    lock) lock ;;
    *) die "unknown command $1 (all, build, smoke, base, lock)" ;;
esac
