#!/bin/bash
# Build the Debian package from a staged copy of the work tree and check it with lintian.
#
#   scripts/build-deb.sh [OUTDIR] [--with-source]      (default: dist/)
#
# Writes OUTDIR/aqtune_<version>_all.deb (with --with-source also the .changes and every file it
# lists: source package, .buildinfo; for running another release's lintian on the same upload)
# and nothing else into the checkout: dpkg-buildpackage
# wants ./debian and writes build junk (.pybuild, *.egg-info, debian/.debhelper) and its results to
# the parent directory, so all of that happens in a temporary copy, with packaging/debian copied
# to debian/. The staged copy holds what git tracks plus untracked files that are not ignored,
# as they are in the work tree (uncommitted edits included); outside git, the tree minus caches.
# A source package is built too (orig tarball from the same copy) so lintian checks the source
# side (copyright, rules, changelog) as well as the .deb. Fails on any lintian error, and on any
# warning other than initial-upload-closes-no-bugs, which a first upload without an ITP bug gets.
set -euo pipefail

# pybuild must run Debian's python3 (3.11 or 3.13); pyenv shims first on PATH give "No module named build".
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH VIRTUAL_ENV PYTHONHOME
export LC_ALL=C.UTF-8

SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=$SRC/dist
WITH_SOURCE=0
for arg in "$@"; do
    case "$arg" in
        --with-source) WITH_SOURCE=1 ;;
        -*) echo "build-deb: unknown option $arg (usage: build-deb.sh [OUTDIR] [--with-source])" >&2; exit 2 ;;
        *) OUT=$arg ;;
    esac
done
OUT=$(realpath -m "$OUT")
ALLOWED_WARNINGS=(initial-upload-closes-no-bugs)

changelog=$SRC/packaging/debian/changelog
pkg=$(dpkg-parsechangelog -l "$changelog" -S Source)
version=$(dpkg-parsechangelog -l "$changelog" -S Version)
upstream=${version%-*}
project_version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$SRC/pyproject.toml" | head -1)
if [ "$upstream" != "$project_version" ]; then
    echo "build-deb: packaging/debian/changelog says $version but pyproject.toml says $project_version" >&2
    exit 1
fi

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/aqtune-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
tree=$STAGE/$pkg-$upstream
mkdir -p "$tree" "$OUT"

SECONDS=0
if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
        && [ "$(git -C "$SRC" rev-parse --show-toplevel)" = "$SRC" ]; then
    # Files deleted in the work tree but still in the index are skipped, and so is a .venv that is
    # a symlink (.gitignore's ".venv/" matches only a directory).
    git -C "$SRC" ls-files -z --cached --others --exclude-standard \
        | grep -zvE '^\.venv(/|$)' \
        | (cd "$SRC" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) \
        | tar -C "$SRC" --null -T - -cf - | tar -C "$tree" -xf -
else
    tar -C "$SRC" --exclude=.git --exclude=.venv --exclude=dist --exclude=build --exclude=__pycache__ \
        --exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.hypothesis \
        --exclude=.benchmarks --exclude='*.egg-info' --exclude=./debian -cf - . | tar -C "$tree" -xf -
fi
rm -rf "$tree/debian"
tar -C "$STAGE" -cJf "$STAGE/${pkg}_$upstream.orig.tar.xz" "$pkg-$upstream"
cp -a "$tree/packaging/debian" "$tree/debian"
echo "build-deb: staged $(find "$tree" -type f | wc -l) files in ${SECONDS}s"

SECONDS=0
(cd "$tree" && dpkg-checkbuilddeps && dpkg-buildpackage -us -uc) >"$STAGE/build.log" 2>&1 || {
    tail -60 "$STAGE/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed" >&2
    exit 1
}
echo "build-deb: dpkg-buildpackage took ${SECONDS}s"

changes=$(ls "$STAGE"/"${pkg}_${version}"_*.changes)
SECONDS=0
# lintian's own exit status is not used: the allowed warning would fail --fail-on warning.
lintian --pedantic --display-info --tag-display-limit 0 "$changes" 2>&1 \
    | grep -v 'running with root privileges is not recommended' >"$STAGE/lintian.txt" || true
echo "build-deb: lintian took ${SECONDS}s"
sed 's/^/lintian: /' "$STAGE/lintian.txt"
bad=$(awk -v allowed="${ALLOWED_WARNINGS[*]}" '
    BEGIN { split(allowed, a, " "); for (i in a) ok[a[i]] = 1 }
    /^E: / || (/^W: / && !($3 in ok))' "$STAGE/lintian.txt")
if [ -n "$bad" ]; then
    echo "build-deb: lintian errors or warnings:" >&2
    echo "$bad" >&2
    exit 1
fi

deb=${pkg}_${version}_all.deb
cp "$STAGE/$deb" "$OUT/$deb"
if [ "$WITH_SOURCE" = 1 ]; then
    # The files section of the .changes: "md5 size section priority name".
    cp "$changes" "$OUT/"
    sed -n '/^Files:/,/^[^ ]/s/^ [0-9a-f]\{32\} [0-9]* [^ ]* [^ ]* //p' "$changes" \
        | while read -r f; do cp "$STAGE/$f" "$OUT/"; done
    echo "build-deb: $OUT/$(basename "$changes") and the files it lists"
fi
echo "build-deb: $OUT/$deb"
